"""Fill leases in the bucket: one node at a time fetches a blob from the upstream.

A lease is a small object at `<prefix>leases/sha256/<hex>`, created with
`If-None-Match: *` (only one node's create succeeds) and rewritten by its holder every
third of `lease_ttl` while the fill runs. Its age is measured on the store's clock (its
`Date` minus the lease's `Last-Modified`), so the nodes' own clocks never matter. A lease
older than `lease_ttl` belongs to a dead node: another takes it over with `If-Match` on
the ETag it saw, so of several nodes that noticed at once only one wins.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import TYPE_CHECKING

from vpsrelay.cache.s3.client import S3Error
from vpsrelay.core.leases import lapsed, lease_age

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

    def key(self, digest: str) -> str:
        algorithm, _, hexpart = digest.partition(":")
        return f"{self.prefix}leases/{algorithm}/{hexpart}"

    def _body(self, digest: str) -> bytes:
        return json.dumps({"node": self.node, "digest": digest}).encode()

    async def take(self, digest: str) -> LeaseState:
        """Try to become the filler of `digest`.

        Raises:
            S3Error: the bucket failed.
        """
        key = self.key(digest)
        for _ in range(3):  # a lease released between our create and our look: again
            if await self.client.put(
                key, self._body(digest), if_none_match=True, content_type="application/json"
            ):
                return LeaseState.MINE
            head = await self.client.head(key)
            if head is None:
                continue
            age = lease_age(head.date, head.last_modified)
            if not lapsed(age, self.ttl):
                return LeaseState.OTHER
            if await self.client.put(
                key, self._body(digest), if_match=head.etag, content_type="application/json"
            ):
                log.warning("cache: took over %s's lapsed lease (%.0f s old)", digest, age or 0)
                return LeaseState.TAKEN_OVER
            return LeaseState.OTHER  # another node took it over first
        return LeaseState.OTHER

    async def renew(self, digest: str) -> None:
        """Rewrite the lease so it stays young (raises S3Error)."""
        await self.client.put(self.key(digest), self._body(digest), content_type="application/json")

    async def release(self, digest: str) -> None:
        """Delete the lease; a failure only logs (it lapses after `ttl`)."""
        try:
            await self.client.delete(self.key(digest))
        except S3Error as exc:
            log.warning("cache: could not release the lease of %s: %s", digest, exc)
