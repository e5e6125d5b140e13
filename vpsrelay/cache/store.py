"""The content-addressed store on disk (`DiskStore`, a `BlobStore`): `<data_dir>/blobs/`.

Every process of one relay (the workers) shares the directory: a fill is claimed on disk
(`claims.py`), so one process leads it and the others join it (`fills.RemoteFill`); the
index's database is the authority for what the others stored, and eviction is planned by
one process at a time over all of it.

`DiskStore` is built in layers, one module each, each adding to the one below:
`DiskFiles` (diskfiles.py: the directory, start-up clean-up, lookups, readers, the
index's writes), `DiskSpace` (diskspace.py: the size cap and eviction), `DiskFilling`
(filling.py: fills, verified before they are committed), and here the rest of a
`BlobStore`: one revalidation of a tag at a time across processes, small objects
(manifests), and what only a store shared between nodes does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from vpsrelay import private_files
from vpsrelay.cache import claims
from vpsrelay.cache.filling import DiskFilling
from vpsrelay.cache.index import Obj

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from vpsrelay.cache.index import Database, Index
    from vpsrelay.config import CacheConfig

__all__ = ["DiskStore"]

log = logging.getLogger("vpsrelay.cache")

TAG_WAIT = 10.0  # seconds a revalidation waits for another worker's of the same tag
TAG_POLL = 0.05


@dataclass(eq=False)
class _TagLock:
    """One tag's revalidation in this process, and how many requests want it."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


class DiskStore(DiskFilling):
    """Files, fills, the index and eviction (a `BlobStore`). Build it with `DiskStore.open_dir`
    (blocking)."""

    def __init__(self, root: Path, config: CacheConfig, db: Database, index: Index) -> None:
        super().__init__(root, config, db, index)
        self._tag_locks: dict[str, _TagLock] = {}

    # --- tags

    @contextlib.asynccontextmanager
    async def revalidating(self, registry: str, repository: str, tag: str) -> AsyncIterator[None]:
        """Hold the claim to revalidate one tag (one process of the relay at a time); after
        `TAG_WAIT` seconds without it, go on anyway (its holder may hang)."""
        name = "tag-" + hashlib.sha256(f"{registry}/{repository}:{tag}".encode()).hexdigest()
        path = self.claims / name
        deadline = trio.current_time() + TAG_WAIT
        # This process's waiters queue on a lock, woken the moment the holder is done;
        # only the one holding it polls for other processes' claims.
        local = self._tag_locks.setdefault(name, _TagLock())
        local.users += 1
        fd: int | None = None
        try:
            with trio.move_on_at(deadline):
                await local.lock.acquire()
            try:
                # Polled: the holder is another process, whose release no trio.Event signals.
                while (fd := claims.try_claim(path, self.tmp)) is None:
                    if trio.current_time() + TAG_POLL > deadline:
                        break
                    await trio.sleep(TAG_POLL)
                yield
            finally:
                if fd is not None:
                    claims.release(fd, path)
                if (
                    local.lock.locked()
                    and local.lock.statistics().owner is trio.lowlevel.current_task()
                ):
                    local.lock.release()
        finally:
            local.users -= 1
            if local.users == 0:
                del self._tag_locks[name]

    # --- what a store shared between nodes does (one node's disk does not)

    async def locate(self, digest: str, *, fill: bool, read: bool) -> Obj | None:
        """`get`: this store is not shared with other nodes."""
        return self.get(digest)

    def presigned(self, digest: str, size: int) -> str | None:
        """None: files on disk are sent by the relay."""
        return None

    async def refresh_tag(self, registry: str, repository: str, tag: str) -> None:
        """Nothing: this node's tags are the only ones."""

    async def maintain(self) -> None:
        """Nothing in the background: eviction happens as fills make room."""
        await trio.sleep_forever()

    # --- small objects (manifests)

    async def put_small(self, digest: str, body: bytes, kind: str, media_type: str) -> None:
        """Store a verified small body (a manifest) durably; errors only log."""
        if self.get(digest) is not None or digest in self.fills:
            return
        path = self._claim_path(digest)
        try:
            claim = claims.try_claim(path, self.tmp)
        except OSError as exc:
            log.warning("cache: cannot claim %s: %s", digest, exc)
            return
        if claim is None:
            return  # another process of the relay is storing it
        try:
            await self._put_claimed(claim, digest, body, kind, media_type)
        finally:
            claims.release(claim, path)

    async def _put_claimed(
        self, claim: int, digest: str, body: bytes, kind: str, media_type: str
    ) -> None:
        if not await self.make_room(len(body)):
            return
        name = self._tmp_name(digest)
        tmp_path = self.tmp / name
        final = self.path(digest)

        def write() -> None:
            claims.write_note(claim, claims.ClaimNote(name, len(body)))
            fd = private_files.open_file(tmp_path, os.O_WRONLY | os.O_EXCL)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            private_files.make_dir(final.parent)
            os.rename(tmp_path, final)

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            self.index.count("write_errors")
            log.warning("cache: cannot store %s: %s", digest, exc)
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            return
        finally:
            self.reserved -= len(body)
        self.index.add(digest, Obj(len(body), time.time(), kind, media_type))
        self._manifests.remember(digest, body)
        await self.flush(force=True)  # written through: other processes look it up

    async def read_small(self, digest: str) -> bytes | None:
        body = self._manifests.get(digest)
        if body is not None:
            return body
        try:
            data = await trio.to_thread.run_sync(self.path(digest).read_bytes)
        except FileNotFoundError:
            self.index.forget(digest)
            return None
        self._manifests.remember(digest, data)
        return data
