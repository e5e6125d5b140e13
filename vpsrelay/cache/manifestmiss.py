"""A manifest the upstream sent: kept, its tag recorded, and the repository's
openness learned.

`keep_answer` is the hook `vpsrelay.cache.manifests` relays a manifest request with: it
sees the upstream's 200 before the client does, keeps its exact bytes (checked against
the digest) and then sends them. Whether anyone may read the repository is asked of the
upstream without credentials, once in a while: the answer decides what is served while
the upstream is down.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.authorization import CACHE_HEADER, FrontPart, upstream_url
from vpsrelay.core import auth, cachepolicy as policy, headers as header_policy
from vpsrelay.core.digest import Digest, manifest_verifier
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import DigestMismatch, RelayError, UpstreamError, UpstreamProtocolError
from vpsrelay.upstream import USER_AGENT

if TYPE_CHECKING:
    import httpx

    from vpsrelay.core import routing
    from vpsrelay.exchange import Exchange

log = logging.getLogger("vpsrelay.cache")

PROBE_TIMEOUT = 10.0


class ManifestMiss(FrontPart):
    """Keeps the manifests the upstream sends, and learns which repositories are public."""

    async def keep_answer(
        self,
        exchange: Exchange,
        route: routing.Route,
        response: httpx.Response,
        headers: header_policy.Headers,
    ) -> bool:
        """Hook on a relayed manifest answer: keep a 200's exact bytes, then send them.

        The bytes are checked against the digest asked for, or else the one announced
        (`headers` carries the digest the body must match, see `checked_digest`); a
        tag is remembered only from an answer any client could have got (`records_tag`).
        """
        if response.status_code != 200:
            return False
        self.authorization.grant(exchange, route)
        index = self.store.index
        accept = client_accept(exchange)
        upstream_digest = header_policy.get(headers, header_policy.DIGEST_HEADER)
        if exchange.method == "HEAD":
            cached = self.store.get(upstream_digest) if upstream_digest else None
            if (
                upstream_digest
                and cached is not None
                and not route.reference_is_digest
                and policy.records_tag(accept, cached.media_type)
            ):
                index.set_tag(
                    route.registry,
                    route.upstream_name,
                    route.reference,
                    upstream_digest,
                    time.time(),
                )
            return False
        length = response.headers.get("content-length", "")
        if not length.isdigit() or int(length) > policy.MAX_MANIFEST_BYTES:
            return False
        body = bytearray()
        async for chunk in response.aiter_raw():  # from `Upstream.open`: RelayErrors only
            body += chunk
            if len(body) > policy.MAX_MANIFEST_BYTES:
                raise UpstreamError("manifest larger than announced")
        data = bytes(body)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        content_type = response.headers.get("content-type")
        if upstream_digest is not None:
            verifier = manifest_verifier(Digest.parse(upstream_digest), content_type)
            verifier.update(data)
            try:
                verifier.finish()
            except DigestMismatch:
                index.count("digest_mismatches")
                raise
        media_type = (content_type or "").split(";")[0].strip()
        # Kept under the digest of its bytes, so only if that is the digest announced (not
        # so for a signed schema 1 manifest, or a digest of another algorithm).
        if upstream_digest in (None, digest) and media_type:
            await self.store.put_small(digest, data, "manifest", media_type)
            index.add_origin(digest, route.registry, route.upstream_name)
            for child in policy.manifest_children(data):
                index.add_origin(child, route.registry, route.upstream_name)
            if not route.reference_is_digest and policy.records_tag(accept, media_type):
                index.set_tag(
                    route.registry, route.upstream_name, route.reference, digest, time.time()
                )
        # Through before the answer: the client's next request may reach another worker,
        # which must find the manifest and tag rather than fetch them again.
        with trio.CancelScope(shield=True):
            await self.store.flush(force=True)
        try:
            await exchange.start(200, (*headers, (CACHE_HEADER, "miss")))
            await exchange.body(data, more=False)
        finally:
            # A client that hangs up once it has the manifest makes Hypercorn cancel this
            # task, even inside the last send; what follows matters for the next outage,
            # so it runs anyway, shielded (bounded).
            with trio.CancelScope(shield=True):
                await self._learn_public(route, digest, media_type)
        return True

    async def _learn_public(self, route: routing.Route, digest: str, media_type: str) -> None:
        """Ask the upstream, without credentials, whether anyone may read this
        repository: the answer decides what is served while the upstream is down."""
        key = (route.registry, route.upstream_name)
        seen = self.store.index.public.get(key)
        if seen is not None and time.time() - seen < self.store.config.public_ttl:
            return
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                public = await self._anonymous_head(route, digest, media_type)
                log.info("cache: %s/%s is %s", *key, "public" if public else "not public")
                if public:
                    self.store.index.set_public(*key, time.time())
            except RelayError as exc:
                log.info("cache: could not ask whether %s is public: %s", key, exc.message)

    async def _anonymous_head(self, route: routing.Route, digest: str, media_type: str) -> bool:
        registry = self.forwarder.registries[route.registry]
        # Distribution answers 404 for an OCI manifest the Accept header does not admit.
        tokens = self.forwarder.tokens
        for attempt in range(2):
            headers = [("user-agent", USER_AGENT), ("accept", media_type)]
            try:
                token = await tokens.pull_token(registry, [route.upstream_name], operator=False)
            except UpstreamProtocolError:  # refused, or no token in the answer
                return False  # no token for anonymous callers: not public
            if token is not None:
                headers.append(("authorization", f"Bearer {token}"))
            request = UpstreamRequest(
                "HEAD",
                upstream_url(
                    self.forwarder, route, f"/v2/{route.upstream_name}/manifests/{digest}"
                ),
                tuple(headers),
            )
            async with self.forwarder.upstream.open(
                request, what=route.registry, follow=False
            ) as response:
                if (
                    response.status_code == 401
                    and token is not None
                    and attempt == 0
                    and auth.fresh_token_may_help(response.headers.get_list("www-authenticate"))
                ):
                    # The relay's anonymous token was refused (not merely short of the
                    # rights, as for a private repository): a fresh one, once.
                    tokens.forget(registry.name, [route.upstream_name], anonymous_only=True)
                    continue
                return response.status_code == 200
        return False


def client_accept(exchange: Exchange) -> str:
    """The client's `Accept`, its header lines joined."""
    return ", ".join(header_policy.get_all(exchange.headers, "accept"))
