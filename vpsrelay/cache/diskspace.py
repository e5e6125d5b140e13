"""The disk store's size cap: `DiskSpace` adds eviction to `DiskFiles` (diskfiles.py).

Room for an incoming object is made by evicting the least recently used objects
(`core.cachepolicy.plan_eviction`), planned over what every process of the relay stored
(the database, written up to date first) and reserved (their claims), under a lock file
only one process holds at a time. What is read (pinned) or being filled is never evicted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from functools import partial
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files
from vpsrelay.cache import claims
from vpsrelay.cache.diskfiles import DiskFiles
from vpsrelay.cache.fills import RemoteFill
from vpsrelay.cache.memory import Pins
from vpsrelay.core import cachepolicy

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.cache.index import Database, Index
    from vpsrelay.config import CacheConfig

log = logging.getLogger("vpsrelay.cache")


class DiskSpace(DiskFiles):
    """The disk store's files under its size cap (and the disk's minimum free space)."""

    def __init__(self, root: Path, config: CacheConfig, db: Database, index: Index) -> None:
        super().__init__(root, config, db, index)
        self.pins = Pins()
        self.reserved = 0
        self._space_lock = trio.Lock()
        # One process of the relay at a time plans and carries out evictions.
        self._evict_fd = private_files.open_file(root / "evict.lock", os.O_RDWR)

    async def aclose(self) -> None:
        await super().aclose()
        fd, self._evict_fd = self._evict_fd, -1
        if fd >= 0:
            os.close(fd)

    def pinned(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Keep `digest` from eviction while it is read."""
        return self.pins.hold(digest)

    async def make_room(self, incoming: int) -> bool:
        """Evict least recently used objects so `incoming` bytes fit; False: they do not.

        Planned over what every process of the relay stored (the database, written up to
        date first) and reserved (their claims), under a lock only one process holds.
        """
        async with self._space_lock, self._index_writes.lock:
            self._sweep_remote_fills()  # one that ended pins nothing
            pinned = set(self.pins) | set(self.fills)
            led = (d for d, fill in self.fills.items() if not isinstance(fill, RemoteFill))
            own = {self._claim_path(d).name for d in led}  # counted in self.reserved
            plan = partial(self._plan_shared, self.index.take_writes(), incoming, pinned, own)
            try:
                victims, fits, free = await trio.to_thread.run_sync(plan)
            except (OSError, sqlite3.Error) as exc:
                log.warning("cache: cannot make room: %s", exc)
                return False
            if not fits:
                self.index.count("passthrough_no_space")
                log.warning(
                    "cache: no room for %s (cap %s, free %s): passing through",
                    cachepolicy.format_size(incoming),
                    cachepolicy.format_size(self.config.max_size),
                    cachepolicy.format_size(free),
                )
                return False
            for digest in victims:  # their files and rows are gone already
                self._forget(digest)
            self.reserved += incoming
            return True

    def _plan_shared(
        self,
        ops: list[tuple[str, tuple[object, ...]]],
        incoming: int,
        pinned: set[str],
        own: set[str],
    ) -> tuple[list[str], bool, int]:
        """`make_room`'s blocking part, under the relay-wide eviction lock."""
        fcntl.flock(self._evict_fd, fcntl.LOCK_EX)
        try:
            self.db.write(ops)
            stat = os.statvfs(self.root)
            free = stat.f_bavail * stat.f_frsize
            entries = [
                cachepolicy.Entry(digest, size, last_used, digest in pinned)
                for digest, size, last_used in self.db.sizes()
            ]
            used = sum(entry.size for entry in entries)
            reserved = self.reserved + claims.reserved_by_others(self.claims, own)
            victims, fits = cachepolicy.plan_eviction(
                entries,
                used=used + reserved,
                max_size=self.config.max_size,
                free=free,
                min_free=self.config.min_free,
                incoming=incoming,
            )
            if fits and victims:
                for digest in victims:
                    with contextlib.suppress(FileNotFoundError):
                        self.path(digest).unlink()
                self.db.write([("DELETE FROM objects WHERE digest = ?", (d,)) for d in victims])
            return victims, fits, free
        finally:
            fcntl.flock(self._evict_fd, fcntl.LOCK_UN)

    def _forget(self, digest: str) -> None:
        obj = self.index.objects.get(digest)
        self.index.forget(digest)  # its row is deleted already
        self._manifests.forget(digest)
        self.index.count("evictions")
        size = cachepolicy.format_size(obj.size) if obj is not None else "stored elsewhere"
        log.info("cache: evicted %s (%s)", digest, size)

    async def _evict(self, digest: str) -> None:
        obj = self.index.objects.get(digest)
        if obj is None:
            return
        self.index.remove(digest)
        self._manifests.forget(digest)
        self.index.count("evictions")
        log.info("cache: evicted %s (%s)", digest, cachepolicy.format_size(obj.size))
        with contextlib.suppress(FileNotFoundError):
            await trio.to_thread.run_sync(self.path(digest).unlink)

    async def remove(self, digest: str) -> bool:
        """Delete one object (the `cache rm` command's and tests' way in)."""
        if digest in self.pins or digest in self.fills:
            return False
        await self._evict(digest)
        return True
