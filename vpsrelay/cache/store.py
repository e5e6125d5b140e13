"""The content-addressed store on disk: `<data_dir>/blobs/sha256/ab/<hex>`.

A miss is written to `<data_dir>/tmp/` while it is hashed, and renamed into
place (after fsync) only if it hashes to its digest: a file under `blobs/` is
always complete and verified, and what dead processes left in `tmp/` is removed
at start, so a crash can never leave a partial blob where it would be served.

Every process of one relay (the workers) shares the directory: a fill is claimed
on disk (`claims.py`), so one process leads it and the others join it
(`fills.RemoteFill`); the index's database is the authority for what the others
stored, and eviction is planned by one process at a time over all of it.

A `Fill` is one upstream download in progress. Readers (the client that caused
it and every client that asked for the same blob meanwhile) read the temporary
file as it grows, through their own descriptor; the last byte is held back
until the digest is verified, so a wrong body ends short instead of completing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from vpsrelay import private_files
from vpsrelay.cache import claims
from vpsrelay.cache.fills import DiskFill, RemoteFill
from vpsrelay.cache.index import Database, Index, Obj, Tag
from vpsrelay.cache.memory import ManifestMemory, Pins
from vpsrelay.cache.storage import Fill, FillState, StoreSpill, StoreStats
from vpsrelay.core import cachepolicy
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.errors import DigestMismatch, RelayError, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from vpsrelay.config import CacheConfig

__all__ = ["DiskFill", "DiskReader", "DiskStore"]

log = logging.getLogger("vpsrelay.cache")

WRITE_BATCH = 1024 * 1024  # bytes gathered before one write+hash in a worker thread
READ_CHUNK = 1024 * 1024
FLUSH_INTERVAL = 5.0  # seconds between index writes to SQLite (last-use times, counters)


class DiskError(Exception):
    """Writing to the cache failed (disk full, I/O error): the pull passes through."""


READ_THREADS = 2
TAG_WAIT = 10.0  # seconds a revalidation waits for another worker's of the same tag
TAG_POLL = 0.05


@dataclass(eq=False)
class _TagLock:
    """One tag's revalidation in this process, and how many requests want it."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


def _on_disk(fill: Fill) -> DiskFill:
    """`fill` as this store made it (`claim` makes only `DiskFill`s)."""
    assert isinstance(fill, DiskFill), "a fill from another store"
    return fill


