"""The cache between the app and the upstream: its entry points, and its parts.

`RelayApp` hands manifest and blob requests here. A hit is answered from the store;
a miss goes upstream through `Forwarder.relay` with a hook that sees the
upstream's answer before the client does: a blob's 200 becomes a `Fill` that
every concurrent client reads, a manifest's 200 is stored and tagged.
The decisions (authorization, freshness, ranges, eviction) are in
`vpsrelay.core.cachepolicy`; the modules of the front do the IO they call for:
- `vpsrelay.cache.authorization`: who may be served a cached object (both kinds);
- `vpsrelay.cache.blobs`: how each client is served a blob (a hit, a join, leading a
  fill), and `vpsrelay.cache.finishing`: a resume from the upstream when the store
  fails under a download; `vpsrelay.cache.sending` sends a blob's bytes;
- `vpsrelay.cache.manifests`: tags, hints, revalidation and stale answers, and
  `vpsrelay.cache.manifestmiss`: a manifest the upstream sent, kept.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from vpsrelay.cache.authorization import CACHE_HEADER, STALE_WARNING, Authorization
from vpsrelay.cache.blobs import BlobFront
from vpsrelay.cache.manifests import ManifestFront
from vpsrelay.core import cachepolicy as policy, routing
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    import httpx

    from vpsrelay.cache.storage import BlobStore
    from vpsrelay.core import headers as header_policy
    from vpsrelay.exchange import Exchange
    from vpsrelay.forward import Forwarder

log = logging.getLogger("vpsrelay.cache")


class CacheFront:
    """Serves manifests and blobs from the `BlobStore`, filling it from the upstream."""

    def __init__(self, forwarder: Forwarder, store: BlobStore) -> None:
        self.forwarder = forwarder
        self.store = store
        self.authorization = Authorization(forwarder, store)
        self.blobs = BlobFront(self.authorization)
        self.manifests = ManifestFront(self.authorization)

    # --- entry points, called by RelayApp._serve

    async def serve(self, exchange: Exchange, route: routing.Route) -> None:
        if route.kind is routing.Kind.BLOB:
            await self.blobs.serve(exchange, route)
        else:
            await self.manifests.serve(exchange, route)

    async def base(self, exchange: Exchange, route: routing.Route) -> None:
        """`/v2/`: relayed; when the upstream is down, answered here so that cached
        public images still pull (clients then ask without a token)."""
        try:
            await self.forwarder.relay(
                exchange, route, "/v2/", hook=partial(self._base_hook, exchange)
            )
        except UpstreamError as exc:
            if exchange.status or not self.store.index.tags:
                raise  # nothing cached to offer
            log.warning("upstream unavailable (%s): answering /v2/ from the cache", exc.message)
            await self._offline_base(exchange)

    async def _base_hook(
        self, exchange: Exchange, response: httpx.Response, headers: header_policy.Headers
    ) -> bool:
        if not policy.upstream_is_failing(response.status_code) or not self.store.index.tags:
            return False
        log.warning(
            "upstream answered /v2/ with %d: answering from the cache", response.status_code
        )
        await self._offline_base(exchange)
        return True

    async def _offline_base(self, exchange: Exchange) -> None:
        await exchange.respond(
            200,
            (("content-type", "application/json"), STALE_WARNING, (CACHE_HEADER, "stale")),
            b"{}",
        )
