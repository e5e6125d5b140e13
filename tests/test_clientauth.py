"""clientauth.py without sockets: password check slots, backoff, reloaded files, bindings."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import bcrypt
import httpx
import pytest
import trio

from vpsrelay import config
from vpsrelay.clientauth import ClientAuth, _PasswordChecks, add_user
from vpsrelay.core import tokens
from vpsrelay.errors import TooManyRequests, Unauthorized
from vpsrelay.upstream import Upstream

if TYPE_CHECKING:
    from pathlib import Path

FAST = 4  # bcrypt cost for tests


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the upstream must not be asked: {request.url}")


def client_auth(tmp_path: Path, **auth: object) -> ClientAuth:
    overrides = {"auth.enabled": True, **{f"auth.{k}": v for k, v in auth.items()}}
    settings = config.load(None, {}, {"data_dir": str(tmp_path / "data"), **overrides})
    return ClientAuth(settings, Upstream(settings, transport=httpx.MockTransport(never)))


async def test_a_full_queue_of_password_checks_is_refused_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def slow_check(password: bytes, hashed: bytes) -> bool:
        release.wait(10)
        return False

    monkeypatch.setattr(bcrypt, "checkpw", slow_check)
    checks = _PasswordChecks(trio.CapacityLimiter(1))
    hashed = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=FAST)).decode()
    results: list[bool] = []

    async def one() -> None:
        results.append(await checks.check("guess", hashed, FAST))

    async with trio.open_nursery() as nursery:
        for _ in range(5):  # one running, four waiting
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert checks.pending == 5
        with trio.fail_after(1), pytest.raises(TooManyRequests) as refused:
            await checks.check("one too many", hashed, FAST)
        assert refused.value.headers == (("retry-after", "1"),)
        release.set()
    assert results == [False] * 5
    assert checks.pending == 0


async def test_failed_logins_back_off_and_other_users_still_log_in(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    add_user(users, "bob", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users), failures_before_backoff=2)
    for _ in range(3):  # two free failures, then one that makes the next wait
        with pytest.raises(Unauthorized):
            await auth.check_password("alice", "wrong", "203.0.113.7")
    with pytest.raises(TooManyRequests):  # this address now waits
        await auth.check_password("bob", "right", "203.0.113.7")
    with pytest.raises(TooManyRequests):  # and so does alice, from anywhere
        await auth.check_password("alice", "right", "198.51.100.1")
    assert (await auth.check_password("bob", "right", "198.51.100.1")).subject == "bob"


async def test_unknown_users_cost_the_users_usual_bcrypt_cost(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users))
    with pytest.raises(Unauthorized):
        await auth.check_password("nobody", "x", "203.0.113.7")
    assert list(auth._checks.dummies) == [FAST]
    assert tokens.bcrypt_cost(auth._checks.dummies[FAST].decode()) == FAST


async def test_a_changed_pull_tokens_file_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "pull-tokens"
    path.write_text("first-token\n")
    auth = client_auth(tmp_path, pull_tokens_file=str(path))
    assert (await auth.check_password("ci", "first-token", "203.0.113.7")).subject == "token"
    path.write_text("second-token\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    auth._tokens_file.checked = -1e9  # do not wait for the next look
    await auth._users()
    assert auth._is_pull_token("second-token")
    assert not auth._is_pull_token("first-token")
    path.unlink()
    auth._tokens_file.checked = -1e9
    await auth._users()
    assert not auth._is_pull_token("second-token")  # a removed file revokes every token


async def test_a_burst_of_one_clients_logins_costs_one_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "ci", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users), password_checks=1)
    real_check = bcrypt.checkpw
    calls = 0

    def counted(password: bytes, hashed: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real_check(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    subjects: list[str] = []

    async def login() -> None:
        subjects.append((await auth.check_password("ci", "right", "203.0.113.7")).subject)

    async with trio.open_nursery() as nursery:
        for _ in range(20):  # more than one slot and its queue would take
            nursery.start_soon(login)
    assert subjects == ["ci"] * 20
    assert calls == 1
