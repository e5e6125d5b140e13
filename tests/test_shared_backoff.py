"""The failed-login backoff the relay's processes share (`SharedBackoff` over `limits.db`).

The policy is `core.tokens.PasswordBackoff`'s; the store only loads and saves the slice of
state one check concerns. So the check here is equivalence: the same calls, spread over
two processes' handles on one real SQLite file, answer exactly what one process's
in-memory backoff answers.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from vpsrelay.access import shared as shared_module
from vpsrelay.access.clientauth import SharedBackoff
from vpsrelay.access.shared import SharedLimits
from vpsrelay.core import tokens

NOON = 1_795_000_000.0


def _policy(**params: float) -> functools.partial[tokens.PasswordBackoff]:
    return functools.partial(tokens.PasswordBackoff, **params)  # type: ignore[arg-type]


def _two(data_dir: Path, **params: float) -> list[SharedBackoff]:
    """Two processes' backoffs on one data dir (each its own connection and owner)."""
    return [SharedBackoff(SharedLimits(data_dir), _policy(**params)) for _ in range(2)]


def test_failures_in_two_processes_count_as_in_one(tmp_path: Path) -> None:
    one, two = _two(tmp_path, free=2, cap=8.0)
    waits = []
    for attempt in range(7):  # each failure in the other process
        here = (one, two)[attempt % 2]
        now = NOON + attempt * 0.01
        waits.append(round(here.wait("203.0.113.7", "alice", now), 2))
        here.failed("203.0.113.7", "alice", now)
    assert waits[:3] == [0.0, 0.0, 0.0]  # the free failures, then the waits
    assert waits[3:] == [0.99, 1.99, 3.99, 7.99]  # 1, 2, 4, 8 s after the failure before
    assert two.wait("203.0.113.7", "bob", NOON + 0.06) == pytest.approx(8.0)  # for any user
    assert one.wait("198.51.100.1", "alice", NOON + 0.06) == 0.0  # alice elsewhere does not
    assert one.wait("203.0.113.7", "alice", NOON + 8.06) == 0.0


def test_a_paced_users_turns_are_one_line_for_every_process(tmp_path: Path) -> None:
    one, two = _two(tmp_path, free=2, cap=60.0, per_minute=10)
    for number in range(2):
        one.failed(f"198.51.100.{number}", "alice", NOON)
    turns = [(one, two)[n % 2].pace(f"192.0.2.{n}", "alice", NOON + 1) for n in range(3)]
    assert turns == pytest.approx([0.0, 9.0, 18.0])
    assert one.pace("192.0.2.1", "alice", NOON + 1) is None  # its turn waits (taken in two)
    turns = [(one, two)[n % 2].pace(f"192.0.2.{n}", "alice", NOON + 1) for n in range(3, 7)]
    assert turns == pytest.approx([27.0, 36.0, 45.0, 54.0])
    assert two.pace("192.0.2.99", "alice", NOON + 1) is None  # over a minute away
    assert two.pace("198.51.100.0", "alice", NOON + 1) == 0.0  # the suspects' own line
    assert one.pace("198.51.100.1", "alice", NOON + 1) == pytest.approx(18.0)
    two.succeeded("192.0.2.5", "alice")  # alice got in: her line is forgotten everywhere
    assert one.pace("192.0.2.98", "alice", NOON + 2) == 0.0
    assert one.pace("192.0.2.97", "alice", NOON + 2) == 0.0


def test_a_wrong_pull_token_counts_for_its_address_in_every_process(tmp_path: Path) -> None:
    one, two = _two(tmp_path, free=1, cap=60.0)
    one.failed_address("203.0.113.7", NOON)
    assert two.address_wait("203.0.113.7", NOON) == 0.0
    two.failed_address("203.0.113.7", NOON)
    assert one.address_wait("203.0.113.7", NOON + 0.5) == 0.5
    assert one.wait("203.0.113.7", "alice", NOON + 0.5) == 0.5


