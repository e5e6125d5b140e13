"""Eviction across the nodes that share a bucket.

Every node writes the objects it served (and those it is serving) since its last batch as
one small object, `<prefix>access/batch-<node>-<n>.json`, every `evict_interval`. One node
at a time (the one holding the lease `<prefix>leases/evict/all`) folds the batches into
`<prefix>access/merged.json`, lists the blobs and deletes the least recently accessed ones
until the bucket is under `max_size`, sparing anything accessed within `evict_grace`
(`vpsrelay.core.bucketeviction`). Right before deleting it reads the batches once more, so
an object a node began to serve meanwhile is spared too.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.s3.client import S3Error
from vpsrelay.cache.s3.lease import LeaseState
from vpsrelay.core import bucketeviction
from vpsrelay.core.leases import lapsed, lease_age

if TYPE_CHECKING:
    from vpsrelay.cache.s3.client import S3Client
    from vpsrelay.cache.s3.lease import Leases
    from vpsrelay.config import S3Config

log = logging.getLogger("vpsrelay.cache")

EVICT_LEASE = "evict:all"
MAX_LISTED = 200_000  # objects one pass looks at (bounded memory and time)
MAX_BATCH = 4 * 1024 * 1024
ABANDONED_TTLS = 3  # an upload this many lease_ttl old with no live lease is abandoned
ABANDONED_NO_LEASES = 24 * 3600.0  # without leases: a day, like a lifecycle rule's minimum
MAX_UPLOAD_PAGES = 100  # bounded time per pass


class Evictor:
    def __init__(self, client: S3Client, leases: Leases, config: S3Config, node: str) -> None:
        self.client = client
        self.leases = leases
        self.config = config
        self.node = node
        self.accessed: dict[str, float] = {}  # since the last batch
        self._batches = 0

    @property
    def _access_prefix(self) -> str:
        return f"{self.config.prefix}access/"

    def touch(self, digest: str) -> None:
        self.accessed[digest] = time.time()

    async def write_batch(self, in_use: set[str]) -> None:
        """Record what this node served (and serves now) since the last batch."""
        now = time.time()
        batch = {**self.accessed, **dict.fromkeys(in_use, now)}
        if not batch:
            return
        self._batches += 1
        key = f"{self._access_prefix}batch-{self.node}-{self._batches:08d}.json"
        await self.client.put(key, json.dumps(batch).encode(), content_type="application/json")
        self.accessed = {}

    async def run_pass(self) -> list[str]:
        """One eviction pass if this node gets the lease; the digests deleted."""
        if await self.leases.take(EVICT_LEASE) is LeaseState.OTHER:
            return []
        deleted: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, nursery.cancel_scope)
                await self._abort_abandoned_uploads()
                if self.config.max_size > 0:
                    await self._evict(deleted)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.timeout):
                await self.leases.release(EVICT_LEASE)
        return deleted

    async def _keep_lease(self, evicting: trio.CancelScope) -> None:
        """Renew the eviction lease while a pass runs (it may run longer than
        `lease_ttl`); a pass whose lease was taken over stops at once."""
        while True:
            await trio.sleep(self.config.lease_ttl / 3)
            if not await self.leases.renew(EVICT_LEASE):
                log.warning("cache: the eviction lease was taken over: pass stopped")
                evicting.cancel()
                return

    async def _abort_abandoned_uploads(self) -> None:
        """Abort the multipart uploads no fill is behind any more: a dead node's, or one
        whose abort failed while the bucket was down. With leases: started more than
        `ABANDONED_TTLS` x `lease_ttl` ago and no live lease on the digest; without
        (`conditional_writes = false`), started more than `ABANDONED_NO_LEASES` ago."""
        now = time.time()
        leased = self.config.conditional_writes
        oldest = now - (self.config.lease_ttl * ABANDONED_TTLS if leased else ABANDONED_NO_LEASES)
        after: tuple[str, str] | None = ("", "")
        aborted = pages = 0
        while after is not None and pages < MAX_UPLOAD_PAGES:
            page, after = await self.client.uploads_page(f"{self.config.prefix}blobs/", after)
            pages += 1
            for upload in page:
                if upload.initiated is None or upload.initiated.timestamp() > oldest:
                    continue
                digest = "sha256:" + upload.key.rsplit("/", 1)[-1]
                if leased and await self._lease_is_live(digest):
                    continue
                await self.client.abort_upload(upload.key, upload.upload_id)
                aborted += 1
        if aborted:
            log.info("cache: aborted %d abandoned upload(s) in the bucket", aborted)

    async def _lease_is_live(self, digest: str) -> bool:
        head = await self.client.head(self.leases.key(digest))
        if head is None:
            return False
        age = lease_age(head.date, head.last_modified)
        return age is None or not lapsed(age, self.config.lease_ttl)

    async def _fold_batches(self, merged: dict[str, float]) -> list[str]:
        """Fold every batch into `merged`; the batch keys read."""
        listed, _ = await self.client.list(f"{self._access_prefix}batch-")
        keys = [item.key for item in listed]
        for key in keys:
            body = await self.client.get_small(key, MAX_BATCH)
            if body is not None:
                try:
                    bucketeviction.merge(merged, json.loads(body))
                except ValueError:
                    log.warning("cache: ignoring a malformed access batch %s", key)
        return keys

    async def _evict(self, deleted: list[str]) -> None:
        merged_key = f"{self._access_prefix}merged.json"
        merged: dict[str, float] = {}
        body = await self.client.get_small(merged_key, 64 * 1024 * 1024)
        if body is not None:
            try:
                bucketeviction.merge(merged, json.loads(body))
            except ValueError:
                log.warning("cache: ignoring a malformed %s", merged_key)
        folded = await self._fold_batches(merged)
        blobs_prefix = f"{self.config.prefix}blobs/"
        stored: list[bucketeviction.Stored] = []
        token: str | None = ""
        while token is not None and len(stored) < MAX_LISTED:
            page, token = await self.client.list(blobs_prefix, token or "")
            for item in page:
                digest = "sha256:" + item.key.rsplit("/", 1)[-1]
                uploaded = item.last_modified.timestamp() if item.last_modified else time.time()
                last = max(merged.get(digest, 0.0), uploaded)
                stored.append(bucketeviction.Stored(item.key, item.size, last))
        victims = bucketeviction.plan(
            stored,
            max_size=self.config.max_size,
            now=time.time(),
            grace=self.config.evict_grace,
        )
        if victims:
            # Last look: a node may have begun to serve one of them since the batches
            # were read.
            folded += await self._fold_batches(merged)
            deadline = time.time() - self.config.evict_grace
            victims = [
                key
                for key in victims
                if merged.get("sha256:" + key.rsplit("/", 1)[-1], 0.0) < deadline
            ]
        for key in victims:
            await self.client.delete(key)
            deleted.append("sha256:" + key.rsplit("/", 1)[-1])
        present = {"sha256:" + item.key.rsplit("/", 1)[-1] for item in stored}
        live = {d: t for d, t in merged.items() if d in present and d not in deleted}
        await self.client.put(
            merged_key, json.dumps(live).encode(), content_type="application/json"
        )
        for key in set(folded):
            try:
                await self.client.delete(key)
            except S3Error as exc:
                log.warning("cache: could not delete the access batch %s: %s", key, exc)
        if deleted:
            log.info(
                "cache: evicted %d object(s) from the bucket (cap %d bytes)",
                len(deleted),
                self.config.max_size,
            )
