"""The bucket store's fills: `S3Filling` adds them to `S3Bucket` (bucket.py).

A fill holds the blob's lease (`leases/sha256/<hex>`, lease.py: one node fills it, the
others wait for its object) and streams the upstream body to its clients through a
staging file on this node (`<data_dir>/s3-staging/`, readers read it as it grows, as
with the disk store) and to a multipart upload at once; the digest is checked as the
bytes pass, and the upload is completed at the blob's key, with `If-None-Match: *`, only
when it matched. A fill that fails (wrong digest, upstream broke off, last reader gone)
aborts the upload: nothing readable is left and its parts are dropped. When the bucket
fails mid-fill, the fill goes on for this node's clients without it (nothing published);
when it fails before, the pull passes through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files
from vpsrelay.cache.diskreader import DiskReader
from vpsrelay.cache.index import Obj
from vpsrelay.cache.s3.bucket import S3Bucket
from vpsrelay.cache.s3.client import S3Error
from vpsrelay.cache.s3.lease import LeaseState
from vpsrelay.cache.storage import Fill, FillState, StoreSpill
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from vpsrelay.cache.index import Database, Index
    from vpsrelay.cache.s3.client import S3Client
    from vpsrelay.config import CacheConfig
    from vpsrelay.errors import RelayError

log = logging.getLogger("vpsrelay.cache")

WRITE_BATCH = 1024 * 1024
READ_THREADS = 2


@dataclass(eq=False)
class S3Fill(Fill):
    """A fill staged in a local file and uploaded to the bucket as it grows."""

    fd: int = -1
    tmp_path: Path | None = None
    upload: str | None = None  # multipart upload id (None: one PUT at the end)
    etags: list[str] = field(default_factory=list)
    bucket_failed: bool = False  # the upload stopped: the fill goes on, unpublished


def _staged(fill: Fill) -> S3Fill:
    assert isinstance(fill, S3Fill), "a fill from another store"
    return fill


class S3Filling(S3Bucket):
    """The bucket store's fills: claim, begin, pump, then publish and commit, or fail."""

    def __init__(
        self, root: Path, config: CacheConfig, db: Database, index: Index, client: S3Client
    ) -> None:
        super().__init__(root, config, db, index, client)
        self.tmp = root / "s3-staging"
        self.fills: dict[str, S3Fill] = {}
        self.held: set[str] = set()  # digests whose lease this node holds
        self._sequence = 0
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)

    # --- claiming, dropping, the lease

    def claim(self, digest: str) -> tuple[S3Fill, bool]:
        fill = self.fills.get(digest)
        if fill is not None:
            return fill, False
        fill = S3Fill(digest)
        self.fills[digest] = fill
        return fill, True

    def drop(self, fill: Fill) -> None:
        if fill.state is FillState.PENDING:
            fill.state = FillState.DROPPED
            self._end(fill)
            if fill.digest in self.held:
                self._release_soon(fill.digest)

    def _release_soon(self, digest: str) -> None:
        # `drop` is sync: the lease is released at the next flush (or lapses).
        self.held.discard(digest)
        self._pending_releases.append(digest)

    def _end(self, fill: Fill) -> None:
        if self.fills.get(fill.digest) is fill:
            del self.fills[fill.digest]
        fill.changed()

    async def _abort_leftovers(self, digest: str) -> None:
        """Abort the uploads a dead node left at `digest`'s key (its lease lapsed)."""
        key = self.key(digest)
        for upload_key, upload in await self.client.uploads(key):
            if upload_key == key:
                await self.client.abort_upload(key, upload)
                log.info("cache: aborted a dead node's upload of %s", digest)

    def open_fill(self, fill: Fill) -> DiskReader:
        return DiskReader(os.dup(_staged(fill).fd), self._read_limiter)

    # --- staging and uploading the body, hashed

    async def begin(self, fill: Fill, size: int, headers: tuple[tuple[str, str], ...]) -> bool:
        """Take (or hold) the lease, open the staging file and the upload; False: pass
        through (the bucket fails, or another node fills it)."""
        staged = _staged(fill)
        if not self.bucket_ok:
            self.drop(fill)
            return False
        try:
            if self.s3.conditional_writes and fill.digest not in self.held:
                state = await self.leases.take(fill.digest)
                if state is LeaseState.OTHER:
                    self.drop(fill)
                    return False
                self.held.add(fill.digest)
                if state is LeaseState.TAKEN_OVER:
                    await self._abort_leftovers(fill.digest)
            if size > self.s3.part_size:
                staged.upload = await self.client.create_upload(self.key(fill.digest))
        except S3Error as exc:
            self._failed(exc)
            await self._release(fill.digest)
            self.drop(fill)
            return False
        self._sequence += 1
        tmp_path = self.tmp / f"{fill.digest.partition(':')[2]}.{os.getpid()}.{self._sequence}"
        try:
            fd = await trio.to_thread.run_sync(
                lambda: private_files.open_file(tmp_path, os.O_RDWR | os.O_EXCL)
            )
        except OSError as exc:
            log.warning("cache: cannot stage %s: %s: passing through", fill.digest, exc)
            self.index.count("write_errors")
            await self._abort(staged)
            await self._release(fill.digest)
            self.drop(fill)
            return False
        staged.fd, staged.tmp_path = fd, tmp_path
        fill.start_streaming(size, headers)
        return True

    async def pump(self, fill: Fill, chunks: AsyncIterator[bytes]) -> None:
        """Stage and upload the upstream body, hashing it; publish or abort at the end.

        Raises:
            RelayError: the fill failed; nothing was published and the upload is aborted.
            StoreSpill: the staging disk failed (what the first client needs is in it).
        """
        staged = _staged(fill)
        try:
            small = await self._stage_and_upload(staged, chunks)
            await self._publish(staged, small)
        except StoreSpill:
            await self._fail(staged, UpstreamError("the relay's staging disk failed"))
            raise
        except BaseException as exc:
            await self._fail(staged, fill.failure(exc))
            raise
        await self._commit(staged)

    async def _stage_and_upload(self, staged: S3Fill, chunks: AsyncIterator[bytes]) -> bytes:
        """Read the body into the staging file and the upload's parts (one part in
        flight while the next is read), renewing the lease; the body of a blob too small
        for an upload. Exceptions are re-raised outside the nurseries (not grouped)."""
        verifier = Verifier(Digest.parse(staged.digest))
        small = bytearray()
        error: BaseException | None = None
        async with trio.open_nursery() as background:
            if staged.digest in self.held:
                background.start_soon(self._renew, staged.digest)
            parts_send, parts = trio.open_memory_channel[bytes](1)
            async with trio.open_nursery() as uploads:
                uploads.start_soon(self._upload_parts, staged, parts)
                try:
                    async with parts_send:
                        await self._read_body(staged, chunks, verifier, parts_send, small)
                except Exception as exc:
                    error = exc
                    uploads.cancel_scope.cancel()
            background.cancel_scope.cancel()
        if error is not None:
            raise error
        return bytes(small)

    async def _read_body(
        self,
        staged: S3Fill,
        chunks: AsyncIterator[bytes],
        verifier: Verifier,
        parts: trio.MemorySendChannel[bytes],
        small: bytearray,
    ) -> None:
        part = bytearray()
        batch: list[bytes] = []
        pending = 0
        async for chunk in chunks:
            verifier.update(chunk)
            batch.append(chunk)
            pending += len(chunk)
            if pending >= WRITE_BATCH:
                await self._write(staged, batch, verifier)
                batch, pending = [], 0
            if staged.upload is None:
                small += chunk
            else:
                part += chunk
                if len(part) >= self.s3.part_size:
                    await parts.send(bytes(part))
                    part.clear()
        if batch:
            await self._write(staged, batch, verifier)
        verifier.finish()  # DigestMismatch
        if staged.written != staged.size:
            raise UpstreamError(
                f"upstream sent {staged.written} of {staged.size} bytes of {staged.digest}"
            )
        if part:
            await parts.send(bytes(part))

    async def _write(self, staged: S3Fill, batch: list[bytes], verifier: Verifier) -> None:
        fd = staged.fd

        def write() -> None:
            for piece in batch:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            self.index.count("write_errors")
            log.warning("cache: staging write error, passing the rest through: %s", exc)
            staged.spilled = True
            raise StoreSpill(verifier, batch) from exc
        staged.written += sum(map(len, batch))
        staged.changed()

    async def _upload_parts(self, staged: S3Fill, parts: trio.MemoryReceiveChannel[bytes]) -> None:
        """Send each part as it comes; after a bucket failure, take and drop the rest."""
        async with parts:
            async for data in parts:
                if staged.bucket_failed or staged.upload is None:
                    continue
                try:
                    etag = await self.client.upload_part(
                        self.key(staged.digest), staged.upload, len(staged.etags) + 1, data
                    )
                except S3Error as exc:
                    self._failed(exc)
                    staged.bucket_failed = True
                    continue
                staged.etags.append(etag)

    async def _renew(self, digest: str) -> None:
        while True:
            await trio.sleep(self.s3.lease_ttl / 3)
            try:
                if not await self.leases.renew(digest):
                    return  # taken over: the fill goes on, its publish is conditional
            except S3Error as exc:
                self._failed(exc)

    # --- the end: published and committed, or failed

    async def _publish(self, staged: S3Fill, small: bytes) -> None:
        """Make the verified blob visible at its key (only now); never raises."""
        key = self.key(staged.digest)
        try:
            if staged.bucket_failed:
                raise S3Error("the upload failed earlier")
            if staged.upload is None:
                created = await self.client.put(
                    key, small, if_none_match=self.s3.conditional_writes
                )
            else:
                created = await self.client.complete_upload(
                    key, staged.upload, staged.etags, if_none_match=self.s3.conditional_writes
                )
                if created:
                    staged.upload = None
            if not created:
                log.info("cache: %s was already in the bucket", staged.digest)
            else:
                self._distrusted.pop(staged.digest, None)
        except S3Error as exc:
            self._failed(exc)
            log.warning("cache: %s not published: %s", staged.digest, exc)
            await self._abort(staged)
            return
        await self._abort(staged)  # the one that lost to an existing object
        self.index.add(staged.digest, Obj(staged.size, time.time(), "blob"))

    async def _abort(self, staged: S3Fill) -> None:
        upload, staged.upload = staged.upload, None
        if upload is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.s3.timeout):
            try:
                await self.client.abort_upload(self.key(staged.digest), upload)
            except S3Error as exc:
                self._failed(exc)
                log.warning("cache: could not abort the upload of %s: %s", staged.digest, exc)

    async def _release(self, digest: str) -> None:
        if digest in self.held:
            self.held.discard(digest)
            with trio.CancelScope(shield=True), trio.move_on_after(self.s3.timeout):
                await self.leases.release(digest)

    async def _commit(self, staged: S3Fill) -> None:
        await self._release(staged.digest)
        self._close_staging(staged)
        self.index.count("bytes_from_upstream", staged.size)
        staged.state = FillState.COMMITTED
        self._end(staged)
        await self.flush()

    def _close_staging(self, staged: S3Fill) -> None:
        # Readers keep their own descriptors (dup'd): the file is unlinked under them.
        fd, staged.fd = staged.fd, -1
        if fd >= 0:
            os.close(fd)
        if staged.tmp_path is not None:
            with contextlib.suppress(OSError):
                staged.tmp_path.unlink()

    async def _fail(self, staged: S3Fill, error: RelayError) -> None:
        staged.mark_failed(error, self.index)
        self._end(staged)
        await self._abort(staged)
        await self._release(staged.digest)
        self._close_staging(staged)