def test_the_state_is_bounded_and_quiet_keys_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_module, "PRUNE_EVERY", 10)
    (one,) = _two(tmp_path, free=0, cap=5.0, limit=20)[:1]
    for number in range(60):  # 60 addresses guessing at 60 users
        one.failed(f"10.0.0.{number}", f"user{number}", NOON)
    db = one.shared._open()

    def rows(table: str) -> int:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    assert rows("login_failures") <= 20 + 3 * 10  # the limit, and what came since a prune
    assert rows("login_suspects") <= 20 + 10
    for number in range(20):  # much later: everything before is quiet and forgiven
        one.failed(f"10.0.1.{number}", "carol", NOON + 1000)
    assert rows("login_failures") <= 21 + 3 * 10
    assert rows("login_lines") <= 2 + 10
    old = db.execute("SELECT count(*) FROM login_failures WHERE last < ?", (NOON + 1,))
    assert old.fetchone()[0] <= 3 * 10  # the old keys went at the last prune


def test_long_user_names_cost_fixed_size_rows(tmp_path: Path) -> None:
    (one,) = _two(tmp_path, free=0, cap=60.0)[:1]
    one.failed("203.0.113.7", "x" * 10000, NOON)
    one.succeeded("203.0.113.7", "y" * 10000)
    db = one.shared._open()
    keys = [
        k
        for (k,) in db.execute(
            "SELECT key FROM login_failures UNION SELECT pair FROM login_trusted"
        )
    ]
    assert len(keys) == 4  # address, pair and user; the trusted pair
    assert all(len(key) < 64 for key in keys)


async def test_workers_share_the_backoff_and_the_only_process_keeps_it_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from vpsrelay import config
    from vpsrelay.access.clientauth import ClientAuth, add_user
    from vpsrelay.errors import TooManyRequests, Unauthorized
    from vpsrelay.upstream import Upstream
    from vpsrelay.upstream.tokens import TokenClient

    users = tmp_path / "htpasswd"
    add_user(users, "alice", "right", rounds=4)
    settings = config.load(None, {}, {
        "data_dir": str(tmp_path / "data"), "auth.enabled": True, "auth.users_file": str(users),
        "auth.failures_before_backoff": 1,
    })  # fmt: skip

    def client_auth() -> ClientAuth:
        return ClientAuth(settings, TokenClient(Upstream(settings, transport=httpx.MockTransport(
            lambda request: httpx.Response(500)))))  # fmt: skip

    alone = client_auth()
    for _ in range(2):
        with pytest.raises(Unauthorized):
            await alone.check_password("alice", "wrong", "203.0.113.7")
    with pytest.raises(TooManyRequests):
        await alone.check_password("alice", "right", "203.0.113.7")
    assert not (tmp_path / "data" / "limits.db").exists()  # counted in memory
    monkeypatch.setenv("_VPSRELAY_WORKER", "1/2")
    one, two = client_auth(), client_auth()
    with pytest.raises(Unauthorized):
        await one.check_password("alice", "wrong", "203.0.113.7")
    with pytest.raises(Unauthorized):
        await two.check_password("alice", "wrong", "203.0.113.7")
    for worker in (one, two):  # two failures in all: the address waits in both workers
        with pytest.raises(TooManyRequests):
            await worker.check_password("alice", "right", "203.0.113.7")
    assert (await two.check_password("alice", "right", "198.51.100.1")).subject == "alice"


