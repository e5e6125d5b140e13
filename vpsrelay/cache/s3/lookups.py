"""The bucket store's lookups and reads: `S3Lookups` adds them to `S3Filling` (filling.py).

`locate` asks the bucket what it holds (a HEAD), or, on a miss that would fill, takes
the blob's lease or waits for the node that holds it (bounded by `lease_wait`). For a
read it opens the object's GET before the client is answered, so that a bucket that
fails now means a pass-through, not a broken download; `open` (an `S3Reader`, verified
as it streams: reader.py) and `presigned` take these prepared GETs, and those nobody
takes are closed (`PREPARED_TTL`, `MAX_PREPARED`). `get` answers for manifests only.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.index import Obj
from vpsrelay.cache.memory import Pins
from vpsrelay.cache.s3.client import S3Busy, S3Error
from vpsrelay.cache.s3.filling import S3Filling
from vpsrelay.cache.s3.lease import LeaseState
from vpsrelay.cache.s3.reader import S3Reader
from vpsrelay.core.imageref import EMPTY_SHA256

if TYPE_CHECKING:
    import contextlib
    from pathlib import Path

    import httpx

    from vpsrelay.cache.index import Database, Index
    from vpsrelay.cache.s3.client import S3Client
    from vpsrelay.config import CacheConfig

log = logging.getLogger("vpsrelay.cache")

POLL_INTERVAL = 0.5  # seconds between looks at another node's fill
PREPARED_TTL = 30.0  # seconds a GET opened by `locate` waits for its reader
MAX_PREPARED = 16  # GETs opened by `locate` waiting for their readers, per process


class S3Lookups(S3Filling):
    """What the bucket holds, waiting for another node's fill; reads of it."""

    def __init__(
        self, root: Path, config: CacheConfig, db: Database, index: Index, client: S3Client
    ) -> None:
        super().__init__(root, config, db, index, client)
        self.pins = Pins()
        self._locks: dict[str, trio.Lock] = {}
        self._waited_out: dict[str, float] = {}  # digest -> when waiting for it timed out
        self._prepared: dict[str, list[tuple[float, httpx.Response]]] = {}

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

    async def _look(self, digest: str) -> Obj | None:
        head = await self.client.head(self.key(digest))
        if head is None:
            return None
        if head.size == 0 and digest != str(EMPTY_SHA256):
            # Nothing would be read, so nothing hashed: an emptied object (a bucket
            # writer's, or a store's fault) would go out complete and unchecked.
            await self._bad(digest, "is empty")
            return None
        obj = Obj(head.size, time.time(), "blob")
        known = self.index.objects.get(digest)
        if known is None:
            self.index.add(digest, obj)
            return obj
        return known

    # --- GETs opened before the client is answered

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
            response = await self.client.open_get(self.key(digest), blob=True)
        except S3Busy as exc:
            log.info("cache: %s: passing this request by the bucket", exc)
            return False
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
