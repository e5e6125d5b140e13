"""Limit state every process of one relay shares: `<data_dir>/limits.db`.

Workers of one relay (and any processes started on one data dir) must hold one client to
one rate, one stream count and one traffic budget, so the state is on disk, in SQLite
(WAL mode), not in a process's memory:

* `rate`: a token bucket per client key (`core.access.TokenBucket` state, wall clock).
* `slots`: streams open per (kind, client key, owner process). An owner holds an `flock`
  on its file under `<data_dir>/run/limits/` for its whole life; the kernel drops that
  lock when the process dies, however it dies, so a slot whose owner's file is missing
  or unlocked is a dead process's and is reaped (when a count is at its limit, and when
  a process opens the store).
* `budget`: bytes per budget counter (`total|2026-12-07`, `user:alice|2026-12`) granted
  to processes: what they sent and what they may still send (`core.access.BudgetShare`).
  Persistent; a process that dies loses what it was granted and did not send (counted
  as served, never handed out twice).
* `login_*`: the failed-login backoff (`core.tokens.PasswordBackoff`): failures per
  address, (user, address) and user key, each guessed-at user's line of turns (its
  suspects and the turns waiting) and the (user, address) pairs that logged in. A check
  loads the slice of it that concerns its address and user, runs the policy on it and
  saves it back, in one transaction (`login_state`).

Every write is one short `BEGIN IMMEDIATE` transaction, run synchronously (tens of
microseconds: a thread hop would cost more) under an exclusive `flock` on
`limits.lock`, so writers queue in the kernel, which wakes the next one at once, instead
of in SQLite's busy handler, which sleeps in steps of milliseconds. Commits are not
fsynced (`synchronous = NORMAL`), and the WAL is checkpointed (the one step that
fsyncs) by a thread, never by a request: after a power loss the last moments of
counting may be lost, never a half-written database. A write waits for the lock at most
`LOCK_WAIT`, so a stalled disk cannot stall the event loop for longer.

The state is an aid to the limits, not a condition of serving: a write that fails (a
full disk, a lock held too long) makes the rate and the stream counts fall back to this
process's own (logged once, counted in `fallbacks`); a stream released meanwhile is owed
to the rows and written at this process's next write. Only the traffic budget fails
closed (`LimitsUnavailable`): it bounds what the operator pays for.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

from vpsrelay import private_files, worker_identity
from vpsrelay.core import access, tokens
from vpsrelay.errors import RelayError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

log = logging.getLogger("vpsrelay.guard")

DB_FILE = "limits.db"
LOCK_FILE = "limits.lock"
LEGACY_BUDGET_FILE = "budget.json"  # one process's budget, before limits.db
# Rate buckets that have refilled are the same as none: forgotten every this many checks.
PRUNE_EVERY = 1024
# The longest a write waits for another process's: then it is done without the database.
LOCK_WAIT = 0.05
# Seconds between WAL checkpoints, which fsync, in a thread off the event loop.
CHECKPOINT_EVERY = 2.0
# Held while a checkpoint thread is inside SQLite, and across a fork: a child forked then
# would inherit SQLite's mutexes held by a thread it does not have.
_IN_SQLITE = threading.Lock()
os.register_at_fork(
    before=_IN_SQLITE.acquire,
    after_in_parent=_IN_SQLITE.release,
    after_in_child=_IN_SQLITE.release,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate (key TEXT PRIMARY KEY, tokens REAL NOT NULL, last REAL NOT NULL);
CREATE TABLE IF NOT EXISTS slots (
    kind TEXT NOT NULL, key TEXT NOT NULL, owner TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (kind, key, owner)
);
CREATE TABLE IF NOT EXISTS budget (key TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS login_failures (
    key TEXT PRIMARY KEY, count INTEGER NOT NULL, last REAL NOT NULL, next_start REAL NOT NULL,
    pending INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS login_lines (
    user_key TEXT PRIMARY KEY, suspect_next REAL NOT NULL, newcomer_next REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS login_suspects (
    user_key TEXT NOT NULL, client TEXT NOT NULL, seen REAL NOT NULL,
    PRIMARY KEY (user_key, client)
);
CREATE TABLE IF NOT EXISTS login_queued (
    user_key TEXT NOT NULL, client TEXT NOT NULL, start REAL NOT NULL,
    PRIMARY KEY (user_key, client)
);
CREATE TABLE IF NOT EXISTS login_trusted (pair TEXT PRIMARY KEY, seen REAL NOT NULL);
"""


