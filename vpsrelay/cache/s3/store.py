"""`S3Store`: the `BlobStore` on an S3-compatible bucket that several relay nodes share.

Keys (under `cache.s3.prefix`): `blobs/sha256/<hex>` (blobs and manifests, content
addressed), `leases/sha256/<hex>` (who is filling what, `lease.py`), `tags/...` (tags a
node confirmed, a hint to the others: `tags.py`).

`S3Store` is built in layers, one module each, each adding to the one below: `S3Bucket`
(bucket.py: the bucket's health and its probe, what this node distrusts in it, the
index's writes), `S3Filling` (filling.py: fills, staged on this node and uploaded as they
grow, published only when verified), `S3Lookups` (lookups.py: what the bucket holds,
waiting for another node's fill, GETs opened before the client is answered, readers), and
here the rest of a `BlobStore`: connecting, tags shared through the bucket, eviction
across nodes (`maintain`: access batches and eviction passes, `evict.py`) and small
objects (manifests), read back verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files
from vpsrelay.cache.index import Database, Index, Obj, Tag
from vpsrelay.cache.s3 import tags as shared_tags
from vpsrelay.cache.s3.client import S3Client, S3Error
from vpsrelay.cache.s3.lookups import S3Lookups
from vpsrelay.cache.s3.signing import Signer
from vpsrelay.cache.s3.tags import decode, encode, tag_key
from vpsrelay.cache.storage import StoreStats
from vpsrelay.config import Secret

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.config import CacheConfig

__all__ = ["S3Store"]

log = logging.getLogger("vpsrelay.cache")

MAX_SMALL = 4 * 1024 * 1024  # the largest manifest Distribution accepts


class S3Store(S3Lookups):
    """Blobs in a bucket, single-flight across nodes by leases (a `BlobStore`).
    Build it with `S3Store.connect` (in Trio)."""

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
            await store.probe()
        except S3Error as exc:
            store._failed(exc)
            log.warning("cache: the bucket does not answer (%s): passing through for now", exc)
        return store

    def stats(self) -> StoreStats:
        return StoreStats(
            len(self.index.objects), self.index.used, len(self.fills), self.bucket_state()
        )

    # --- tags, shared through the bucket

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
        await super().flush(force=force)

    # --- eviction across nodes

    async def maintain(self) -> None:
        """Forever: probe the bucket while it fails (`_probe_while_failing`); write this
        node's access batch every `evict_interval` (`_write_batches`), whatever a pass
        takes; and, with `max_size`, run an eviction pass when no other node runs one."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._probe_while_failing)
            nursery.start_soon(self._write_batches)
            await self._run_passes()

    async def _write_batches(self) -> None:
        """A batch at least every `evict_interval` + `timeout`: a read covered by an
        older record stays young (`bucketeviction.longest_batch_gap`)."""
        while True:
            await trio.sleep(self.s3.evict_interval)
            if not self.bucket_ok:
                continue  # kept: `write_batch` sends what it has next time
            with trio.move_on_after(self.s3.timeout) as cut:
                try:
                    await self.evictor.write_batch(set(self.pins))
                except S3Error as exc:
                    self._failed(exc)
                except Exception:  # upkeep must never end the server
                    log.exception("cache: writing the access batch failed")
            if cut.cancelled_caught:  # a bucket that does not answer in time fails
                self._failed(S3Error("PUT access batch: deadline"))

    async def _run_passes(self) -> None:
        # Not time-boxed: a pass stops when its lease is lost, its work is bounded
        # (MAX_VICTIMS, MAX_LISTED) and every bucket request has its own deadline.
        while True:
            await trio.sleep(self.s3.evict_interval)
            if not self.bucket_ok:
                continue
            try:
                for digest in await self.evictor.run_pass():
                    self.index.remove(digest)
                    self._manifests.forget(digest)
            except S3Error as exc:
                self._failed(exc)
            except Exception:  # upkeep must never end the server
                log.exception("cache: the bucket's upkeep failed")

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
