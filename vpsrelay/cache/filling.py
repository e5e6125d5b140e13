"""The disk store's fills: `DiskFilling` adds them to `DiskSpace` (diskspace.py).

A miss is claimed on disk (`claims.py`): one process of the relay leads the fill, the
others join it (`fills.RemoteFill`, followed on disk). The leader writes the upstream body
to `<data_dir>/tmp/` while it is hashed, and renames it into place (after fsync) only if
it hashes to its digest: a file under `blobs/` is always complete and verified. Readers
(the client that caused the fill and every client that asked for the same blob
meanwhile) read the temporary file as it grows, through their own descriptor; the last
byte is held back until the digest is verified, so a wrong body ends short instead of
completing. The fill objects themselves are in fills.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files
from vpsrelay.cache import claims
from vpsrelay.cache.diskfiles import as_disk_fill
from vpsrelay.cache.diskspace import DiskSpace
from vpsrelay.cache.fills import DiskFill, RemoteFill
from vpsrelay.cache.index import Obj
from vpsrelay.cache.storage import Fill, FillState, StoreSpill
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from vpsrelay.errors import RelayError

log = logging.getLogger("vpsrelay.cache")

WRITE_BATCH = 1024 * 1024  # bytes gathered before one write+hash in a worker thread


class DiskError(Exception):
    """Writing to the cache failed (disk full, I/O error): the pull passes through."""


class DiskFilling(DiskSpace):
    """The disk store's fills: claim, begin, pump, then commit or fail; joining another
    process's fill."""

    # --- claiming, joining, dropping

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

    # --- writing the body, hashed

    async def begin(self, fill: Fill, size: int, headers: tuple[tuple[str, str], ...]) -> bool:
        """Reserve room and open the temporary file; False: pass through instead."""
        if not await self.make_room(size):
            self.drop(fill)
            return False
        disk = as_disk_fill(fill)
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
        disk.fd, disk.tmp_path = fd, tmp_path
        fill.start_streaming(size, headers)
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
        disk = as_disk_fill(fill)

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
                await self._fail(fill, fill.failure(exc))
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

    # --- the end: committed, or failed

    async def _commit(self, fill: Fill) -> None:
        disk = as_disk_fill(fill)
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
        fill.mark_failed(error, self.index)
        self._end(fill)
        disk = as_disk_fill(fill)
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
