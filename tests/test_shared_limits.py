"""The limit state the relay's processes share (`access.shared`), on a real SQLite file.

Two `SharedLimits` on one data dir are two processes as far as the state knows (each has
its own owner lock and connection); a real child process stands in where dying matters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from vpsrelay.access.guard import SharedBudget
from vpsrelay.access.shared import SharedLimits
from vpsrelay.core import access
from vpsrelay.errors import TooManyRequests

REPO_ROOT = Path(__file__).resolve().parents[1]
NOON = 1_795_000_000.0  # 2026-11-18 11:06 UTC


def _pair(data_dir: Path) -> tuple[SharedLimits, SharedLimits]:
    return SharedLimits(data_dir), SharedLimits(data_dir)


def test_one_rate_bucket_for_every_process(tmp_path: Path) -> None:
    one, two = _pair(tmp_path)
    waits = [shared.rate_wait("198.51.100.7", 1.0, 3, NOON) for shared in (one, two, one, two)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(1.0)  # the burst of 3 is spent, whichever process asks
    assert two.rate_wait("198.51.100.8", 1.0, 3, NOON) == 0.0  # another client's own bucket
    assert one.rate_wait("198.51.100.7", 1.0, 3, NOON + 1.0) == 0.0  # refilled


async def test_workers_share_the_rate_and_the_only_process_keeps_it_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpsrelay import config
    from vpsrelay.access.guard import Guard

    settings = config.load(
        None, {}, {"data_dir": str(tmp_path), "limits.requests_per_second": 0.01, "limits.burst": 2}
    )

    def admit(guard: Guard) -> None:
        guard.admit(method="GET", raw_path="/v2/", headers=(), client_ip="192.0.2.9", host="x")

    alone = Guard(settings)
    admit(alone)
    admit(alone)
    with pytest.raises(TooManyRequests):
        admit(alone)
    assert not (tmp_path / "limits.db").exists()  # counted in memory
    monkeypatch.setenv("_VPSRELAY_WORKER", "1/2")
    one, two = Guard(settings), Guard(settings)
    admit(one)
    admit(two)
    with pytest.raises(TooManyRequests) as refused:
        admit(one)  # the burst of 2 is spent by the two workers together
    assert refused.value.reason == "rate_limited"


def test_stream_slots_count_across_processes(tmp_path: Path) -> None:
    one, two = _pair(tmp_path)
    assert one.acquire("streams", "c", 2)
    assert two.acquire("streams", "c", 2)
    assert not one.acquire("streams", "c", 2)
    assert not two.acquire("streams", "c", 2)
    assert two.acquire("upstream", "c", 2)  # another kind has its own count
    assert one.acquire("streams", "d", 2)  # and another client
    one.release("streams", "c")
    assert two.acquire("streams", "c", 2)
    assert one.count("streams", "c") == 2


def test_a_closed_process_gives_its_slots_back(tmp_path: Path) -> None:
    one, two = _pair(tmp_path)
    assert one.acquire("streams", "c", 1)
    one.close()
    assert two.acquire("streams", "c", 1)


_HOLDER = """
import sys, time
from pathlib import Path
from vpsrelay.access.shared import SharedLimits
shared = SharedLimits(Path(sys.argv[1]))
assert shared.acquire("streams", "c", 1)
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_process_slot_is_free_at_once(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"held\n"
        here = SharedLimits(tmp_path)
        assert not here.acquire("streams", "c", 1)  # alive: its slot counts
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        # No cleanup ran in the child: the kernel dropped its owner lock, and that is enough.
        assert here.acquire("streams", "c", 1)
        assert here.count("streams", "c") == 1
        owners = [path.name for path in (tmp_path / "run" / "limits").iterdir()]
        assert owners == [f"{here.owner}.lock"]  # the dead one's file went with its slot
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_the_files_of_owners_gone_without_a_slot_are_removed_at_open(tmp_path: Path) -> None:
    gone = SharedLimits(tmp_path)
    gone.rate_wait("c", 1.0, 1, NOON)
    os.close(gone._owner_fd)  # as the kernel does when the process ends: the lock is dropped
    assert len(list((tmp_path / "run" / "limits").iterdir())) == 1
    here = SharedLimits(tmp_path)
    here.rate_wait("c", 1.0, 1, NOON)
    owners = [path.name for path in (tmp_path / "run" / "limits").iterdir()]
    assert owners == [f"{here.owner}.lock"]


def test_a_child_forked_after_first_use_is_an_owner_of_its_own(tmp_path: Path) -> None:
    shared = SharedLimits(tmp_path)
    assert shared.acquire("streams", "c", 2)
    parent_owner = shared.owner
    pid = os.fork()
    if pid == 0:  # the child: its own name and slot; exits without cleanup
        ok = shared.acquire("streams", "c", 2) and shared.owner != parent_owner
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert shared.owner == parent_owner
    # The child is dead: its slot is reaped, the parent's stays.
    assert shared.acquire("streams", "c", 2)
    assert not shared.acquire("streams", "c", 2)


def test_an_owner_file_removed_under_a_live_slot_is_taken_for_dead(tmp_path: Path) -> None:
    """The supervisor empties `run/` before it starts workers: no slot outlives that."""
    one, two = _pair(tmp_path)
    assert one.acquire("streams", "c", 1)
    for path in (tmp_path / "run" / "limits").iterdir():
        if path.name.startswith(one.owner):
            path.unlink()
    assert two.acquire("streams", "c", 1)


def test_the_database_and_lock_files_are_private(tmp_path: Path) -> None:
    shared = SharedLimits(tmp_path / "data")
    shared.rate_wait("c", 1.0, 1, NOON)
    for name in ("limits.db", "limits.lock"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o077 == 0


# --- the traffic budget, granted to processes ---------------------------------------------


def _send(book: SharedBudget, hold: access.Hold, size: int) -> bool:
    try:
        book.take(hold, size, NOON)
    except TooManyRequests:
        return False
    return True


@hypothesis_settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(1, 900), st.integers(1, 300), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_processes_together_never_serve_past_the_budget(steps) -> None:
    """Downloads in two processes, interleaved: what all of them send stays within the
    limit, and once they are over, the shared counter is what they sent (every unspent
    grant given back)."""
    limit = 2000
    limits = access.BudgetLimits(daily=limit)
    with tempfile.TemporaryDirectory() as folder:
        stores = _pair(Path(folder))
        books = [SharedBudget(limits, shared, 0) for shared in stores]
        for book in books:
            book.budget.lookahead = 100
            book.share.grant = 150
        running: list[tuple[SharedBudget, access.Hold, int]] = []
        served = 0
        for which, length, piece, finish in steps:
            book = books[which]
            try:
                hold = book.open(None, NOON, "c")
            except TooManyRequests:
                hold = None
            if hold is not None:
                try:
                    book.admit(hold, length, NOON)
                    running.append((book, hold, length))
                except TooManyRequests:
                    book.settle(hold, 0, NOON)  # as `Guard.download` does on any refusal
            for owner, hold, length in running:
                size = min(piece, length - hold.sent)
                if size and _send(owner, hold, size):
                    served += size
            assert served <= limit
            if finish and running:
                owner, hold, _ = running.pop(0)
                owner.settle(hold, hold.sent, NOON)
        for owner, hold, _ in running:
            owner.settle(hold, hold.sent, NOON)
        day = "total|2026-11-18"
        assert stores[0].budget_totals([day]).get(day, 0) == served <= limit
        for shared in stores:
            shared.close()


def test_what_a_dead_process_was_granted_stays_spent(tmp_path: Path) -> None:
    limits = access.BudgetLimits(daily=1000)
    stores = _pair(tmp_path)
    one, two = (SharedBudget(limits, shared, 0) for shared in stores)
    for book in (one, two):
        book.budget.lookahead, book.share.grant = 100, 150
    hold = one.open(None, NOON, "c")
    one.admit(hold, 800, NOON)  # granted ahead, then the process dies mid-download
    assert _send(one, hold, 100)
    day = "total|2026-11-18"
    granted = stores[0].budget_totals([day])[day]
    assert 100 <= granted <= 100 + 150 + 100  # what it sent, and its grants ahead
    later = two.open(None, NOON, "c")
    with pytest.raises(TooManyRequests):
        two.admit(later, 1000 - granted + 1, NOON)  # never handed out again
    two.admit(later, 1000 - granted, NOON)


def test_an_error_body_charged_at_its_end_is_counted_for_all(tmp_path: Path) -> None:
    limits = access.BudgetLimits(daily=1000)
    one, two = (SharedBudget(limits, shared, 0) for shared in _pair(tmp_path))
    hold = one.open(None, NOON, "c")
    one.settle(hold, 1000, NOON)  # not metered as it went: charged whole at the end
    with pytest.raises(TooManyRequests):
        two.open(None, NOON, "c")


# --- the token signing key, made by workers starting at once ------------------------------

_KEY_MAKER = """
import sys, time
from pathlib import Path
from vpsrelay.access.clientauth import load_or_create_key
go = Path(sys.argv[2])
deadline = time.monotonic() + 20
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.001)
print(load_or_create_key(Path(sys.argv[1])).hex(), flush=True)
"""


def test_processes_starting_at_once_end_with_one_signing_key(tmp_path: Path) -> None:
    from vpsrelay.access.clientauth import load_or_create_key

    for attempt in range(3):
        key_path, go = tmp_path / f"{attempt}" / "token.key", tmp_path / f"go{attempt}"
        makers = [
            subprocess.Popen(
                [sys.executable, "-c", _KEY_MAKER, str(key_path), str(go)],
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
            for _ in range(6)
        ]
        time.sleep(0.5)  # let them all start waiting
        go.touch()
        keys = set()
        for maker in makers:
            out, _ = maker.communicate(timeout=30)
            assert maker.returncode == 0
            keys.add(out.strip().decode())
        assert keys == {load_or_create_key(key_path).hex()}
        assert not list(key_path.parent.glob(".*.tmp"))


def test_download_counts_hold_across_processes(tmp_path: Path) -> None:
    from vpsrelay import config, download

    settings = config.load(None, {}, {"download.downloads_per_client": 1})
    one, two = (download.Limits(settings.download, shared) for shared in _pair(tmp_path))
    with one.running_for("c"):
        with pytest.raises(TooManyRequests) as refused, two.running_for("c"):
            pass
        assert refused.value.reason == "concurrency_limited"
        with two.running_for("d"):  # another client
            pass
    with two.running_for("c"):  # given back
        pass


def test_a_download_past_midnight_is_charged_to_each_day_in_the_shared_counters(
    tmp_path: Path,
) -> None:
    limits = access.BudgetLimits(daily=1000)
    one, two = (SharedBudget(limits, shared, 0) for shared in _pair(tmp_path))
    one.budget.lookahead = 100
    before, after = NOON, NOON + 14 * 3600  # 2026-11-18 and 01:06 on the 19th
    hold = one.open(None, before, "c")
    one.admit(hold, 500, before)
    for _ in range(3):
        one.take(hold, 100, before)
    one.take(hold, 100, after)  # rolled over: held to the 19th from here
    one.settle(hold, 400, after)
    totals = one.shared.budget_totals(["total|2026-11-18", "total|2026-11-19", "total|2026-11"])
    # The 19th's first grant forgot the 18th (it is over); the month has all 400.
    assert totals == {"total|2026-11-19": 100, "total|2026-11": 400}
    assert "total|2026-11-18" not in one.share.unspent  # the ended day's grants are gone
    later = two.open(None, after, "c")
    two.admit(later, 900, after)  # the 19th has 900 left, whoever asks
    with pytest.raises(TooManyRequests):
        two.admit(later, 901, after)


def test_the_key_is_whole_before_it_has_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that finds `token.key` reads a whole key: never one still being written."""
    from vpsrelay.access.clientauth import load_or_create_key

    path = tmp_path / "token.key"
    named_when_synced = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        named_when_synced.append(path.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    key = load_or_create_key(path)
    assert named_when_synced == [False]
    assert path.read_text().strip() == key.hex()


def test_a_key_made_by_another_process_meanwhile_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpsrelay.access.clientauth import load_or_create_key

    path = tmp_path / "token.key"
    theirs = "ab" * 32
    real_link = os.link

    def link(source: str | Path, target: str | Path) -> None:
        path.write_text(theirs + "\n")  # the other process linked its key first
        real_link(source, target)

    monkeypatch.setattr(os, "link", link)
    assert load_or_create_key(path).hex() == theirs
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_rate_row_stamped_in_the_future_refills_from_now(tmp_path: Path) -> None:
    """Review finding 8: a wall clock stepped back an hour must not lock a client out."""
    shared = SharedLimits(tmp_path)
    assert [shared.rate_wait("c", 1.0, 2, NOON) for _ in range(2)] == [0.0, 0.0]
    back = NOON - 3600.0
    assert shared.rate_wait("c", 1.0, 2, back) == pytest.approx(1.0)
    assert shared.rate_wait("c", 1.0, 2, back + 1.0) == 0.0


def _held_lock(data_dir: Path) -> int:
    """Another process's write, stuck (a stalled disk): its lock on limits.lock held."""
    import fcntl

    fd = os.open(data_dir / "limits.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_stuck_writer_delays_a_check_briefly_and_counts_fall_back(tmp_path: Path) -> None:
    """Review findings 2 and 9a: a lock held for long bounds the wait; the slots are
    counted in this process meanwhile, a release never raises, and the rows match the
    process's real counts at its first write once the database works again."""
    one, two = _pair(tmp_path)
    assert one.acquire("upstream", "c", 2)  # opens the database
    fd = _held_lock(tmp_path)
    try:
        started = time.monotonic()
        assert one.acquire("upstream", "c", 2)  # 2 of 2, counted here alone
        assert not one.acquire("upstream", "c", 2)
        one.release("upstream", "c")
        one.release("upstream", "c")
        assert time.monotonic() - started < 2.0  # four bounded waits, not a hang
        assert one.fallbacks == 4
        assert one.owed == 1
        assert one.local.get("upstream", "c") == 0
    finally:
        os.close(fd)
    assert two.count("upstream", "c") == 1  # one's row from before, stale...
    assert one.acquire("upstream", "c", 2)  # ...until one's next write sets it right
    assert one.owed == 0
    assert two.count("upstream", "c") == 1
    assert two.acquire("upstream", "c", 2)
    one.release("upstream", "c")
    assert two.count("upstream", "c") == 1


def test_the_only_process_counts_its_streams_in_memory(tmp_path: Path) -> None:
    """Review finding 1: `workers = 1` needs no database to count streams."""
    alone = SharedLimits(tmp_path, local_only=True)
    assert alone.acquire("upstream", "c", 1)
    assert not alone.acquire("upstream", "c", 1)
    alone.release("upstream", "c")
    assert alone.acquire("upstream", "c", 1)
    assert not (tmp_path / "limits.db").exists()
