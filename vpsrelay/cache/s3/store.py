"""`S3Store`: the `BlobStore` on an S3-compatible bucket that several relay nodes share.

Keys (under `cache.s3.prefix`): `blobs/sha256/<hex>` (blobs and manifests, content
addressed), `leases/sha256/<hex>` (who is filling what, `lease.py`).

A fill streams the upstream body to its clients through a staging file on this node
(`<data_dir>/s3-staging/`, readers read it as it grows, as with the disk store) and to a
multipart upload at once; the digest is checked as the bytes pass, and the upload is
completed at the blob's key, with `If-None-Match: *`, only when it matched. A fill that
fails (wrong digest, upstream broke off, last reader gone) aborts the upload: nothing
readable is left and its parts are dropped. When the bucket fails mid-fill, the fill goes
on for this node's clients without it (nothing published); when it fails before, the pull
passes through. The bucket is then left alone, but for one probe every `RETRY_AFTER`
seconds (`maintain`), until it answers; `/readyz` and `/metrics` say so meanwhile.

Reads from the bucket are verified as they stream (`reader.py`). What this node knows is
in its `Index` (memory, kept in `<data_dir>/s3cache.db`): a hint, corrected when the
bucket disagrees (a GET that finds nothing forgets the object).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files
from vpsrelay.cache.diskreader import DiskReader
from vpsrelay.cache.index import Database, Index, Obj, Tag
from vpsrelay.cache.indexwrites import IndexWrites
from vpsrelay.cache.memory import ManifestMemory, Pins
from vpsrelay.cache.s3 import tags as shared_tags
from vpsrelay.cache.s3.client import S3Client, S3Error
from vpsrelay.cache.s3.evict import Evictor
from vpsrelay.cache.s3.lease import Leases, LeaseState
from vpsrelay.cache.s3.reader import S3Reader
from vpsrelay.cache.s3.signing import Signer
from vpsrelay.cache.s3.tags import SharedIndex, decode, encode, tag_key
from vpsrelay.cache.storage import Fill, FillState, StoreSpill, StoreStats
from vpsrelay.config import Secret
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.errors import DigestMismatch, RelayError, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import httpx

    from vpsrelay.config import CacheConfig

log = logging.getLogger("vpsrelay.cache")

WRITE_BATCH = 1024 * 1024
RETRY_AFTER = 5.0  # seconds between probes of a failing bucket
POLL_INTERVAL = 0.5  # seconds between looks at another node's fill
MAX_SMALL = 4 * 1024 * 1024  # the largest manifest Distribution accepts
READ_THREADS = 2
PREPARED_TTL = 30.0  # seconds a GET opened by `locate` waits for its reader
MAX_PREPARED = 16  # GETs opened by `locate` waiting for their readers, per process
DISTRUST_SECONDS = 3600.0  # an object that failed its check is not read back for this long


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


class S3Store:
    """Blobs in a bucket, single-flight across nodes by leases (a `BlobStore`).
    Build it with `S3Store.connect` (in Trio)."""

    def __init__(
        self, root: Path, config: CacheConfig, db: Database, index: Index, client: S3Client
    ) -> None:
        self.config = config
        self.s3 = config.s3
        self.db = db
        self.shared_index = SharedIndex.of(index)  # the same index: its tag writes
        self.index: Index = self.shared_index
        self.client = client
        self.tmp = root / "s3-staging"
        self.node = secrets.token_hex(8)
        self.leases = Leases(client, self.s3.prefix, self.node, self.s3.lease_ttl)
        self.evictor = Evictor(client, self.leases, self.s3, self.node)
        self.fills: dict[str, S3Fill] = {}
        self.pins = Pins()
        self.held: set[str] = set()  # digests whose lease this node holds
        self.failed_at: float | None = None  # monotonic: the bucket's last failure
        self.last_error = ""
        self._locks: dict[str, trio.Lock] = {}
        self._waited_out: dict[str, float] = {}  # digest -> when waiting for it timed out
        self._index_writes = IndexWrites(self.index, db)
        self._closing: list[httpx.Response] = []
        self._pending_releases: list[str] = []
        self._prepared: dict[str, list[tuple[float, httpx.Response]]] = {}
        # digest -> when its bucket copy failed the check: not read back until this node
        # publishes a verified copy itself (a store that keeps serving a tampered object
        # must not fail every pull of it)
        self._distrusted: dict[str, float] = {}
        self._manifests = ManifestMemory()
        self._sequence = 0
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)

    @classmethod
    async def connect(cls, root: Path, config: CacheConfig) -> S3Store:
        s3 = config.s3
        assert s3.endpoint is not None  # config.py checks both
        assert s3.access_key is not None
        signer = Signer(s3.access_key, Secret(s3.secret()), s3.region)
        client = S3Client(
            s3.endpoint,
            s3.bucket,
            signer,
            virtual_host=s3.addressing == "virtual",
            public_endpoint=s3.public_endpoint,
            verify=str(s3.ca_bundle) if s3.ca_bundle is not None else True,
            timeout=s3.timeout,
        )

        def prepare() -> tuple[Database, Index]:
            tmp = root / "s3-staging"
            private_files.make_dir(tmp)
            for leftover in tmp.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            db = Database(root / "s3cache.db")
            return db, db.load()

        db, index = await trio.to_thread.run_sync(prepare)
        store = cls(root, config, db, index, client)
        try:
            await client.head(store.key("sha256:" + "0" * 64))
        except S3Error as exc:
            store._failed(exc)
            log.warning("cache: the bucket does not answer (%s): passing through for now", exc)
        return store

    # --- the bucket's health

    def key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.s3.prefix}blobs/{algorithm}/{hexpart}"

    @property
    def bucket_ok(self) -> bool:
        """False from the bucket's failure until the probe (`_probe_while_failing`) gets
        an answer: meanwhile no request touches the bucket (they pass through)."""
        return self.failed_at is None

    def bucket_state(self) -> str:
        """ "ok", or why the bucket is not used right now (for /readyz and metrics)."""
        return "ok" if self.bucket_ok else f"failing: {self.last_error}"

    def _failed(self, exc: S3Error) -> None:
        """The bucket failed a request: no request touches it until the probe's answer
        (a request that succeeds meanwhile, started before, says nothing of it now)."""
        if self.bucket_ok:
            log.warning("cache: the bucket failed (%s): passing pulls through", exc)
            self.failed_at = time.monotonic()
        self.last_error = exc.summary  # public in /readyz: the log has the details

    async def _probe_while_failing(self) -> None:
        """Forever: while the bucket is failing, one HEAD of a fixed key every
        `RETRY_AFTER` seconds (one at a time, with the control deadline); any answer
        brings the bucket back."""
        probe = self.key("sha256:" + "0" * 64)
        while True:
            await trio.sleep(RETRY_AFTER)
            if self.bucket_ok:
                continue
            try:
                await self.client.head(probe)
            except S3Error as exc:
                self.last_error = exc.summary
                log.debug("cache: the bucket still fails (%s)", exc)
                continue
            except Exception:  # the probe must never end the server
                log.exception("cache: the bucket's probe failed")
                continue
            log.info("cache: the bucket answers again")
            self.failed_at = None

    # --- lookups

    def get(self, digest: str) -> Obj | None:
        """A manifest this node knows; blobs are looked up in the bucket (`locate`)."""
        obj = self.index.objects.get(digest)
        if obj is None or obj.kind == "blob" or not self.bucket_ok:
            return None
        return None if self._is_distrusted(digest) else obj

    async def locate(self, digest: str, *, fill: bool, read: bool) -> Obj | None:
        """What the bucket holds under `digest`.

        With `read`, the object's GET is opened here, before the client is answered (a
        bucket that fails now means a pass-through, not a broken download); `open`
        takes it. With `fill` (a GET that would fill on a miss): when another node holds
        the lease, wait for its object, at most `lease_wait`; a lease that lapses (its
        node died) is taken over. None: fill (this node leads or joins its own fill)
        or pass through.
        """
        self._close_stale_prepared()
        if not self.bucket_ok or self._is_distrusted(digest):
            return None
        known = self.index.objects.get(digest)
        try:
            if known is not None and known.kind == "blob":
                if not read:
                    return known
                if await self._prepare(digest, known):
                    return known
                if digest in self.index.objects:
                    return None  # still there, being evicted (`Evictor.may_read`): pass through
        except S3Error as exc:
            self._failed(exc)
            return None
        # Each request waits `lease_wait` at most, counted from its arrival: the time spent
        # queued behind other requests for the same digest (one polls) counts too.
        deadline = trio.current_time() + self.s3.lease_wait
        lock = self._locks.setdefault(digest, trio.Lock())
        acquired = False
        try:
            with trio.move_on_at(deadline):
                await lock.acquire()
                acquired = True
            if not acquired:
                self._gave_up(digest)
                return None
            obj = await self._locate(digest, fill, deadline)
            if obj is not None and read and not await self._prepare(digest, obj):
                return None
            return obj
        except S3Error as exc:
            self._failed(exc)
            return None
        finally:
            if acquired:
                lock.release()
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(digest, None)

    def _gave_up(self, digest: str) -> None:
        """Remember that waiting for another node's fill of `digest` timed out, so that
        the requests after it (a pull's retry, the clients that joined) do not wait
        `lease_wait` all over again."""
        now = trio.current_time()
        for other, since in list(self._waited_out.items()):
            if now - since > self.s3.lease_wait:
                del self._waited_out[other]
        self._waited_out[digest] = now
        log.warning(
            "cache: %s: another node's fill took over %.0f s: fetching it here too",
            digest,
            self.s3.lease_wait,
        )

    def _waited_out_recently(self, digest: str) -> bool:
        since = self._waited_out.get(digest)
        return since is not None and trio.current_time() - since <= self.s3.lease_wait

    async def _locate(self, digest: str, fill: bool, deadline: float) -> Obj | None:
        if digest in self.fills or digest in self.held:
            return None  # this node fills it: join
        if (obj := await self._look(digest)) is not None:
            return obj
        if not fill or not self.s3.conditional_writes or self._waited_out_recently(digest):
            return None
        while True:
            state = await self.leases.take(digest)
            if state is not LeaseState.OTHER:
                self.held.add(digest)
                if state is LeaseState.TAKEN_OVER:
                    await self._abort_leftovers(digest)
                return None
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                self._gave_up(digest)
                return None
            await trio.sleep(min(POLL_INTERVAL, remaining))
            if (obj := await self._look(digest)) is not None:
                return obj

    async def _prepare(self, digest: str, obj: Obj) -> bool:
        """Open the GET of `digest` for the `open` that follows; False (and forgotten)
        when the bucket no longer has it (another node evicted it), or False when an
        eviction pass is about to delete it (`Evictor.may_read`).

        Raises:
            S3Error: the bucket failed.
        """
        if not await self.evictor.may_read(digest):
            return False  # an eviction pass may be deleting it: this request passes through
        try:
            response = await self.client.open_get(self.key(digest))
        except S3Error as exc:
            if exc.status != 404:
                raise
            self.index.remove(digest)
            return False
        if response.headers.get("content-length") != str(obj.size):
            self._closing.append(response)
            await self._bad(digest, "has the wrong size")
            return False
        self._prepared.setdefault(digest, []).append((trio.current_time(), response))
        self._cap_prepared()
        self.evictor.touch(digest)
        return True

    def _cap_prepared(self) -> None:
        """At most `MAX_PREPARED` GETs wait for their readers: the oldest beyond that is
        closed (its request opens a fresh GET, or is sent by the relay), so clients that
        hang up cannot hold the bucket's connections."""
        opened = sorted(
            (when, digest) for digest, waiting in self._prepared.items() for when, _ in waiting
        )
        for _, digest in opened[: max(0, len(opened) - MAX_PREPARED)]:
            waiting = self._prepared[digest]
            self._closing.append(waiting.pop(0)[1])
            if not waiting:
                del self._prepared[digest]

    def _close_stale_prepared(self) -> None:
        """GETs opened for requests that did not read them after all (refused, HEAD)."""
        now = trio.current_time()
        for digest in list(self._prepared):
            waiting = self._prepared[digest]
            while waiting and now - waiting[0][0] > PREPARED_TTL:
                self._closing.append(waiting.pop(0)[1])
            if not waiting:
                del self._prepared[digest]

    async def _look(self, digest: str) -> Obj | None:
        head = await self.client.head(self.key(digest))
        if head is None:
            return None
        obj = Obj(head.size, time.time(), "blob")
        known = self.index.objects.get(digest)
        if known is None:
            self.index.add(digest, obj)
            return obj
        return known

    async def _abort_leftovers(self, digest: str) -> None:
        """Abort the uploads a dead node left at `digest`'s key (its lease lapsed)."""
        key = self.key(digest)
        for upload_key, upload in await self.client.uploads(key):
            if upload_key == key:
                await self.client.abort_upload(key, upload)
                log.info("cache: aborted a dead node's upload of %s", digest)

    def pinned(self, digest: str) -> contextlib.AbstractContextManager[None]:
        return self.pins.hold(digest)

    def presigned(self, digest: str, size: int) -> str | None:
        """With `cache.s3.redirect`: a GET-only URL for this one object, valid for
        `redirect_expiry` seconds, signed for the public endpoint (no credential in it
        but a signature). The GET `locate` opened showed the bucket serves it."""
        if not self.s3.redirect or size < self.s3.redirect_min_size:
            return None
        waiting = self._prepared.get(digest)
        if not waiting:
            return None  # not seen in the bucket just now: the relay sends it
        self._closing.append(waiting.pop(0)[1])
        if not waiting:
            del self._prepared[digest]
        return self.client.presign(self.key(digest), self.s3.redirect_expiry)

    def open(self, digest: str) -> S3Reader | None:
        obj = self.index.objects.get(digest)
        if obj is None or not self.bucket_ok or self._is_distrusted(digest):
            return None
        waiting = self._prepared.get(digest)
        response = waiting.pop(0)[1] if waiting else None
        if waiting is not None and not waiting:
            del self._prepared[digest]
        key = self.key(digest)
        return S3Reader(
            self.client,
            key,
            digest,
            obj.size,
            self._bad,
            self._closing.append,
            response,
            on_failed=self._failed,
        )

    def _is_distrusted(self, digest: str) -> bool:
        since = self._distrusted.get(digest)
        if since is not None and time.monotonic() - since > DISTRUST_SECONDS:
            del self._distrusted[digest]
            return False
        return since is not None

    async def _bad(self, digest: str, why: str) -> None:
        """An object read back was wrong or gone: forget it, and delete a wrong one."""
        self.index.remove(digest)
        self._manifests.forget(digest)
        if why == "gone":
            return
        self._distrusted[digest] = time.monotonic()
        self.index.count("digest_mismatches")
        log.warning("cache: the bucket's %s %s: deleting it", digest, why)
        with trio.CancelScope(shield=True), trio.move_on_after(self.s3.timeout):
            try:
                await self.client.delete(self.key(digest))
            except S3Error as exc:
                self._failed(exc)

    def open_fill(self, fill: Fill) -> DiskReader:
        return DiskReader(os.dup(_staged(fill).fd), self._read_limiter)

    def stats(self) -> StoreStats:
        return StoreStats(
            len(self.index.objects), self.index.used, len(self.fills), self.bucket_state()
        )

    # The bucket is what the nodes (and a node's workers) share: `refresh_tag` brings a
    # tag from it; what this process learnt stays in its memory.

    def reread_tag(self, registry: str, repository: str, tag: str) -> Tag | None:
        return self.index.tags.get((registry, repository, tag))

    def reread_origins(self, digest: str) -> None:
        return None

    def reread_public(self, registry: str, repository: str) -> None:
        return None

    def revalidating(
        self, registry: str, repository: str, tag: str
    ) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    async def refresh_tag(self, registry: str, repository: str, tag: str) -> str | None:
        """The digest the bucket's copy of a tag names, when this node's own is older than
        the tag TTL (or missing). A hint only: the bucket is another trust domain, so
        nothing of it is taken into the index (no tag, no size or media type, no
        repository holding anything); the caller serves it only once the upstream named
        the same digest, and reads the manifest by that digest, verified."""
        local = self.index.tags.get((registry, repository, tag))
        ttl = dict(self.config.registry_tag_ttl).get(registry, self.config.tag_ttl)
        if (local is not None and time.time() - local.checked_at < ttl) or not self.bucket_ok:
            return None
        try:
            body = await self.client.get_small(
                tag_key(self.s3.prefix, registry, repository, tag), shared_tags.MAX_TAG_OBJECT
            )
        except S3Error as exc:
            self._failed(exc)
            return None
        shared = decode(body) if body is not None else None
        return shared[0].digest if shared is not None else None

    async def _write_tags(self) -> None:
        writes, self.shared_index.tag_writes = self.shared_index.tag_writes, {}
        for registry, repository, name in writes:
            tag = self.index.tags.get((registry, repository, name))
            obj = self.index.objects.get(tag.digest) if tag is not None else None
            if tag is None or obj is None or obj.kind != "manifest":
                continue
            key = tag_key(self.s3.prefix, registry, repository, name)
            try:
                await self._write_tag(key, tag, obj)
            except S3Error as exc:
                self._failed(exc)
                return

    async def _write_tag(self, key: str, tag: Tag, obj: Obj) -> None:
        """Write a tag unless the bucket's copy was checked more recently (by another
        node), conditional on the copy read: a node that flushes late never replaces a
        newer `checked_at` with an older one. Raises S3Error."""
        for _ in range(2):  # a write between our read and ours (412): read again, once
            current = await self.client.get_versioned(key, shared_tags.MAX_TAG_OBJECT)
            if not shared_tags.newer_than_bucket(tag, current[0] if current is not None else None):
                return
            if await self.client.put(
                key,
                encode(tag, obj),
                content_type="application/json",
                if_none_match=self.s3.conditional_writes and current is None,
                if_match=current[1] if self.s3.conditional_writes and current else None,
            ):
                return

    async def flush(self, *, force: bool = False) -> None:
        if self.shared_index.tag_writes and self.bucket_ok:
            with trio.CancelScope(shield=True), trio.move_on_after(self.s3.timeout):
                await self._write_tags()
        closing, self._closing = self._closing, []
        releases, self._pending_releases = self._pending_releases, []
        with trio.CancelScope(shield=True):
            for response in closing:
                await response.aclose()
            for digest in releases:
                with trio.move_on_after(self.s3.timeout):
                    await self.leases.release(digest)
        await self._index_writes.flush(force=force)

    async def aclose(self) -> None:
        await self.flush(force=True)
        await self.client.aclose()
        await trio.to_thread.run_sync(self.db.close)

    async def remove(self, digest: str) -> bool:
        if digest in self.pins or digest in self.fills:
            return False
        self.index.remove(digest)
        self._manifests.forget(digest)
        try:
            await self.client.delete(self.key(digest))
        except S3Error as exc:
            self._failed(exc)
            return False
        return True

    # --- eviction across nodes

    async def maintain(self) -> None:
        """Forever: probe the bucket while it fails (`_probe_while_failing`); every
        `evict_interval`, write this node's access batch and, with `max_size`, run an
        eviction pass if no other node is running one."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_while_failing)
            await self._upkeep()

    async def _upkeep(self) -> None:
        while True:
            await trio.sleep(self.s3.evict_interval)
            if not self.bucket_ok:
                continue
            with trio.move_on_after(max(self.s3.evict_interval, self.s3.timeout * 4)):
                try:
                    await self.evictor.write_batch(set(self.pins))
                    for digest in await self.evictor.run_pass():
                        self.index.remove(digest)
                        self._manifests.forget(digest)
                except S3Error as exc:
                    self._failed(exc)
                except Exception:  # upkeep must never end the server
                    log.exception("cache: the bucket's upkeep failed")

    # --- fills

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
        staged.fd, staged.tmp_path, fill.size, fill.headers = fd, tmp_path, size, headers
        fill.state = FillState.STREAMING
        fill.changed()
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
            error = (
                exc
                if isinstance(exc, RelayError)
                else UpstreamError(f"the fill of {fill.digest} stopped")
            )
            await self._fail(staged, error)
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
        staged.error = error
        staged.state = FillState.FAILED
        self._end(staged)
        if isinstance(error, DigestMismatch):
            self.index.count("digest_mismatches")
            log.warning("cache: digest mismatch, not cached: %s", error.message)
        else:
            log.warning("cache: fill of %s failed: %s", staged.digest, error.message)
        await self._abort(staged)
        await self._release(staged.digest)
        self._close_staging(staged)

    # --- small objects (manifests)

    async def put_small(self, digest: str, body: bytes, kind: str, media_type: str) -> None:
        known = self.index.objects.get(digest)
        if not self.bucket_ok or (
            known is not None
            and (known.size, known.kind, known.media_type) == (len(body), kind, media_type)
        ):
            return
        try:
            created = await self.client.put(
                self.key(digest), body, if_none_match=self.s3.conditional_writes
            )
        except S3Error as exc:
            self._failed(exc)
            return
        if created:
            self._distrusted.pop(digest, None)
        elif self._is_distrusted(digest):
            return  # the bucket keeps a copy that failed its check: not ours to serve
        # Size and media type from the verified bytes and the upstream's answer only (an
        # entry that said otherwise is corrected here).
        self.index.add(digest, Obj(len(body), time.time(), kind, media_type))
        self._manifests.remember(digest, body)

    async def read_small(self, digest: str) -> bytes | None:
        body = self._manifests.get(digest)
        if body is not None or not self.bucket_ok:
            return body
        try:
            data = await self.client.get_small(self.key(digest), MAX_SMALL)
        except S3Error as exc:
            self._failed(exc)
            return None
        if data is None:
            await self._bad(digest, "gone")
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            await self._bad(digest, "does not match its digest")
            return None
        known = self.index.objects.get(digest)
        if known is not None and known.size != len(data):  # the bytes are the authority
            self.index.add(digest, Obj(len(data), known.last_used, known.kind, known.media_type))
        self._manifests.remember(digest, data)
        return data
