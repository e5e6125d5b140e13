"""Manifests from the cache: tags and their TTLs, bucket tag hints, revalidation, stale.

A manifest asked for by digest, or by a tag still fresh (its registry's `tag_ttl`), is
served from the store to a client the authorization rule allows
(`vpsrelay.cache.authorization`); else the upstream is asked with a HEAD (free on
Docker Hub, where a GET is a pull), and only a tag that moved is fetched again
(`vpsrelay.cache.manifestmiss` keeps it). A tag another node recorded in a shared store
is a hint, served once the upstream's HEAD confirms it. When the upstream fails, a
stored copy is served stale (`max_stale`) to a client that may read it.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

from vpsrelay.cache.authorization import CACHE_HEADER, STALE_WARNING, FrontPart
from vpsrelay.cache.manifestmiss import ManifestMiss, client_accept
from vpsrelay.core import cachepolicy as policy
from vpsrelay.errors import UpstreamError
from vpsrelay.exchange import API_VERSION_HEADER

if TYPE_CHECKING:
    from vpsrelay.cache.authorization import Authorization
    from vpsrelay.cache.index import Tag
    from vpsrelay.core import routing
    from vpsrelay.exchange import Exchange

log = logging.getLogger("vpsrelay.cache")


class ManifestFront(FrontPart):
    """Serves manifests and tags from the `BlobStore`, revalidating tags upstream."""

    def __init__(self, authorization: Authorization) -> None:
        super().__init__(authorization)
        self.config = self.store.config
        self._miss = ManifestMiss(authorization)
        self._tag_ttls = dict(self.config.registry_tag_ttl)

    def _tag_ttl(self, registry: str) -> float:
        return self._tag_ttls.get(registry, self.config.tag_ttl)

    def _fresh(self, tag: Tag, route: routing.Route) -> bool:
        action = policy.tag_action(
            checked_at=tag.checked_at, now=time.time(), ttl=self._tag_ttl(route.registry)
        )
        return action is policy.TagAction.SERVE

    def _tag(self, route: routing.Route) -> Tag | None:
        """The client's tag, from memory, or as another worker last checked it."""
        key = (route.registry, route.upstream_name, route.reference)
        tag = self.store.index.tags.get(key)
        if tag is None or not self._fresh(tag, route):
            tag = self.store.reread_tag(*key)
        return tag

    async def serve(self, exchange: Exchange, route: routing.Route) -> None:
        hinted = None
        if not route.reference_is_digest:
            # A store shared with other nodes (a bucket) may know the tag: a hint only.
            hinted = await self.store.refresh_tag(
                route.registry, route.upstream_name, route.reference
            )
        tag = None if route.reference_is_digest else self._tag(route)
        if tag is not None and not self._fresh(tag, route):
            # One worker revalidates a tag at a time; the others wait, then find it fresh.
            key = (route.registry, route.upstream_name, route.reference)
            async with self.store.revalidating(*key):
                tag = self._tag(route)
                await self._manifest_for(exchange, route, tag, hinted)
            return
        await self._manifest_for(exchange, route, tag, hinted)

    async def _manifest_for(
        self, exchange: Exchange, route: routing.Route, tag: Tag | None, hinted: str | None
    ) -> None:
        index = self.store.index
        digest: str | None = route.reference if route.reference_is_digest else None
        if tag is not None:
            digest = tag.digest
        obj = self.store.get(digest) if digest is not None else None
        accept = client_accept(exchange)
        if (
            digest is None
            or obj is None
            or obj.kind != "manifest"
            or not policy.accepts(accept, obj.media_type)
            or not self.authorization.holds(digest, route)
        ):
            if hinted is None or not await self._manifest_from_hint(exchange, route, hinted):
                await self._relay(exchange, route, partial(self._miss.keep_answer, exchange, route))
            return
        granted = self.authorization.granted(exchange, route)
        if (
            granted
            and (tag is None or self._fresh(tag, route))
            and await self._send_manifest(exchange, digest, obj.media_type, "hit")
        ):
            return
        # Stale, or this credential is not known to be allowed: ask with a HEAD.
        try:
            status, upstream_digest = await self.authorization.head(exchange, route)
        except UpstreamError as exc:
            if await self._serve_stale(exchange, route, digest, tag, granted, exc.message):
                return
            raise
        if policy.upstream_is_failing(status) and await self._serve_stale(
            exchange, route, digest, tag, granted, f"upstream answered {status}"
        ):
            return
        if status != 200:
            await self._relay(exchange, route, partial(self._miss.keep_answer, exchange, route))
            return
        self.authorization.grant(exchange, route)
        index.count("revalidations")
        now = time.time()
        if upstream_digest is None or upstream_digest == digest:
            body = await self.store.read_small(digest)
            if body is None:  # gone from the store: the upstream's answer instead
                await self._relay(exchange, route, partial(self._miss.keep_answer, exchange, route))
                return
            if tag is not None and policy.records_tag(accept, obj.media_type):
                index.set_tag(route.registry, route.upstream_name, route.reference, digest, now)
                await self.store.flush(force=True)  # through at once: other workers read it
            await self._send_manifest(exchange, digest, obj.media_type, "revalidated", body)
            return
        # The tag moved. The new manifest may be cached already (another tag, a rollback).
        new = self.store.get(upstream_digest)
        if (
            tag is not None
            and new is not None
            and new.kind == "manifest"
            and policy.accepts(accept, new.media_type)
            and self.authorization.holds(upstream_digest, route)
        ):
            body = await self.store.read_small(upstream_digest)
            if body is not None:
                if policy.records_tag(accept, new.media_type):
                    index.set_tag(
                        route.registry, route.upstream_name, route.reference, upstream_digest, now
                    )
                    await self.store.flush(force=True)
                await self._send_manifest(exchange, upstream_digest, new.media_type, "hit", body)
                return
        # Docker Hub's HEAD is free, its GET a pull: when the pulls are spent (429), the
        # copy the client's tag named until now is served, stale.
        stale = partial(self._serve_stale, exchange, route, digest, tag, True, "upstream 429")
        await self.forwarder.relay(
            exchange, route, hook=partial(self._miss.keep_answer, exchange, route), refused=stale
        )

    async def _serve_stale(
        self,
        exchange: Exchange,
        route: routing.Route,
        digest: str,
        tag: Tag | None,
        granted: bool,
        why: str,
    ) -> bool:
        public = self.authorization.public(route)
        if not policy.offline_access(granted=granted, public=public, holds_object=True):
            return False
        obj = self.store.get(digest)
        if obj is None:
            return False
        if tag is not None and not policy.may_serve_stale(
            checked_at=tag.checked_at, now=time.time(), max_stale=self.config.max_stale
        ):
            return False
        self.store.index.count("stale_served")
        log.warning(
            "serving %s %s from the cache, stale: %s",
            route.upstream_name,
            route.reference,
            why,
        )
        return await self._send_manifest(exchange, digest, obj.media_type, "stale")

    async def _send_manifest(
        self,
        exchange: Exchange,
        digest: str,
        media_type: str,
        how: str,
        body: bytes | None = None,
    ) -> bool:
        """Answer from the store; False (nothing sent) when the store cannot deliver
        the manifest now (gone, or the bucket fails): the caller asks the upstream.
        The body is read before anything is committed, for a HEAD too, and its length
        is the one announced (never a length the index was told)."""
        if body is None:
            body = await self.store.read_small(digest)
            if body is None:
                return False
        headers = [
            ("content-type", media_type),
            ("docker-content-digest", digest),
            ("etag", f'"{digest}"'),
            ("content-length", str(len(body))),
            API_VERSION_HEADER,
            (CACHE_HEADER, how),
        ]
        if how == "stale":
            headers.append(STALE_WARNING)
        self.store.index.touch(digest, time.time())
        self.store.index.count("hits")
        await exchange.start(200, tuple(headers))
        await exchange.body(b"" if exchange.method == "HEAD" else body, more=False)
        await self.store.flush()
        return True

    async def _manifest_from_hint(
        self, exchange: Exchange, route: routing.Route, hinted: str
    ) -> bool:
        """Serve a tag that another node recorded in the shared store, once confirmed:
        the upstream's HEAD (free, with the client's credentials) must name the same
        digest; the manifest is then read by that digest (verified), and its media type
        is the upstream's. False: nothing sent (the caller relays)."""
        status, upstream_digest, media_type = await self.authorization.head_typed(exchange, route)
        accept = client_accept(exchange)
        if status != 200 or upstream_digest != hinted or not policy.accepts(accept, media_type):
            return False
        body = await self.store.read_small(hinted)
        if body is None:
            return False
        # What the upstream just confirmed, and nothing the store said: this repository
        # holds this manifest (and what it names), for this credential.
        self.authorization.grant(exchange, route)
        index = self.store.index
        await self.store.put_small(hinted, body, "manifest", media_type)
        index.add_origin(hinted, route.registry, route.upstream_name)
        for child in policy.manifest_children(body):
            index.add_origin(child, route.registry, route.upstream_name)
        index.count("revalidations")
        if policy.records_tag(accept, media_type):
            index.set_tag(route.registry, route.upstream_name, route.reference, hinted, time.time())
            await self.store.flush(force=True)
        return await self._send_manifest(exchange, hinted, media_type, "revalidated", body)
