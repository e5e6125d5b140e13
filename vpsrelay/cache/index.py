"""The cache's index: what is stored, when it was last used, which repositories hold it.

The truth at run time is in memory (a cache hit touches no database); a small
SQLite file (`<data_dir>/cache.db`) keeps it across restarts. Why SQLite rather
than rebuilding from the files: last-use times (the LRU order) cannot be
recovered from disk reliably (`noatime` mounts), and tag -> digest mappings,
repository membership and "public" marks are needed to serve a pull when the
upstream is down right after a restart. The blob files stay the authority for
*what exists*: at start the index is reconciled with the directory, so a file
lost or added behind the index's back is noticed.

Several processes of one relay (the workers) share the file: each keeps its own
memory, writes only increments (counters) and monotonic times (last use), writes
objects and tags through at once, and reads another's objects and tags on a miss.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vpsrelay import private_files

if TYPE_CHECKING:
    from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, last_used REAL NOT NULL,
    kind TEXT NOT NULL, media_type TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS origins (
    digest TEXT NOT NULL, registry TEXT NOT NULL, repository TEXT NOT NULL,
    PRIMARY KEY (digest, registry, repository));
CREATE TABLE IF NOT EXISTS tags (
    registry TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL,
    digest TEXT NOT NULL, checked_at REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag));
CREATE TABLE IF NOT EXISTS public (
    registry TEXT NOT NULL, repository TEXT NOT NULL, checked_at REAL NOT NULL,
    PRIMARY KEY (registry, repository));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

COUNTERS = (
    "hits",
    "misses",
    "joins",
    "bytes_from_cache",
    "bytes_from_upstream",
    "digest_mismatches",
    "evictions",
    "stale_served",
    "revalidations",
    "passthrough_no_space",
    "write_errors",
    "bucket_failovers",  # hits finished from the upstream after the bucket failed mid-body
)


@dataclass(slots=True)
class Obj:
    size: int
    last_used: float
    kind: str  # "blob" or "manifest"
    media_type: str = ""


@dataclass(slots=True)
class Tag:
    digest: str
    checked_at: float


@dataclass(slots=True)
class Index:
    """In-memory index with write-behind persistence. Wall-clock times (seconds)."""

    objects: dict[str, Obj] = field(default_factory=dict)
    # digest -> {(registry, repository)} that the upstream showed to hold it
    origins: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    tags: dict[tuple[str, str, str], Tag] = field(default_factory=dict)
    public: dict[tuple[str, str], float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    _dirty_used: set[str] = field(default_factory=set)
    _used: int = 0  # sum of the objects' sizes, kept as they come and go (read per request)
    _ops: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    _counted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def used(self) -> int:
        return self._used

    def count(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def touch(self, digest: str, now: float) -> None:
        obj = self.objects.get(digest)
        if obj is not None:
            obj.last_used = now
            self._dirty_used.add(digest)

    def add(self, digest: str, obj: Obj) -> None:
        replaced = self.objects.get(digest)
        self._used += obj.size - (replaced.size if replaced is not None else 0)
        self.objects[digest] = obj
        self._ops.append(
            (
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                (digest, obj.size, obj.last_used, obj.kind, obj.media_type),
            )
        )

    def adopt(self, digest: str, obj: Obj) -> None:
        """Know an object another process stored (already in the database)."""
        replaced = self.objects.get(digest)
        self._used += obj.size - (replaced.size if replaced is not None else 0)
        self.objects[digest] = obj

    def recover(self, digest: str, obj: Obj) -> None:
        """Know a verified file whose row was never written; a row that lands first (the
        writer's, with the object's true kind) wins."""
        self.adopt(digest, obj)
        self._ops.append(
            (
                "INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?, ?)",
                (digest, obj.size, obj.last_used, obj.kind, obj.media_type),
            )
        )

    def forget(self, digest: str) -> None:
        """Drop an object from memory only: its file is gone, and whoever removed it removed
        its row (a row written since is another process's new copy: it stays)."""
        removed = self.objects.pop(digest, None)
        if removed is not None:
            self._used -= removed.size
        self._dirty_used.discard(digest)

    def remove(self, digest: str) -> None:
        removed = self.objects.pop(digest, None)
        if removed is not None:
            self._used -= removed.size
        self._dirty_used.discard(digest)
        self._ops.append(("DELETE FROM objects WHERE digest = ?", (digest,)))
        # Membership and tags stay: a re-fetched blob is held by the same repositories,
        # and a tag whose manifest is gone is simply a miss.

    def holds(self, digest: str, registry: str, repository: str) -> bool:
        return (registry, repository) in self.origins.get(digest, ())

    def held_by_registry(self, digest: str, registry: str) -> bool:
        return any(r == registry for r, _ in self.origins.get(digest, ()))

    def add_origin(self, digest: str, registry: str, repository: str) -> None:
        places = self.origins.setdefault(digest, set())
        if (registry, repository) not in places:
            places.add((registry, repository))
            self._ops.append(
                (
                    "INSERT OR IGNORE INTO origins VALUES (?, ?, ?)",
                    (digest, registry, repository),
                )
            )

    def set_tag(self, registry: str, repository: str, tag: str, digest: str, now: float) -> None:
        self.tags[(registry, repository, tag)] = Tag(digest, now)
        self._ops.append(
            (
                "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?, ?)",
                (registry, repository, tag, digest, now),
            )
        )

    def set_public(self, registry: str, repository: str, now: float) -> None:
        self.public[(registry, repository)] = now
        self._ops.append(
            ("INSERT OR REPLACE INTO public VALUES (?, ?, ?)", (registry, repository, now))
        )

    def pending(self) -> bool:
        return bool(self._ops or self._dirty_used) or self.counters != self._counted

    def take_writes(self) -> list[tuple[str, tuple[object, ...]]]:
        """The statements that bring the database up to date; the caller runs them."""
        ops = self._ops
        self._ops = []
        for digest in self._dirty_used:
            obj = self.objects.get(digest)
            if obj is not None:
                ops.append(
                    (
                        # Several processes: the latest use wins, whoever writes last.
                        "UPDATE objects SET last_used = MAX(last_used, ?) WHERE digest = ?",
                        (obj.last_used, digest),
                    )
                )
        self._dirty_used = set()
        for name, value in self.counters.items():
            delta = value - self._counted[name]
            if delta:
                ops.append(
                    (
                        "INSERT INTO counters VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        (name, delta),
                    )
                )
        self._counted = dict(self.counters)
        return ops


class Database:
    """The SQLite file. Every method blocks: call it from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        # Made (or made 0600) before SQLite opens it: SQLite gives its -wal and -shm files
        # the database file's mode.
        os.close(private_files.open_file(path, os.O_RDWR))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # Workers starting together on a new data dir: switching to WAL takes an exclusive
        # lock that SQLite's busy handler does not always wait for ("database is locked"
        # ended a worker at start), so the set-up is one process at a time.
        setup = private_files.open_file(path.with_name(path.name + ".setup"), os.O_RDWR)
        try:
            fcntl.flock(setup, fcntl.LOCK_EX)
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        finally:
            os.close(setup)  # the lock goes with it
        # Point reads from the event loop (another process's object or tag): a connection
        # of their own, which a write in a worker thread never holds up (WAL).
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA busy_timeout=1000")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._reader.close()

    def read_object(self, digest: str) -> Obj | None:
        try:
            row = self._reader.execute(
                "SELECT size, last_used, kind, media_type FROM objects WHERE digest = ?",
                (digest,),
            ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else Obj(*row)

    def read_tag(self, key: tuple[str, str, str]) -> Tag | None:
        try:
            row = self._reader.execute(
                "SELECT digest, checked_at FROM tags "
                "WHERE registry = ? AND repository = ? AND tag = ?",
                key,
            ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else Tag(*row)

    def read_origins(self, digest: str) -> set[tuple[str, str]]:
        try:
            rows = self._reader.execute(
                "SELECT registry, repository FROM origins WHERE digest = ?", (digest,)
            ).fetchall()
        except sqlite3.Error:
            return set()
        return {(registry, repository) for registry, repository in rows}

    def read_public(self, registry: str, repository: str) -> float | None:
        try:
            row = self._reader.execute(
                "SELECT checked_at FROM public WHERE registry = ? AND repository = ?",
                (registry, repository),
            ).fetchone()
        except sqlite3.Error:
            return None
        return None if row is None else float(row[0])

    def sizes(self) -> list[tuple[str, int, float]]:
        """Every stored object's digest, size and last use (for eviction)."""
        with self._lock:
            return list(self._db.execute("SELECT digest, size, last_used FROM objects"))

    def write(self, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        if not ops:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for sql, params in ops:
                    self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def load(self) -> Index:
        index = Index()
        with self._lock:
            db = self._db
            for digest, size, last_used, kind, media_type in db.execute("SELECT * FROM objects"):
                index.objects[digest] = Obj(size, last_used, kind, media_type)
                index._used += size
            for digest, registry, repository in db.execute("SELECT * FROM origins"):
                index.origins.setdefault(digest, set()).add((registry, repository))
            for registry, repository, tag, digest, checked_at in db.execute("SELECT * FROM tags"):
                index.tags[(registry, repository, tag)] = Tag(digest, checked_at)
            for registry, repository, checked_at in db.execute("SELECT * FROM public"):
                index.public[(registry, repository)] = checked_at
            for name, value in db.execute("SELECT * FROM counters"):
                if name in index.counters:
                    index.counters[name] = value
        index._counted = dict(index.counters)
        return index