class LimitsUnavailable(RelayError):
    """The shared limit state cannot be read or written: refuse rather than not count."""

    status = 503
    code = "UNAVAILABLE"


class SharedLimits:
    """This process's handle on the shared limit state; opened at first use."""

    def __init__(self, data_dir: Path, *, local_only: bool = False) -> None:
        """`local_only`: the process is the relay's only one (`workers = 1`), so its
        stream counts are kept in memory alone (the budget still in the database)."""
        self.local_only = local_only
        self.local = access.SlotCounts()  # this process's streams, as they really are
        self._owed: set[tuple[str, str]] = set()  # (kind, key)s whose rows are not `local`'s
        self.fallbacks = 0  # checks done without the database, since it could not be used
        self._failing = False
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()
        self.data_dir = data_dir
        self.path = data_dir / DB_FILE
        self.owners_dir = worker_identity.run_dir(data_dir) / "limits"
        self.owner = ""  # named at first use, in the process that uses it
        self._pid = 0
        self._db: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._owner_fd = -1
        self._rate_checks = 0
        self._login_writes = 0

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        # First use, or first in a child forked after its parent opened the store: a
        # child shares no connection, lock or owner name with its parent.
        self._db = None
        try:
            return self._open_new()
        except BaseException:
            # Tried again at the next write (a disk full at start): nothing left open.
            for fd in (self._lock_fd, self._owner_fd):
                if fd >= 0:
                    os.close(fd)
            self._lock_fd = self._owner_fd = -1
            raise

    def _open_new(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # a forked child holds none of its parent's streams
            self.local = access.SlotCounts()
            self._owed = set()
        self._pid = os.getpid()
        self.owner = f"{self._pid}-{secrets.token_hex(4)}"
        private_files.make_dir(self.owners_dir)
        # The owner's lock is taken before any slot is counted under its name.
        self._owner_fd = private_files.open_file(self.owners_dir / f"{self.owner}.lock", os.O_RDWR)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = private_files.open_file(self.data_dir / LOCK_FILE, os.O_RDWR)
        os.close(private_files.open_file(self.path, os.O_RDWR))  # 0600 before SQLite makes it
        # Writers queue on the flock: SQLite waits only for a writer outside the relay.
        db = sqlite3.connect(
            self.path, timeout=LOCK_WAIT, isolation_level=None, check_same_thread=False
        )
        try:
            self._set_up(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        self._stop_checkpoints = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="limits-checkpoint", daemon=True
        )
        self._checkpointer.start()
        return db

    def _set_up(self, db: sqlite3.Connection) -> None:
        with self._locked():
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread's work
            db.executescript(_SCHEMA)
            self._import_legacy_budget(db)
            self._reap(db, db.execute("SELECT DISTINCT owner FROM slots").fetchall())
            self._forget_dead_owner_files()

    def _checkpoint_loop(self) -> None:
        """Move the WAL into the database every few seconds, with its own connection."""
        stop = self._stop_checkpoints
        db: sqlite3.Connection | None = None
        try:
            while not stop.wait(CHECKPOINT_EVERY):
                with _IN_SQLITE:
                    try:
                        if db is None:
                            db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
                        # PASSIVE: never waits for a writer, so never holds one up either.
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:
                        log.debug("limits.db checkpoint: %s", exc)
        finally:
            if db is not None:
                with _IN_SQLITE:
                    db.close()

    def _forget_dead_owner_files(self) -> None:
        """Owner files of processes gone that held no slot (a clean exit, say)."""
        for path in self.owners_dir.glob("*.lock"):
            owner = path.name.removesuffix(".lock")
            if owner != self.owner:
                self._alive(owner)  # unlinks a dead owner's file

    def close(self) -> None:
        """Give up this process's slots and its owner lock (a clean exit)."""
        if self._db is None:
            return
        self._stop_checkpoints.set()
        if self._checkpointer is not None and self._pid == os.getpid():
            self._checkpointer.join(timeout=5)
        with contextlib.suppress(LimitsUnavailable), self._write() as db:
            db.execute("DELETE FROM slots WHERE owner = ?", (self.owner,))
        self._db.close()
        self._db = None
        for fd in (self._lock_fd, self._owner_fd):
            os.close(fd)
        with contextlib.suppress(OSError):
            (self.owners_dir / f"{self.owner}.lock").unlink()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The write lock, waited for at most `LOCK_WAIT` (on the event loop: bounded).

        Raises:
            BlockingIOError: another process held it all that time.
        """
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.0005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.008)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, every other process's writes queued behind it.

        Raises:
            LimitsUnavailable: the database or its lock cannot be used.
        """
        with self._unavailable_on_error():
            db = self._open()
            with self._locked():
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")

    def _import_legacy_budget(self, db: sqlite3.Connection) -> None:
        """Once per data dir: the counters of `budget.json` (kept, no longer written)."""
        if db.execute("SELECT 1 FROM meta WHERE name = 'legacy_budget'").fetchone():
            return
        legacy = self.data_dir / LEGACY_BUDGET_FILE
        counters: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError):
            try:
                counters = access.parse_budget_state(json.loads(legacy.read_text("utf-8")))
            except ValueError:
                log.error("%s is not valid JSON; its traffic counts are not imported", legacy)
        db.execute("BEGIN IMMEDIATE")
        for key, value in counters.items():
            db.execute(
                "INSERT INTO budget VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET bytes = max(bytes, excluded.bytes)",
                (key, value),
            )
        db.execute("INSERT INTO meta VALUES ('legacy_budget', 'imported')")
        db.execute("COMMIT")

    # -- request rate ------------------------------------------------------------------------

    def rate_wait(self, key: str, rate: float, burst: float, now: float) -> float:
        """Take one request from `key`'s bucket: 0, or the seconds until there is one.

        Raises:
            LimitsUnavailable: the database cannot be used (the caller counts alone).
        """
        with self._write() as db:
            bucket = access.TokenBucket(rate, burst, now)
            row = db.execute("SELECT tokens, last FROM rate WHERE key = ?", (key,)).fetchone()
            if row is not None:
                # A `last` ahead of `now` is a clock stepped back: refill from now on.
                bucket.tokens, bucket.last = min(float(row[0]), burst), min(float(row[1]), now)
            wait = bucket.take(now)
            db.execute(
                "INSERT INTO rate VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                "SET tokens = excluded.tokens, last = excluded.last",
                (key, bucket.tokens, bucket.last),
            )
            self._rate_checks += 1
            if self._rate_checks % PRUNE_EVERY == 0:
                # Full buckets, and those stamped in the future (a clock stepped back).
                db.execute("DELETE FROM rate WHERE last < ? OR last > ?", (now - burst / rate, now))
        return wait

    # -- streams -----------------------------------------------------------------------------

    def acquire(self, kind: str, key: str, limit: int) -> bool:
        """One more `kind` stream for `key`, unless `key` has `limit` open in all processes
        (in this process alone when the database cannot be used, or with `local_only`)."""
        if self.local_only:
            taken = self.local.get(kind, key) < limit
        else:
            try:
                with self._write() as db:
                    paid = self._pay_owed(db)
                    taken = self._acquire_row(db, kind, key, limit)
                self._owed -= paid
            except LimitsUnavailable:
                self.fallbacks += 1
                taken = self.local.get(kind, key) < limit
                if taken:
                    self._owed.add((kind, key))
        if taken:
            self.local.add(kind, key)
        return taken

    def _acquire_row(self, db: sqlite3.Connection, kind: str, key: str, limit: int) -> bool:
        if self._count(db, kind, key) >= limit:
            owners = db.execute(
                "SELECT DISTINCT owner FROM slots WHERE kind = ? AND key = ?", (kind, key)
            ).fetchall()
            if not self._reap(db, owners) or self._count(db, kind, key) >= limit:
                return False
        db.execute(
            "INSERT INTO slots VALUES (?, ?, ?, 1) ON CONFLICT (kind, key, owner) "
            "DO UPDATE SET n = n + 1",
            (kind, key, self.owner),
        )
        return True

    def release(self, kind: str, key: str) -> None:
        """Give back a stream `acquire` granted. Never raises (it runs in `finally`s): a
        release the database cannot take now is owed, and written at the next write."""
        self.local.remove(kind, key)
        if self.local_only:
            return
        self._owed.add((kind, key))
        try:
            with self._write() as db:
                paid = self._pay_owed(db)
            self._owed -= paid
        except LimitsUnavailable:
            self.fallbacks += 1

    def settle(self) -> None:
        """Write what is owed, if anything: called every few seconds, so a worker that went
        quiet after the database failed still gives back the streams it no longer holds."""
        if self.local_only or not self._owed:
            return
        try:
            with self._write() as db:
                paid = self._pay_owed(db)
            self._owed -= paid
        except LimitsUnavailable:
            self.fallbacks += 1

    def _pay_owed(self, db: sqlite3.Connection) -> set[tuple[str, str]]:
        """Set this process's rows to its real counts where they may differ."""
        for kind, key in self._owed:
            n = self.local.get(kind, key)
            where = (kind, key, self.owner)
            if n:
                db.execute(
                    "INSERT INTO slots VALUES (?, ?, ?, ?) ON CONFLICT (kind, key, owner) "
                    "DO UPDATE SET n = excluded.n",
                    (*where, n),
                )
            else:
                db.execute("DELETE FROM slots WHERE kind = ? AND key = ? AND owner = ?", where)
        # Paid once the transaction commits: the caller then forgets what this returns.
        return set(self._owed)

    @property
    def owed(self) -> int:
        """(kind, key)s whose rows wait for a write to match this process's counts."""
        return len(self._owed)

    def count(self, kind: str, key: str) -> int:
        """Streams `key` has open in all live processes (dead ones' slots may still count)."""
        if self.local_only:
            return self.local.get(kind, key)
        with self._unavailable_on_error():
            return self._count(self._open(), kind, key)

    @staticmethod
    def _count(db: sqlite3.Connection, kind: str, key: str) -> int:
        row = db.execute(
            "SELECT coalesce(sum(n), 0) FROM slots WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return int(row[0])

    def _reap(self, db: sqlite3.Connection, owners: Iterable[tuple[str]]) -> int:
        """Delete the slots of the `owners` that are dead; how many were."""
        dead = [owner for (owner,) in owners if owner != self.owner and not self._alive(owner)]
        for owner in dead:
            db.execute("DELETE FROM slots WHERE owner = ?", (owner,))
            log.warning("released the stream slots of process %s, which ended", owner)
        return len(dead)

    def _alive(self, owner: str) -> bool:
        path = self.owners_dir / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its owner holds it
        finally:
            os.close(fd)  # closing drops the lock we may have taken
        with contextlib.suppress(OSError):
            path.unlink()
        return False

    # -- traffic budget ----------------------------------------------------------------------

    def budget_totals(self, keys: Iterable[str]) -> dict[str, int]:
        """The bytes granted under each of `keys` (absent: none)."""
        keys = list(keys)
        if not keys:
            return {}
        marks = ",".join("?" * len(keys))
        with self._unavailable_on_error():
            db = self._open()
            rows = db.execute(f"SELECT key, bytes FROM budget WHERE key IN ({marks})", keys)
            return {str(key): int(value) for key, value in rows}

    def grant(self, key: str, need: int, limit: int | None, *, extra: int = 0) -> tuple[int, int]:
        """Grant `need` bytes under `key` (fewer if `limit` has not that much left; None:
        no limit, for bytes already sent) and up to `extra` more, at most a quarter of what
        would be left, so that a nearly spent budget is not all granted to one process
        that may not need it; (the key's total after, bytes granted)."""
        with self._write() as db:
            row = db.execute("SELECT bytes FROM budget WHERE key = ?", (key,)).fetchone()
            if row is None:  # a new period's first grant: forget the periods that ended
                self._forget_older_periods(db, key.rpartition("|")[2])
            total = int(row[0]) if row is not None else 0
            if limit is None:
                got = max(0, need)
            else:
                left = max(0, limit - total)
                got = min(need, left) + min(extra, max(0, left - need) // 4)
            if got:
                total += got
                db.execute(
                    "INSERT INTO budget VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET bytes = excluded.bytes",
                    (key, total),
                )
        return total, got

    def give_back(self, key: str, amount: int) -> int:
        """Return `amount` granted and not sent; the key's total after."""
        with self._write() as db:
            row = db.execute("SELECT bytes FROM budget WHERE key = ?", (key,)).fetchone()
            if row is None:
                return 0
            total = max(0, int(row[0]) - amount)
            db.execute("UPDATE budget SET bytes = ? WHERE key = ?", (total, key))
        return total

    @staticmethod
    def _forget_older_periods(db: sqlite3.Connection, period: str) -> None:
        """Delete the counters of the days (or months, as `period` is) before `period`."""
        pattern = "%|" + "_" * len(period)
        db.execute(
            "DELETE FROM budget WHERE key LIKE ? AND substr(key, -?) < ?",
            (pattern, len(period), period),
        )

    @contextlib.contextmanager
    def _unavailable_on_error(self) -> Iterator[None]:
        """Raises:
        LimitsUnavailable: from any error of the database or its lock (logged once, until
            the database works again).
        """
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "cannot use the shared limit state in %s: %s; the request rate and "
                    "stream counts are this process's own until it works again (the "
                    "traffic budget refuses downloads meanwhile)", self.path, exc,
                )  # fmt: skip
            raise LimitsUnavailable(
                "the relay cannot count its limits now; try again later",
                reason="limits_unavailable",
                headers=(("retry-after", "5"),),
            ) from exc
        if self._failing:
            self._failing = False
            log.warning("the shared limit state in %s works again", self.path)

    # -- failed logins -----------------------------------------------------------------------

    def login_snapshot(self, keys: tokens.BackoffKeys, now: float) -> tokens.BackoffSlice:
        """The backoff state of `keys` as it is, read without a write transaction (for a
        decision that changes nothing: a right pull token's address may wait).

        Raises:
            LimitsUnavailable: the database cannot be read.
        """
        with self._unavailable_on_error():
            return _load_logins(self._open(), keys, now)

    @contextlib.contextmanager
    def login_state(
        self, keys: tokens.BackoffKeys, now: float, *, quiet: float, limit: int
    ) -> Iterator[tokens.BackoffSlice]:
        """The backoff state a check of `keys` reads and writes, saved as the caller left
        it, in one transaction (no other process's check comes between).

        `quiet`: rows untouched this long (after their last failure or turn) are forgotten
        (the policy forgives sooner); `limit`: rows of each kind kept at most, the oldest
        going first (both checked every `PRUNE_EVERY` saves that wrote).

        Raises:
            LimitsUnavailable: the database or its lock cannot be used.
        """
        with self._write() as db:
            before = _load_logins(db, keys, now)
            part = copy.deepcopy(before)
            line = part.line
            yield part
            dropped = line is not None and part.line is not line
            if _save_logins(db, keys, before, part, now, dropped=dropped):
                self._login_writes += 1
                if self._login_writes % PRUNE_EVERY == 0:
                    _prune_logins(db, now - quiet, limit)


def _load_logins(
    db: sqlite3.Connection, keys: tokens.BackoffKeys, now: float
) -> tokens.BackoffSlice:
    part = tokens.BackoffSlice()
    for key in (keys.address, keys.pair, keys.user):
        row = db.execute(
            "SELECT count, last, next_start, pending FROM login_failures WHERE key = ?", (key,)
        ).fetchone()
        if row is not None:
            count, last, next_start, pending = int(row[0]), float(row[1]), float(row[2]), row[3]
            part.failures[key] = tokens.Failures(count, last, next_start, int(pending))
    row = db.execute(
        "SELECT suspect_next, newcomer_next FROM login_lines WHERE user_key = ?", (keys.user,)
    ).fetchone()
    if row is not None:
        line = tokens.UserLine(suspect_next=float(row[0]), newcomer_next=float(row[1]))
        where = "WHERE user_key = ? AND client = ?"
        if db.execute(f"SELECT 1 FROM login_suspects {where}", (keys.user, keys.client)).fetchone():
            line.suspects[keys.client] = None
        queued = db.execute(
            f"SELECT start FROM login_queued {where} AND start > ?", (keys.user, keys.client, now)
        ).fetchone()
        if queued is not None:
            line.queued[keys.client] = float(queued[0])
        part.line = line
    part.trusted = bool(
        db.execute("SELECT 1 FROM login_trusted WHERE pair = ?", (keys.pair,)).fetchone()
    )
    return part


def _save_logins(
    db: sqlite3.Connection,
    keys: tokens.BackoffKeys,
    before: tokens.BackoffSlice,
    after: tokens.BackoffSlice,
    now: float,
    *,
    dropped: bool,
) -> bool:
    """Write what changed from `before` to `after` (`dropped`: the user's line was dropped
    on the way, and maybe made anew); whether anything was written."""
    wrote = False
    for key in (keys.address, keys.pair, keys.user):
        old, new = before.failures.get(key), after.failures.get(key)
        if new is None and old is not None:
            db.execute("DELETE FROM login_failures WHERE key = ?", (key,))
            wrote = True
        elif new is not None and new != old:
            db.execute(
                "INSERT INTO login_failures VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE "
                "SET count = excluded.count, last = excluded.last, "
                "next_start = excluded.next_start, pending = excluded.pending",
                (key, new.count, new.last, new.next_start, new.pending),
            )
            wrote = True
    user, client = keys.user, keys.client
    old_line, line = before.line, after.line
    if old_line is not None and (line is None or dropped):
        # The user's line is gone (forgiven, or a success), maybe made anew since.
        for table in ("login_lines", "login_suspects", "login_queued"):
            db.execute(f"DELETE FROM {table} WHERE user_key = ?", (user,))
        wrote = True
        old_line = None
    if line is not None:
        times = (line.suspect_next, line.newcomer_next)
        if old_line is None or times != (old_line.suspect_next, old_line.newcomer_next):
            db.execute(
                "INSERT INTO login_lines VALUES (?, ?, ?) ON CONFLICT (user_key) DO UPDATE "
                "SET suspect_next = excluded.suspect_next, newcomer_next = excluded.newcomer_next",
                (user, *times),
            )
            wrote = True
        failed_now = _count(after, user) > _count(before, user)
        was_suspect = old_line is not None and client in old_line.suspects
        if client in line.suspects and (failed_now or not was_suspect):
            db.execute(
                "INSERT INTO login_suspects VALUES (?, ?, ?) ON CONFLICT (user_key, client) "
                "DO UPDATE SET seen = excluded.seen",
                (user, client, now),
            )
            # The newest `MAX_SUSPECTS_PER_USER` are remembered (as in one process).
            db.execute(
                "DELETE FROM login_suspects WHERE user_key = ? AND client IN (SELECT client "
                "FROM login_suspects WHERE user_key = ? ORDER BY seen DESC LIMIT -1 OFFSET ?)",
                (user, user, tokens.MAX_SUSPECTS_PER_USER),
            )
            wrote = True
        start = line.queued.get(client)
        old_start = None if old_line is None else old_line.queued.get(client)
        if start != old_start:
            if start is None:
                db.execute(
                    "DELETE FROM login_queued WHERE user_key = ? AND client = ?", (user, client)
                )
            else:
                db.execute(
                    "INSERT INTO login_queued VALUES (?, ?, ?) ON CONFLICT (user_key, client) "
                    "DO UPDATE SET start = excluded.start",
                    (user, client, start),
                )
            db.execute("DELETE FROM login_queued WHERE user_key = ? AND start <= ?", (user, now))
            wrote = True
    if after.trusted and not before.trusted:
        db.execute("INSERT INTO login_trusted VALUES (?, ?)", (keys.pair, now))
        wrote = True
    return wrote


def _count(part: tokens.BackoffSlice, key: str) -> int:
    failures = part.failures.get(key)
    return 0 if failures is None else failures.count


def _prune_logins(db: sqlite3.Connection, quiet_before: float, limit: int) -> None:
    """Forget what has been quiet long enough, then the oldest past `limit` of each kind."""
    db.execute("DELETE FROM login_failures WHERE max(last, next_start) < ?", (quiet_before,))
    db.execute(
        "DELETE FROM login_failures WHERE key IN (SELECT key FROM login_failures "
        "ORDER BY max(last, next_start) DESC LIMIT -1 OFFSET ?)",
        (limit,),
    )
    db.execute("DELETE FROM login_lines WHERE user_key NOT IN (SELECT key FROM login_failures)")
    for table in ("login_suspects", "login_queued"):
        db.execute(f"DELETE FROM {table} WHERE user_key NOT IN (SELECT user_key FROM login_lines)")
    db.execute(
        "DELETE FROM login_suspects WHERE rowid IN (SELECT rowid FROM login_suspects "
        "ORDER BY seen DESC LIMIT -1 OFFSET ?)",
        (limit,),
    )
    db.execute(
        "DELETE FROM login_trusted WHERE pair IN (SELECT pair FROM login_trusted "
        "ORDER BY seen DESC LIMIT -1 OFFSET ?)",
        (limit,),
    )
