"""clientauth.py without sockets: password check slots, backoff, reloaded files, bindings."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import TYPE_CHECKING

import bcrypt
import httpx
import pytest
import trio

from vpsrelay import config
from vpsrelay.access.clientauth import ClientAuth, _PasswordChecks, add_user
from vpsrelay.core import routing, tokens
from vpsrelay.errors import TooManyRequests, Unauthorized
from vpsrelay.upstream import Upstream
from vpsrelay.upstream.tokens import TokenClient

if TYPE_CHECKING:
    from pathlib import Path

FAST = 4  # bcrypt cost for tests


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the upstream must not be asked: {request.url}")


def client_auth(tmp_path: Path, **auth: object) -> ClientAuth:
    overrides = {"auth.enabled": True, **{f"auth.{k}": v for k, v in auth.items()}}
    settings = config.load(None, {}, {"data_dir": str(tmp_path / "data"), **overrides})
    return ClientAuth(
        settings, TokenClient(Upstream(settings, transport=httpx.MockTransport(never)))
    )


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
    # Issue 12 follow-up, finding 3: alice herself, from elsewhere, is not locked out
    # (she takes her turn among the checks of her name: the first one is now).
    assert (await auth.check_password("alice", "right", "198.51.100.1")).subject == "alice"
    assert (await auth.check_password("bob", "right", "198.51.100.1")).subject == "bob"


async def test_guesses_checked_at_once_get_the_tries_of_guesses_in_turn(
    tmp_path: Path,
) -> None:
    """Issue 14 follow-up: a failure was counted when its check ended, so a burst of guesses
    at once from one address got as many tries as checks could run and wait (per process,
    so per worker). Now a check counts from its start."""
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    auth = client_auth(
        tmp_path, users_file=str(users), failures_before_backoff=2, password_checks=4
    )
    statuses: list[int] = []

    async def guess(number: int) -> None:
        try:
            await auth.check_password("alice", f"wrong-{number}", "203.0.113.7")
        except (Unauthorized, TooManyRequests) as exc:
            statuses.append(exc.status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for number in range(12):  # room for 20 checks running or waiting
                nursery.start_soon(guess, number)
    assert sorted(statuses) == [401] * 3 + [429] * 9  # 2 free failures, 1 that makes it wait


async def test_a_guessed_at_user_is_checked_in_turn_and_a_pull_token_skips_the_line(
    tmp_path: Path,
) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    auth = client_auth(
        tmp_path, users_file=str(users), failures_before_backoff=1, guesses_per_minute=120,
        pull_tokens=["ci-token-0123456789ab"], max_backoff=5.0,
    )  # fmt: skip
    with pytest.raises(Unauthorized):
        await auth.check_password("alice", "wrong", "192.0.2.1")
    finished: list[tuple[str, float]] = []
    began = trio.current_time()

    async def guess(number: int) -> None:
        await trio.sleep(0.01 * number)  # arrive in this order
        with contextlib.suppress(Unauthorized):
            await auth.check_password("alice", f"wrong-{number}", f"192.0.2.{number + 10}")
        finished.append((f"guess-{number}", trio.current_time() - began))

    async def login() -> None:
        await trio.sleep(0.05)  # after the guesses: in line behind them
        credential = await auth.check_password("alice", "right", "198.51.100.1")
        finished.append((credential.subject, trio.current_time() - began))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(guess, number)
            nursery.start_soon(login)
    # Half a second apart (120 a minute), in order of arrival; the right password gets in.
    assert [name for name, _ in finished] == [*(f"guess-{n}" for n in range(4)), "alice"]
    assert finished[-1][1] >= 4 * 0.5 - 0.1
    # A static pull token takes no turn in a line. But an address refused for failures is
    # refused whatever it sends, its pull token too (review of issue 12, finding 5): else it
    # could go on guessing pull tokens at request rate.
    with pytest.raises(Unauthorized):
        await auth.check_password("token", "wrong", "192.0.2.1")
    with pytest.raises(TooManyRequests):
        await auth.check_password("token", "ci-token-0123456789ab", "192.0.2.1")
    with trio.fail_after(1):
        credential = await auth.check_password("alice", "ci-token-0123456789ab", "192.0.2.77")
    assert credential.subject == "token"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_wrong_bearer_pull_tokens_back_off_per_address(tmp_path: Path) -> None:
    """Review of issue 12, finding 5: a Bearer pull token was compared before any backoff
    and a wrong one cost nothing, so with no request rate limit (the default) a short pull
    token could be guessed at request rate. Now each wrong one counts for its address."""
    good = "ci-token-0123456789ab"
    auth = client_auth(tmp_path, pull_tokens=[good], failures_before_backoff=3)
    route = routing.Route(routing.Kind.MANIFEST, name="alpine", upstream_name="library/alpine")
    statuses = []
    for attempt in range(6):
        try:
            await auth.verify(bearer(f"guess-{attempt:016d}"), route, "realm", "203.0.113.7")
        except (Unauthorized, TooManyRequests) as exc:
            statuses.append(exc.status)
    assert statuses == [401, 401, 401, 401, 429, 429]  # 3 free, 1 that makes it wait
    with pytest.raises(TooManyRequests):  # the right one too, while the address waits
        await auth.verify(bearer(good), route, "realm", "203.0.113.7")
    assert await auth.verify(bearer(good), route, "realm", "198.51.100.1") == "token"
    # A relay token is no guess: it still works from the address that waits.
    key = await auth._signing_key()
    issued = tokens.issue(
        key, subject="alice", service=auth.service, repositories=["docker.io/library/alpine"],
        now=time.time(), ttl=60,
    )  # fmt: skip
    assert await auth.verify(bearer(issued), route, "realm", "203.0.113.7") == "alice"


async def test_a_short_token_in_the_pull_tokens_file_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "pull-tokens"
    path.write_text("ci-token-0123456789ab\n")
    auth = client_auth(tmp_path, pull_tokens_file=str(path))
    await auth._users()
    path.write_text("short\nci-token-0123456789ab\nanother-token-0123456789\n")
    auth._tokens_file.checked = -1e9
    await auth._users()
    assert not auth._is_pull_token("short")
    assert auth._is_pull_token("another-token-0123456789")


async def test_a_password_over_72_bytes_is_a_failed_login(tmp_path: Path) -> None:
    """Finding 4: bcrypt 5 raises ValueError past 72 bytes; that was a 500, no backoff."""
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users), failures_before_backoff=1)
    with pytest.raises(Unauthorized):
        await auth.check_password("alice", "x" * 73, "203.0.113.7")
    with pytest.raises(Unauthorized):
        await auth.check_password("alice", "é" * 40, "203.0.113.7")
    with pytest.raises(TooManyRequests):  # the failures were recorded
        await auth.check_password("alice", "right", "203.0.113.7")


async def test_a_login_checked_across_a_reload_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password removed while its check runs must neither pass nor stay good a minute."""
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    add_user(users, "bob", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users))
    real_check = _PasswordChecks.check

    async def check_while_alice_is_removed(
        checks: _PasswordChecks, password: str, hashed: str | None, cost: int
    ) -> bool:
        result = await real_check(checks, password, hashed, cost)
        users.write_text(users.read_text().splitlines()[1] + "\n")  # bob only
        auth._users_file.checked = -1e9
        await auth._users()  # another request sees the change meanwhile
        return result

    monkeypatch.setattr(_PasswordChecks, "check", check_while_alice_is_removed)
    with pytest.raises(Unauthorized):
        await auth.check_password("alice", "right", "203.0.113.7")
    assert not auth._good


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
    path.write_text("first-token-0123456789\n")
    auth = client_auth(tmp_path, pull_tokens_file=str(path))
    assert (
        await auth.check_password("ci", "first-token-0123456789", "203.0.113.7")
    ).subject == "token"
    path.write_text("second-token-0123456789\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    auth._tokens_file.checked = -1e9  # do not wait for the next look
    await auth._users()
    assert auth._is_pull_token("second-token-0123456789")
    assert not auth._is_pull_token("first-token-0123456789")
    path.unlink()
    auth._tokens_file.checked = -1e9
    await auth._users()
    assert not auth._is_pull_token("second-token-0123456789")  # a removed file revokes every token


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


async def test_an_unreadable_users_file_keeps_the_users_read_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=FAST)
    auth = client_auth(tmp_path, users_file=str(users))
    assert (await auth.check_password("alice", "right", "203.0.113.7")).subject == "alice"
    users.write_bytes(b"alice:\xff\xfe not UTF-8\n")
    for _ in range(3):  # every look at the changed file: one warning, no error
        auth._users_file.checked = -1e9
        assert "alice" in await auth._users()
    warnings = [r for r in caplog.records if "cannot read it" in r.getMessage()]
    assert len(warnings) == 1
    users.chmod(0o000)
    try:
        auth._users_file.checked = -1e9
        assert "alice" in await auth._users()
    finally:
        users.chmod(0o600)


async def test_a_same_size_change_within_one_mtime_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "pull-tokens"
    path.write_text("token-aaaa-0123456789\n")
    auth = client_auth(tmp_path, pull_tokens_file=str(path))
    await auth._users()
    assert auth._is_pull_token("token-aaaa-0123456789")
    before = path.stat()
    path.write_text("token-bbbb-0123456789\n")  # same size, same mtime (restored below)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    auth._tokens_file.checked = -1e9
    await auth._users()
    assert auth._is_pull_token("token-bbbb-0123456789")
    replacement = tmp_path / "new-tokens"  # an atomic replace: a new inode
    replacement.write_text("token-cccc-0123456789\n")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    auth._tokens_file.checked = -1e9
    await auth._users()
    assert auth._is_pull_token("token-cccc-0123456789")
    assert not auth._is_pull_token("token-bbbb-0123456789")
