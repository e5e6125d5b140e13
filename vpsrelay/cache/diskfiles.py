"""The disk store's directory and index: `<data_dir>/blobs/sha256/ab/<hex>`.

`DiskFiles` is the first layer of `DiskStore` (store.py): the layout, the start-up
clean-up (what dead processes left in `tmp/`, the index reconciled with the files), the
lookups (this process's index, else what another process of the relay committed: its
database row, and the file, which is the authority), readers of committed files and of
fills in progress, and the index's writes to SQLite. `DiskSpace` (diskspace.py) adds the
size cap, `DiskFilling` (filling.py) the fills, `DiskStore` the rest of a `BlobStore`.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Self

import trio

from vpsrelay import private_files
from vpsrelay.cache import claims
from vpsrelay.cache.diskreader import DiskReader
from vpsrelay.cache.fills import DiskFill, RemoteFill
from vpsrelay.cache.index import Database, Index, Obj, Tag
from vpsrelay.cache.indexwrites import IndexWrites
from vpsrelay.cache.memory import ManifestMemory
from vpsrelay.cache.storage import StoreStats

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.cache.storage import Fill
    from vpsrelay.config import CacheConfig

log = logging.getLogger("vpsrelay.cache")

READ_THREADS = 2


def as_disk_fill(fill: Fill) -> DiskFill:
    """`fill` as this store made it (`claim` makes only `DiskFill`s)."""
    assert isinstance(fill, DiskFill), "a fill from another store"
    return fill


class DiskFiles:
    """The files and the index of the disk store. Build it with `open_dir` (blocking)."""

    def __init__(self, root: Path, config: CacheConfig, db: Database, index: Index) -> None:
        self.root = root
        self.config = config
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.claims = root / "claims"
        self.db = db
        self.index = index
        self.fills: dict[str, DiskFill] = {}
        self._index_writes = IndexWrites(index, db)
        self._manifests = ManifestMemory()
        # Few threads read cached files: each thread that allocates gets its own malloc
        # arena, and 20 streams reading in 20 threads held ~45 MiB more at peak.
        self._read_limiter: trio.CapacityLimiter | None = None

    # --- opening, reconciling, closing (blocking: run in a thread or at start)

    @classmethod
    def open_dir(cls, root: Path, config: CacheConfig) -> Self:
        """Create the layout, drop leftovers of a crash, reconcile the index with disk."""
        private_files.make_dir(root / "blobs" / "sha256")
        tmp = root / "tmp"
        private_files.make_dir(tmp)
        private_files.make_dir(root / "claims")
        # Other processes of this relay may be filling: only what no live one holds goes.
        removed = claims.remove_leftovers(root / "claims", tmp)
        if removed:
            log.info("cache: removed %d partial file(s) left by an earlier run", removed)
        db = Database(root / "cache.db")
        index = db.load()
        store = cls(root, config, db, index)
        store._reconcile()
        return store

    def _reconcile(self) -> None:
        on_disk: dict[str, int] = {}
        base = self.blobs / "sha256"
        for prefix in os.scandir(base):
            if not prefix.is_dir():
                continue
            for entry in os.scandir(prefix.path):
                if len(entry.name) == 64 and entry.name[:2] == prefix.name:
                    on_disk[f"sha256:{entry.name}"] = entry.stat().st_size
        now = time.time()
        for digest in list(self.index.objects):
            if on_disk.get(digest) != self.index.objects[digest].size:
                self.index.remove(digest)
        for digest, size in on_disk.items():
            if digest in self.index.objects:
                continue
            stored = self.db.read_object(digest)  # another process committed it just now
            if stored is not None and stored.size == size:
                self.index.adopt(digest, stored)
                continue
            # Renamed into place (verified) but the index write was lost: keep it.
            self.index.recover(digest, Obj(size, now, "blob"))
        self.db.write(self.index.take_writes())

    async def aclose(self) -> None:
        await self.flush(force=True)
        await trio.to_thread.run_sync(self.db.close)

    async def flush(self, *, force: bool = False) -> None:
        """Write the index's changes to SQLite, at most every few seconds unless forced."""
        self._sweep_remote_fills()
        await self._index_writes.flush(force=force)

    def _sweep_remote_fills(self) -> None:
        """Settle other processes' fills whose local readers all left: their descriptors
        would otherwise keep a finished (or removed) temporary file open."""
        for fill in list(self.fills.values()):
            if isinstance(fill, RemoteFill) and fill.readers == 0:
                fill.refresh()

    # --- lookups

    def path(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.blobs / algorithm / hexpart[:2] / hexpart

    def get(self, digest: str) -> Obj | None:
        """What is stored under `digest`: in memory, else what another process of this relay
        committed (its database row, and the file, which is the authority)."""
        obj = self.index.objects.get(digest)
        if obj is not None:
            return obj
        obj = self.db.read_object(digest)
        if obj is None:
            return None
        try:
            if os.stat(self.path(digest)).st_size != obj.size:
                return None
        except FileNotFoundError:
            return None
        self.index.adopt(digest, obj)
        return obj

    def adopt_file(self, digest: str) -> Obj | None:
        """The file under `blobs/` for `digest`, known from now on, or None if there is none.

        A file there is verified by construction (renamed only after its digest matched),
        so one without a row (its writer's index write failed, or is still to come) is
        served, not fetched again: its row, if any, else its stat'd size as a blob.
        """
        try:
            size = os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None
        stored = self.db.read_object(digest)
        if stored is not None and stored.size == size:
            self.index.adopt(digest, stored)
            return stored
        obj = Obj(size, time.time(), "blob")
        self.index.recover(digest, obj)
        return obj

    def reread_tag(self, registry: str, repository: str, tag: str) -> Tag | None:
        """The tag as the database has it, if another process checked it more recently."""
        key = (registry, repository, tag)
        stored = self.db.read_tag(key)
        known = self.index.tags.get(key)
        if stored is not None and (known is None or stored.checked_at > known.checked_at):
            self.index.tags[key] = stored
            return stored
        return known

    def reread_origins(self, digest: str) -> None:
        """Learn the repositories other processes saw holding `digest`."""
        for registry, repository in self.db.read_origins(digest):
            self.index.origins.setdefault(digest, set()).add((registry, repository))

    def reread_public(self, registry: str, repository: str) -> None:
        """Learn whether another process saw `registry/repository` served anonymously."""
        checked_at = self.db.read_public(registry, repository)
        if checked_at is not None and checked_at > self.index.public.get((registry, repository), 0):
            self.index.public[(registry, repository)] = checked_at

    # --- readers, names, figures

    def open(self, digest: str) -> DiskReader | None:
        """A reader of a committed object, or None if its file is gone."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.warning("cache: %s is indexed but its file is gone", digest)
            self.index.forget(digest)
            return None
        return DiskReader(fd, self._limiter())

    def open_fill(self, fill: Fill) -> DiskReader:
        """A reader of a streaming fill's temporary file (its own descriptor: the fill's
        may be closed when it commits while this one still reads)."""
        return DiskReader(os.dup(as_disk_fill(fill).fd), self._limiter())

    def _claim_path(self, digest: str) -> Path:
        return self.claims / digest.partition(":")[2]

    def _tmp_name(self, digest: str) -> str:
        # Unique among every process and run: a joiner opens it by this name.
        return f"{digest.partition(':')[2]}.{os.getpid()}.{secrets.token_hex(6)}"

    def stats(self) -> StoreStats:
        return StoreStats(len(self.index.objects), self.index.used, len(self.fills))

    def _limiter(self) -> trio.CapacityLimiter:
        if self._read_limiter is None:  # made in Trio: `open_dir` runs in a thread
            self._read_limiter = trio.CapacityLimiter(READ_THREADS)
        return self._read_limiter
