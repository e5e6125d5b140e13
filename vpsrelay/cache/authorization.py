"""Who may be served a cached object: the rule that blobs and manifests share.

A cached object is served to a client only when this relay knows the client may read
the repository (a live grant for its credential) and the repository holds the object;
else the upstream is asked, with the client's credentials. The decisions are
`vpsrelay.core.cachepolicy`'s; this module keeps what they are made from (grants, which
repositories hold what, which are public) and asks the upstream its HEAD.
Below every other module of the front, this one also holds what they all start from:
`FrontPart`, and the headers that tell a client how the cache answered.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from vpsrelay.core import cachepolicy as policy, headers as header_policy
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from vpsrelay.cache.storage import BlobStore
    from vpsrelay.core import routing
    from vpsrelay.exchange import Exchange
    from vpsrelay.forward import Forwarder, RelayHook

STALE_WARNING = ("warning", '110 vpsrelay "Response is Stale"')
CACHE_HEADER = "x-vpsrelay-cache"


def upstream_url(forwarder: Forwarder, route: routing.Route, path: str) -> str:
    """`path` at the route's registry."""
    return f"{forwarder.registries[route.registry].url}{path}"


class Authorization:
    """The authorization rule for cached objects, and what it is decided from."""

    def __init__(self, forwarder: Forwarder, store: BlobStore) -> None:
        self.forwarder = forwarder
        self.store = store
        self.grants = policy.Grants(ttl=store.config.auth_ttl)

    def _credential(self, exchange: Exchange) -> str:
        return policy.credential_key(header_policy.get(exchange.headers, "authorization"))

    def granted(self, exchange: Exchange, route: routing.Route) -> bool:
        return self.grants.allowed(
            self._credential(exchange), route.registry, route.upstream_name, trio.current_time()
        )

    def grant(self, exchange: Exchange, route: routing.Route) -> None:
        self.grants.grant(
            self._credential(exchange), route.registry, route.upstream_name, trio.current_time()
        )
        if header_policy.get(exchange.headers, "authorization") is None:
            # The upstream answered a request without credentials: anyone may read it.
            self.store.index.set_public(route.registry, route.upstream_name, time.time())

    def holds(self, digest: str, route: routing.Route) -> bool:
        if self._holds_known(digest, route):
            return True
        self.store.reread_origins(digest)  # another worker may have seen it held
        return self._holds_known(digest, route)

    def _holds_known(self, digest: str, route: routing.Route) -> bool:
        index = self.store.index
        if self.store.config.share_across_registries:
            return digest in index.origins
        return index.holds(digest, route.registry, route.upstream_name)

    def public(self, route: routing.Route) -> bool:
        key = (route.registry, route.upstream_name)
        if key not in self.store.index.public:
            self.store.reread_public(*key)
        return key in self.store.index.public

    async def head(self, exchange: Exchange, route: routing.Route) -> tuple[int, str | None]:
        """HEAD the client's object upstream with the client's credentials (no redirects):
        the upstream's status and `Docker-Content-Digest`.

        Raises:
            UpstreamError: the upstream could not be asked.
        """
        status, digest, _ = await self.head_typed(exchange, route)
        return status, digest

    async def head_typed(
        self, exchange: Exchange, route: routing.Route
    ) -> tuple[int, str | None, str]:
        """`head`, and the media type the upstream named (`Content-Type`, bare)."""
        url = upstream_url(self.forwarder, route, route.upstream_path)
        async with self.forwarder.open_upstream(
            exchange, route, "HEAD", url, follow=False
        ) as response:
            self.forwarder.observer.upstream_answered(exchange, response)
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            return response.status_code, response.headers.get("docker-content-digest"), media_type

    async def may_serve_blob(self, exchange: Exchange, route: routing.Route, digest: str) -> bool:
        """The rule for a blob: a live grant for the repository, which holds the blob;
        else the upstream is asked (HEAD with the client's credentials).

        Raises:
            UpstreamError: the upstream could not be asked and the rule forbids
                serving without it.
        """
        granted = self.granted(exchange, route)
        holds = self.holds(digest, route)
        if policy.blob_access(granted=granted, holds_blob=holds) is policy.Access.SERVE:
            return True
        try:
            status, _ = await self.head(exchange, route)
        except UpstreamError:
            if policy.offline_access(
                granted=granted, public=self.public(route), holds_object=holds
            ):
                self.store.index.count("stale_served")
                return True
            raise
        if 200 <= status < 400:
            self.grant(exchange, route)
            self.store.index.add_origin(digest, route.registry, route.upstream_name)
            return True
        if policy.upstream_is_failing(status):
            return policy.offline_access(
                granted=granted, public=self.public(route), holds_object=holds
            )
        return False


class FrontPart:
    """A part of the cache front: given the rule, and through it the forwarder and store."""

    def __init__(self, authorization: Authorization) -> None:
        self.authorization = authorization
        self.forwarder = authorization.forwarder
        self.store = authorization.store

    async def _relay(
        self, exchange: Exchange, route: routing.Route, hook: RelayHook | None = None
    ) -> None:
        """Pass the request through to the upstream; `hook` sees the answer first."""
        await self.forwarder.relay(exchange, route, hook=hook)