def test_checks_running_at_once_in_two_processes_get_the_tries_of_checks_in_turn(
    tmp_path: Path,
) -> None:
    """A check counts as a failure from its start: ten begun at once, five in each process,
    and only `free` + 1 may start; ending them (a failure, an answer-less end) keeps it so."""
    one, two = _two(tmp_path, free=3, cap=60.0)
    starts = [(one, two)[n % 2].start("203.0.113.7", "alice", NOON) for n in range(10)]
    assert [start.refused == 0 for start in starts] == [True] * 4 + [False] * 6
    assert all(start.refused == pytest.approx(1.0) for start in starts[4:])
    one.failed("203.0.113.7", "alice", NOON + 0.5)
    two.failed("203.0.113.7", "alice", NOON + 0.5)
    one.abandoned("203.0.113.7", "alice")  # a full queue: no answer, not counted
    two.succeeded("203.0.113.7", "alice")  # and the right password
    # Two failures in all: the address is free again for two more tries.
    assert one.start("203.0.113.7", "bob", NOON + 0.5).refused == 0
    assert two.start("203.0.113.7", "bob", NOON + 0.5).refused == 0
    assert one.start("203.0.113.7", "bob", NOON + 0.5).refused > 0
    assert two.start("198.51.100.1", "alice", NOON + 0.5).refused == 0  # another address


def test_a_right_pull_token_is_refused_with_its_address_and_counts_nothing(
    tmp_path: Path,
) -> None:
    one, two = _two(tmp_path, free=1, cap=60.0)
    assert one.wrong_pull_token("203.0.113.7", NOON) == 0.0
    assert two.wrong_pull_token("203.0.113.7", NOON) == 0.0
    assert one.wrong_pull_token("203.0.113.7", NOON) == pytest.approx(1.0)  # not counted
    assert two.start("203.0.113.7", "x", NOON, pull_token=True).refused == pytest.approx(1.0)
    assert two.start("203.0.113.7", "x", NOON + 1, pull_token=True) == tokens.Start()
    assert one.address_wait("203.0.113.7", NOON + 1) == 0.0  # nothing counted for it


# --- the same calls, one process in memory or two on one file -------------------------------

ADDRESSES = ["203.0.113.7", "203.0.113.8", "198.51.100.1", "2001:db8:1:2::1", "2001:db8:1:2::9"]
USERS = ["alice", "bob"]
CALLS = [
    "wait",
    "address_wait",
    "pace",
    "pace",
    "failed",
    "failed",
    "failed_address",
    "succeeded",
    "start",
    "start",
    "begin",
    "abandoned",
    "wrong_pull_token",
]
_call = st.tuples(
    st.sampled_from(CALLS),
    st.integers(0, len(ADDRESSES) - 1),
    st.integers(0, len(USERS) - 1),
    st.sampled_from([0.0, 0.0, 0.3, 1.0, 4.0, 9.0, 30.0]),  # time since the call before
    st.integers(0, 1),  # the process that answers
)


def _apply(
    backoff: tokens.PasswordBackoff | SharedBackoff,
    call: tuple[str, int, int, float, int],
    now: float,
) -> object:
    name, address, user = call[0], ADDRESSES[call[1]], USERS[call[2]]
    if name == "wait":
        return backoff.wait(address, user, now)
    if name == "address_wait":
        return backoff.address_wait(address, now)
    if name == "pace":
        return backoff.pace(address, user, now)
    if name == "failed":
        return backoff.failed(address, user, now)
    if name == "failed_address":
        return backoff.failed_address(address, now)
    if name == "start":
        return backoff.start(address, user, now, pull_token=call[1] == 0)
    if name == "begin":
        return backoff.begin(address, user, now)
    if name == "abandoned":
        return backoff.abandoned(address, user)
    if name == "wrong_pull_token":
        return backoff.wrong_pull_token(address, now)
    return backoff.succeeded(address, user)


@hypothesis_settings(max_examples=150, deadline=None)
@given(st.lists(_call, min_size=1, max_size=40))
def test_two_processes_answer_what_one_process_answers(calls) -> None:
    params = {"free": 2, "cap": 20.0, "per_minute": 6.0}
    alone = tokens.PasswordBackoff(**params)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as folder:
        pair = _two(Path(folder), **params)
        now = NOON
        for call in calls:
            now += call[3]
            expected = _apply(alone, call, now)
            got = _apply(pair[call[4]], call, now)
            assert got == expected, (call, now - NOON)
