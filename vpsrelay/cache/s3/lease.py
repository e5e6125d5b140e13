"""Fill leases in the bucket: one node at a time fetches a blob from the upstream.

A lease is a small object at `<prefix>leases/sha256/<hex>`, created with
`If-None-Match: *` (only one node's create succeeds) and rewritten by its holder every
third of `lease_ttl` while the fill runs. Its age is measured on the store's clock (its
`Date` minus the lease's `Last-Modified`), so the nodes' own clocks never matter; a store
that sends neither has the age told by how long this node saw the lease unchanged. A lease
older than `lease_ttl` belongs to a dead node: another takes it over with `If-Match` on
the ETag it saw, so of several nodes that noticed at once only one wins.

A holder renews with `If-Match` on the ETag its own last write got, and releases only a
lease that still has that ETag: a slow node whose lease was taken over neither rewrites
nor deletes the new holder's lease.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING

from vpsrelay.cache.s3.client import S3Error
from vpsrelay.core.leases import UnchangedSince, lapsed, lease_age

if TYPE_CHECKING:
    from vpsrelay.cache.s3.client import S3Client

log = logging.getLogger("vpsrelay.cache")


class LeaseState(enum.Enum):
    MINE = "mine"  # this node fills
    TAKEN_OVER = "taken-over"  # this node fills, after a dead node's lease lapsed
    OTHER = "other"  # a live lease of another node: wait for its object


class Leases:
    """Take, renew and release fill leases for one node."""

    def __init__(self, client: S3Client, prefix: str, node: str, ttl: float) -> None:
        self.client = client
        self.prefix = prefix
        self.node = node
        self.ttl = ttl
        self._own: dict[str, str] = {}  # digest -> the ETag of this node's last write
        self._writes = itertools.count()
        self._unchanged = UnchangedSince()

    def key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.prefix}leases/{algorithm}/{hexpart}"

    def _body(self, digest: str) -> bytes:
        # A counter in every write: each renewal gets a new ETag (see `UnchangedSince`).
        return json.dumps(
            {"node": self.node, "digest": digest, "write": next(self._writes)}
        ).encode()

    async def take(self, digest: str) -> LeaseState:
        """Try to become the filler of `digest`.

        Raises:
            S3Error: the bucket failed.
        """
        key = self.key(digest)
        for _ in range(3):  # a lease released between our create and our look: again
            etag = await self.client.put_etag(
                key, self._body(digest), if_none_match=True, content_type="application/json"
            )
            if etag is not None:
                self._own[digest] = etag
                return LeaseState.MINE
            head = await self.client.head(key)
            if head is None:
                continue
            age = lease_age(head.date, head.last_modified)
            if age is None:
                age = self._unchanged.age(key, head.etag, time.monotonic())
            if not lapsed(age, self.ttl):
                return LeaseState.OTHER
            etag = await self.client.put_etag(
                key, self._body(digest), if_match=head.etag, content_type="application/json"
            )
            if etag is not None:
                self._unchanged.forget(key)
                self._own[digest] = etag
                log.warning("cache: took over %s's lapsed lease (%.0f s old)", digest, age or 0)
                return LeaseState.TAKEN_OVER
            return LeaseState.OTHER  # another node took it over first
        return LeaseState.OTHER

    async def renew(self, digest: str) -> bool:
        """Rewrite this node's lease so it stays young; False when it is no longer this
        node's (another took it over, or it is gone): stop filling under it.

        Raises:
            S3Error: the bucket failed.
        """
        own = self._own.get(digest)
        if not own:  # a store that sends no ETag: nothing to check against
            if own is None:
                return False
            await self.client.put(self.key(digest), self._body(digest))
            return True
        etag = await self.client.put_etag(
            self.key(digest), self._body(digest), if_match=own, content_type="application/json"
        )
        if etag is None:
            del self._own[digest]
            log.warning("cache: the lease of %s is no longer this node's", digest)
            return False
        self._own[digest] = etag
        return True

    async def release(self, digest: str) -> None:
        """Delete the lease if it is still this node's; a failure only logs (it lapses
        after `ttl`)."""
        own = self._own.pop(digest, None)
        if own is None:
            return
        key = self.key(digest)
        try:
            if own:
                head = await self.client.head(key)
                if head is None or head.etag != own:
                    return  # taken over meanwhile: the new holder's
            # Conditional too: a takeover between that look and this delete keeps its lease
            # (SeaweedFS and AWS S3 honour If-Match on DELETE).
            await self.client.delete(key, if_match=own or None)
        except S3Error as exc:
            log.warning("cache: could not release the lease of %s: %s", digest, exc)