class DiskReader:
    """Reads one file by offset in a worker thread (a `BlobReader`); owns its descriptor."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self._fd = fd
        self._limiter = limiter

    async def read(self, offset: int, count: int, verifier: Verifier | None = None) -> bytes:
        """Up to `count` bytes at `offset`, read (and hashed, with a verifier) in a thread.

        Raises:
            UpstreamError: the file ended early or could not be read (the cache's disk
            failing is the upstream's stream failing, as far as the client can tell).
        """
        try:
            data = await trio.to_thread.run_sync(
                _read_blocking, self._fd, count, offset, verifier, limiter=self._limiter
            )
        except OSError as exc:
            log.warning("cache: cannot read a cached file: %s", exc)
            raise UpstreamError("the relay could not read its cache") from exc
        if not data:
            raise UpstreamError("the cached file ended early")
        return data

    def set_end(self, end: int) -> None:
        """Nothing: a file on this disk was verified when it was written."""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class DiskStore:
    """Files, fills, the index and eviction (a `BlobStore`). Build it with `DiskStore.open_dir`
    (blocking)."""

    def __init__(self, root: Path, config: CacheConfig, db: Database, index: Index) -> None:
        self.root = root
        self.config = config
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.claims = root / "claims"
        self.db = db
        self.index = index
        self.fills: dict[str, DiskFill] = {}
        self.pins = Pins()
        self.reserved = 0
        self._flushed_at = time.monotonic()
        self._flush_lock = trio.Lock()
        self._space_lock = trio.Lock()
        self._manifests = ManifestMemory()
        self._tag_locks: dict[str, _TagLock] = {}
        # Few threads read cached files: each thread that allocates gets its own malloc
        # arena, and 20 streams reading in 20 threads held ~45 MiB more at peak.
        self._read_limiter: trio.CapacityLimiter | None = None
        # One process of the relay at a time plans and carries out evictions.
        self._evict_fd = private_files.open_file(root / "evict.lock", os.O_RDWR)

    # --- opening, reconciling, closing (blocking: run in a thread or at start)

    @classmethod
    def open_dir(cls, root: Path, config: CacheConfig) -> DiskStore:
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
        fd, self._evict_fd = self._evict_fd, -1
        if fd >= 0:
            os.close(fd)

    async def flush(self, *, force: bool = False) -> None:
        """Write the index's changes to SQLite, at most every few seconds unless forced."""
        self._sweep_remote_fills()
        if not self.index.pending():
            return
        if not force and time.monotonic() - self._flushed_at < FLUSH_INTERVAL:
            return
        async with self._flush_lock:
            self._flushed_at = time.monotonic()
            ops = self.index.take_writes()
            try:
                await trio.to_thread.run_sync(self.db.write, ops)
            except Exception:
                log.exception("cache: could not write the index")

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

    def pinned(self, digest: str) -> contextlib.AbstractContextManager[None]:
        """Keep `digest` from eviction while it is read."""
        return self.pins.hold(digest)

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
        return DiskReader(os.dup(_on_disk(fill).fd), self._limiter())

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

    # --- space

    async def make_room(self, incoming: int) -> bool:
        """Evict least recently used objects so `incoming` bytes fit; False: they do not.

        Planned over what every process of the relay stored (the database, written up to
        date first) and reserved (their claims), under a lock only one process holds.
        """
        async with self._space_lock, self._flush_lock:
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

    # --- fills

    def claim(self, digest: str) -> tuple[DiskFill, bool]:
        """The fill for `digest`: an existing one to join (this process's, or another's,
        followed on disk), or a new one to lead (True), claimed on disk."""
        fill = self.fills.get(digest)
        if isinstance(fill, RemoteFill):
            fill.refresh()  # it may have ended while no one here followed it
            fill = self.fills.get(digest)
        if fill is not None:
            return fill, False
        try:
            return self._claim_on_disk(digest)
        except (OSError, sqlite3.Error) as exc:  # out of descriptors, claims/ gone: pass through
            log.warning("cache: cannot claim %s: %s", digest, exc)
            return DiskFill(digest, FillState.DROPPED), False

    def _claim_on_disk(self, digest: str) -> tuple[DiskFill, bool]:
        path = self._claim_path(digest)
        for _ in range(claims.ATTEMPTS):
            fd = claims.try_claim(path, self.tmp)
            if fd is not None:
                try:
                    # Another process committed it just now (perhaps without its row).
                    known = self.adopt_file(digest)
                except (OSError, sqlite3.Error):
                    claims.release(fd, path)
                    raise
                if known is not None:
                    claims.release(fd, path)
                    return DiskFill(digest, FillState.COMMITTED), False
                fill = DiskFill(digest, claim_fd=fd)
                self.fills[digest] = fill
                return fill, True
            watch = claims.open_held(path)
            if watch is None:
                continue  # let go meanwhile: try to take it again
            remote = RemoteFill(
                digest,
                claim_fd=watch,
                claim_path=path,
                tmp_dir=self.tmp,
                final_path=self.path(digest),
                on_end=self._remote_ended,
            )
            self.fills[digest] = remote
            return remote, False
        return DiskFill(digest, FillState.DROPPED), False  # ask the upstream without the cache

    def drop(self, fill: Fill) -> None:
        """The leader will not fill after all; whoever waits asks the upstream itself."""
        if fill.state is FillState.PENDING:
            fill.state = FillState.DROPPED
            self._end(fill)

    def _remote_ended(self, fill: RemoteFill) -> None:
        if fill.state is FillState.COMMITTED:
            try:
                self.adopt_file(fill.digest)  # known here at once, row or not
            except (OSError, sqlite3.Error) as exc:
                log.warning("cache: cannot look up %s: %s", fill.digest, exc)
        self._end(fill)

    def _end(self, fill: Fill) -> None:
        if self.fills.get(fill.digest) is fill:
            del self.fills[fill.digest]
        if isinstance(fill, DiskFill) and not isinstance(fill, RemoteFill):
            fd, fill.claim_fd = fill.claim_fd, -1
            if fd >= 0:
                claims.release(fd, self._claim_path(fill.digest))
        fill.changed()

    async def begin(self, fill: Fill, size: int, headers: tuple[tuple[str, str], ...]) -> bool:
        """Reserve room and open the temporary file; False: pass through instead."""
        if not await self.make_room(size):
            self.drop(fill)
            return False
        disk = _on_disk(fill)
        name = self._tmp_name(fill.digest)
        tmp_path = self.tmp / name

        def create() -> int:
            # Announced first: a file under tmp/ that no held claim names is a leftover.
            claims.write_note(disk.claim_fd, claims.ClaimNote(name, size))
            return private_files.open_file(tmp_path, os.O_RDWR | os.O_EXCL)

        try:
            fd = await trio.to_thread.run_sync(create)
        except OSError as exc:
            log.warning("cache: cannot create %s: %s: passing through", tmp_path, exc)
            self.index.count("write_errors")
            self.reserved -= size
            self.drop(fill)
            return False
        disk.fd, disk.tmp_path, fill.size, fill.headers = fd, tmp_path, size, headers
        fill.state = FillState.STREAMING
        fill.changed()
        return True

    async def pump(self, fill: Fill, chunks: AsyncIterator[bytes]) -> None:
        """Write the upstream body into the fill, hashing it; commit or fail at the end.

        Raises:
            RelayError: the fill failed (digest mismatch, upstream broke off); the fill
            is already marked failed and its file removed.
            StoreSpill: the disk failed; the fill is marked failed and spilled, and the
            exception holds what the first client still needs before the rest of `chunks`.
        """
        verifier = Verifier(Digest.parse(fill.digest))
        disk = _on_disk(fill)

        def write(data: list[bytes]) -> None:
            for piece in data:  # hashed first: a batch the disk refuses is hashed whole
                verifier.update(piece)
            for piece in data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(disk.fd, view) :]

        try:
            try:
                unwritten = await self._read_beside_writes(fill, chunks, write)
                if unwritten is not None:
                    refused, held = unwritten
                    for piece in held:
                        verifier.update(piece)
                    fill.spilled = True
                    await self._fail(fill, UpstreamError("the relay's cache disk failed"))
                    raise StoreSpill(verifier, [*refused, *held])
                verifier.finish()  # DigestMismatch
                if fill.written != fill.size:
                    raise UpstreamError(
                        f"upstream sent {fill.written} of {fill.size} bytes of {fill.digest}"
                    )
                await self._commit(fill)
            except StoreSpill:
                raise
            except BaseException as exc:
                error = (
                    exc
                    if isinstance(exc, RelayError)
                    else UpstreamError(f"the fill of {fill.digest} stopped")
                )
                await self._fail(fill, error)
                raise
        finally:
            self.reserved -= fill.size

    async def _read_beside_writes(
        self, fill: Fill, chunks: AsyncIterator[bytes], write: Callable[[list[bytes]], None]
    ) -> tuple[list[bytes], list[bytes]] | None:
        """Gather the upstream body in batches; a worker thread writes and hashes one
        batch while the next is read (the upstream read no longer waits for the disk).

        Returns None when every byte was written, or, when the disk failed, the pieces
        read but not written: the refused batch (hashed) and those read after it (not
        hashed); the rest stays unread in `chunks`. The read is never cancelled for a disk
        error: httpx would close the upstream stream.
        """
        to_write, batches = trio.open_memory_channel[list[bytes]](0)
        refused: list[bytes] | None = None

        async def writer() -> None:
            nonlocal refused
            async with batches:  # closed on a disk error: the reader's next send breaks
                async for batch in batches:
                    try:
                        await self._write(write, batch)
                    except DiskError:
                        refused = batch
                        return
                    fill.written += sum(map(len, batch))
                    fill.changed()

        async def send(batch: list[bytes]) -> bool:
            try:
                await to_write.send(batch)
            except trio.BrokenResourceError:
                return False
            return True

        held: list[bytes] = []  # read after the writer stopped: not hashed yet
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            try:
                async with to_write:
                    batch: list[bytes] = []
                    pending = 0
                    async for chunk in chunks:
                        batch.append(chunk)
                        pending += len(chunk)
                        if pending >= WRITE_BATCH:
                            if not await send(batch):
                                held = batch
                                break
                            batch, pending = [], 0
                    else:
                        if batch and not await send(batch):
                            held = batch
            except Exception as exc:  # re-raised outside, so it is not wrapped in a group
                error = exc
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if refused is None:
            return None
        return refused, held

    async def _write(self, write: object, batch: list[bytes]) -> None:
        try:
            await trio.to_thread.run_sync(write, batch)  # type: ignore[arg-type]
        except OSError as exc:
            self.index.count("write_errors")
            log.warning("cache: write error while filling, passing the rest through: %s", exc)
            raise DiskError(str(exc)) from exc

    async def _commit(self, fill: Fill) -> None:
        disk = _on_disk(fill)
        assert disk.tmp_path is not None
        final = self.path(fill.digest)
        tmp_path, fd = disk.tmp_path, disk.fd

        def durable_rename() -> None:
            os.fsync(fd)
            private_files.make_dir(final.parent)
            os.rename(tmp_path, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(durable_rename)
        self.index.add(fill.digest, Obj(fill.size, time.time(), "blob"))
        self.index.count("bytes_from_upstream", fill.size)
        with trio.CancelScope(shield=True):  # written through: other processes look it up
            await self.flush(force=True)
        # Closed here, not in the thread, and with no await before the fill settles: while
        # the fill is STREAMING a joining reader may `dup` its fd (the renamed file: the
        # same inode), and a number closed early could meanwhile name another file.
        disk.fd = -1
        os.close(fd)
        fill.state = FillState.COMMITTED
        self._end(fill)

    async def _fail(self, fill: Fill, error: RelayError) -> None:
        fill.error = error
        fill.state = FillState.FAILED
        self._end(fill)
        if isinstance(error, DigestMismatch):
            self.index.count("digest_mismatches")
            log.warning("cache: digest mismatch, not cached: %s", error.message)
        else:
            log.warning("cache: fill of %s failed: %s", fill.digest, error.message)
        disk = _on_disk(fill)
        fd, tmp_path = disk.fd, disk.tmp_path
        disk.fd = -1

        def cleanup() -> None:
            if fd >= 0:
                os.close(fd)
            if tmp_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp_path.unlink()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(cleanup)

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


def _read_blocking(fd: int, count: int, offset: int, verifier: Verifier | None) -> bytes:
    data = os.pread(fd, count, offset)
    if verifier is not None:
        verifier.update(data)
    return data
