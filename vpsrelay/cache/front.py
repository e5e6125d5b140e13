"""The cache between the app and the upstream: hits, fills, manifests, authorization.

`RelayApp` hands manifest and blob requests here. A hit is answered from the store;
a miss goes upstream through `Forwarder.relay` with a hook that sees the
upstream's answer before the client does: a blob's 200 becomes a `Fill` that
every concurrent client reads, a manifest's 200 is stored and tagged.
The decisions (authorization, freshness, ranges, eviction) are in
`vpsrelay.core.cachepolicy`; this module does the IO they call for and chooses how
each client is served (a hit, a join, leading a fill, a resume from the upstream);
`vpsrelay.cache.sending` sends a blob's bytes, from a committed file or a growing fill.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.sending import (
    READ_CHUNK,
    BlobSender,
    Outcome,
    Source,
    pass_rest,
    skipped,
    verified_window,
)
from vpsrelay.cache.storage import FillState, StoreReadFailed, StoreSpill
from vpsrelay.core import auth, cachepolicy as policy, headers as header_policy, routing
from vpsrelay.core.digest import Digest, Verifier, held_back, manifest_verifier
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import DigestMismatch, RelayError, UpstreamError, UpstreamProtocolError
from vpsrelay.exchange import API_VERSION_HEADER, watch_disconnect
from vpsrelay.upstream import USER_AGENT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    import httpx

    from vpsrelay.cache.index import Tag
    from vpsrelay.cache.storage import BlobReader, BlobStore, Fill, Handover
    from vpsrelay.exchange import Exchange
    from vpsrelay.forward import Forwarder, RelayHook

log = logging.getLogger("vpsrelay.cache")

STALE_WARNING = ("warning", '110 vpsrelay "Response is Stale"')
CACHE_HEADER = "x-vpsrelay-cache"
PROBE_TIMEOUT = 10.0
JOIN_ATTEMPTS = 3


class CacheFront:
    """Serves manifests and blobs from the `BlobStore`, filling it from the upstream."""

    def __init__(self, forwarder: Forwarder, store: BlobStore) -> None:
        self.forwarder = forwarder
        self.upstream = forwarder.upstream
        self.observer = forwarder.observer
        self.metrics = forwarder.metrics
        self.registries = forwarder.registries
        self.store = store
        self.config = store.config
        self.grants = policy.Grants(ttl=self.config.auth_ttl)
        self._tag_ttls = dict(self.config.registry_tag_ttl)
        self._sender = BlobSender(self.config.finish_abandoned)

    # --- entry points, called by RelayApp._serve

    async def serve(self, exchange: Exchange, route: routing.Route) -> None:
        if route.kind is routing.Kind.BLOB:
            await self._blob(exchange, route)
        else:
            await self._manifest(exchange, route)

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

    # --- helpers

    def _credential(self, exchange: Exchange) -> str:
        return policy.credential_key(header_policy.get(exchange.headers, "authorization"))

    def _granted(self, exchange: Exchange, route: routing.Route) -> bool:
        return self.grants.allowed(
            self._credential(exchange), route.registry, route.upstream_name, trio.current_time()
        )

    def _grant(self, exchange: Exchange, route: routing.Route) -> None:
        self.grants.grant(
            self._credential(exchange), route.registry, route.upstream_name, trio.current_time()
        )
        if header_policy.get(exchange.headers, "authorization") is None:
            # The upstream answered a request without credentials: anyone may read it.
            self.store.index.set_public(route.registry, route.upstream_name, time.time())

    def _holds(self, digest: str, route: routing.Route) -> bool:
        if self._holds_known(digest, route):
            return True
        self.store.reread_origins(digest)  # another worker may have seen it held
        return self._holds_known(digest, route)

    def _holds_known(self, digest: str, route: routing.Route) -> bool:
        index = self.store.index
        if self.config.share_across_registries:
            return digest in index.origins
        return index.holds(digest, route.registry, route.upstream_name)

    def _public(self, route: routing.Route) -> bool:
        key = (route.registry, route.upstream_name)
        if key not in self.store.index.public:
            self.store.reread_public(*key)
        return key in self.store.index.public

    def _url(self, route: routing.Route, path: str) -> str:
        return f"{self.registries[route.registry].url}{path}"

    async def _head(self, exchange: Exchange, route: routing.Route) -> tuple[int, str | None]:
        """HEAD the client's object upstream with the client's credentials (no redirects):
        the upstream's status and `Docker-Content-Digest`.

        Raises:
            UpstreamError: the upstream could not be asked.
        """
        status, digest, _ = await self._head_typed(exchange, route)
        return status, digest

    async def _head_typed(
        self, exchange: Exchange, route: routing.Route
    ) -> tuple[int, str | None, str]:
        """`_head`, and the media type the upstream named (`Content-Type`, bare)."""
        url = self._url(route, route.upstream_path)
        async with self.forwarder.open_upstream(
            exchange, route, "HEAD", url, follow=False
        ) as response:
            self.observer.upstream_answered(exchange, response)
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            return response.status_code, response.headers.get("docker-content-digest"), media_type

    async def _relay(
        self, exchange: Exchange, route: routing.Route, hook: RelayHook | None = None
    ) -> None:
        await self.forwarder.relay(exchange, route, hook=hook)

    # --- blobs

    async def _blob(self, exchange: Exchange, route: routing.Route) -> None:
        digest = route.reference
        if not digest.startswith("sha256:"):
            await self._relay(exchange, route)
            return
        ranged = header_policy.get(exchange.headers, "range") is not None
        for _ in range(JOIN_ATTEMPTS):
            # A shared store may hold it (another node's fill) or be filling it elsewhere.
            read = exchange.method == "GET"
            obj = self.store.get(digest) or await self.store.locate(
                digest, fill=read and not ranged, read=False
            )
            if obj is not None and obj.kind == "blob":
                await self._serve_stored(exchange, route, digest, obj.size)
                return
            if exchange.method == "HEAD" or ranged:
                await self._relay(exchange, route)  # not cached: pass through
                return
            fill, lead = self.store.claim(digest)
            if lead:
                try:
                    await self._relay(exchange, route, partial(self._lead, exchange, route, fill))
                finally:
                    self.store.drop(fill)  # no-op unless the leader never began
                return
            while not fill.settled:
                await fill.wait_changed()
            if fill.state is FillState.STREAMING:
                if not await self._may_serve_blob(exchange, route, digest):
                    await self._relay(exchange, route)
                    return
                if fill.state is FillState.STREAMING:
                    self.store.index.count("joins")
                    await self._serve_fill(exchange, fill)
                    return
            if fill.state is FillState.COMMITTED:  # committed meanwhile: a hit
                obj = self.store.get(digest)
                if obj is not None and obj.kind == "blob":
                    await self._serve_stored(exchange, route, digest, obj.size)
                    return
            # dropped or failed: claim again (the file may be there without its row)
        await self._relay(exchange, route)

    async def _serve_stored(
        self, exchange: Exchange, route: routing.Route, digest: str, size: int
    ) -> None:
        if not await self._may_serve_blob(exchange, route, digest):
            await self._relay(exchange, route)
            return
        # Only now, authorized, is a shared store's GET opened: a refused client never
        # holds one of the bucket's connections.
        if exchange.method == "GET" and not await self.store.locate(digest, fill=False, read=True):
            await self._relay(exchange, route)  # the bucket failed, or lost it
            return
        await self._serve_file(exchange, route, digest, size)

    async def _may_serve_blob(self, exchange: Exchange, route: routing.Route, digest: str) -> bool:
        """The authorization rule: a live grant for the repository, which holds the blob;
        else the upstream is asked (HEAD with the client's credentials).

        Raises:
            UpstreamError: the upstream could not be asked and the rule forbids
                serving without it.
        """
        granted = self._granted(exchange, route)
        holds = self._holds(digest, route)
        if policy.blob_access(granted=granted, holds_blob=holds) is policy.Access.SERVE:
            return True
        try:
            status, _ = await self._head(exchange, route)
        except UpstreamError:
            if policy.offline_access(
                granted=granted, public=self._public(route), holds_object=holds
            ):
                self.store.index.count("stale_served")
                return True
            raise
        if 200 <= status < 400:
            self._grant(exchange, route)
            self.store.index.add_origin(digest, route.registry, route.upstream_name)
            return True
        if policy.upstream_is_failing(status):
            return policy.offline_access(
                granted=granted, public=self._public(route), holds_object=holds
            )
        return False

    def _blob_headers(self, digest: str, size: int) -> list[tuple[str, str]]:
        return [
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", digest),
            ("accept-ranges", "bytes"),
            ("etag", f'"{digest}"'),
            ("cache-control", "max-age=31536000"),
            API_VERSION_HEADER,
        ]

    async def _serve_file(
        self, exchange: Exchange, route: routing.Route, digest: str, size: int
    ) -> None:
        headers = self._blob_headers(digest, size)
        try:
            byte_range = policy.parse_range(header_policy.get(exchange.headers, "range"), size)
        except policy.Unsatisfiable:
            headers.append(("content-range", f"bytes */{size}"))
            await exchange.respond(416, tuple(headers), b"")
            return
        first, end, status = 0, size, 200
        if byte_range is not None:
            first, end, status = byte_range.first, byte_range.last + 1, 206
            headers.append(("content-range", byte_range.content_range()))
        headers.append(("content-length", str(end - first)))
        headers.append((CACHE_HEADER, "hit"))
        index = self.store.index
        location = self.store.presigned(digest, size) if exchange.method == "GET" else None
        if location is not None:  # the bucket sends it (Range included): authorized above
            index.touch(digest, time.time())
            index.count("hits")
            redirect = (
                ("location", location),
                ("docker-content-digest", digest),
                ("cache-control", "no-store"),
                API_VERSION_HEADER,
                (CACHE_HEADER, "redirect"),
            )
            await exchange.respond(307, redirect, b"")
            self._observe(exchange, route.registry, "hit")
            await self.store.flush()
            return
        index.touch(digest, time.time())
        index.count("hits")
        with self.store.pinned(digest):
            if exchange.method == "HEAD":
                await exchange.start(status, tuple(headers))
                await exchange.body(b"", more=False)
                return
            reader = self.store.open(digest)
            if reader is None:
                await self._relay(exchange, route)
                return
            reader.set_end(end)
            from_cache: int | None = None
            try:
                await exchange.start(status, tuple(headers))
                outcome = await self._sender.send_watched(exchange, Source(reader, first, end))
                from_cache = exchange.bytes_sent
                outcome.error = await self._after_store_failed(
                    exchange, route, digest, (first, end, size), outcome.error
                )
            finally:
                reader.close()
                # Counted here: a client that hangs up right after the last byte has its
                # task cancelled (by Hypercorn) before anything after this would run.
                index.count(
                    "bytes_from_cache", exchange.bytes_sent if from_cache is None else from_cache
                )
                self._observe(exchange, route.registry, "hit")
        await self.store.flush()
        if outcome.error is not None:
            raise outcome.error

    async def _after_store_failed(
        self,
        exchange: Exchange,
        route: routing.Route,
        digest: str,
        span: tuple[int, int, int],
        error: RelayError | None,
    ) -> RelayError | None:
        """The store failed under a hit (not the object's bytes: a `DigestMismatch` or a
        short object breaks the download off): finish the client's response from the
        upstream (`_finish_from_upstream`). The error that ends the response, if any."""
        first, end, size = span
        if not isinstance(error, StoreReadFailed) or exchange.disconnected:
            return error
        sent, handover = first + exchange.bytes_sent, error.handover
        held_to = handover.held_at + len(handover.held)
        if handover.held_at > sent or held_to < min(end, handover.hashed):
            return error  # what the client has is not what the read handed out
        self.store.index.count("bucket_failovers")
        log.warning(
            "cache: the store failed under %s at byte %d (%s): finishing from the upstream",
            digest,
            sent,
            error.message,
        )
        finish = partial(self._finish_from_upstream, exchange, route, handover, (sent, end, size))
        return await self._finish_watched(exchange, finish)

    async def _finish_from_upstream(
        self,
        exchange: Exchange,
        route: routing.Route,
        handover: Handover,
        span: tuple[int, int, int],
    ) -> None:
        """Send the client bytes `sent..end` of a blob whose store read failed: what the
        read held, then the upstream's bytes from where it stopped. The whole object is
        hashed on to its end (a range's too) and the last chunk held back until it matched.

        Raises:
            RelayError: the upstream failed, or the bytes did not match the digest.
        """
        sent, end, size = span
        passed = 0
        async with contextlib.AsyncExitStack() as stack:
            chunks: AsyncIterator[bytes] = _nothing()  # all read: only the check was left
            if handover.hashed < size:
                chunks = await stack.enter_async_context(
                    self._upstream_from(exchange, route, handover.hashed)
                )
            window = verified_window(handover, chunks, sent, end, size)
            async with contextlib.aclosing(window) as body:
                async for chunk in body:
                    passed += len(chunk)
                    await exchange.body(chunk, more=True)
        if passed != end - sent:
            raise UpstreamError(f"the upstream sent {passed} of {end - sent} bytes")
        await exchange.body(b"", more=False)

    async def _serve_fill(self, exchange: Exchange, fill: Fill) -> None:
        reader = self.store.open_fill(fill)
        try:
            headers = [
                *self._blob_headers(fill.digest, fill.size),
                ("content-length", str(fill.size)),
                (CACHE_HEADER, "join"),
            ]
            await exchange.start(200, tuple(headers))
            outcome = await self._sender.send_watched(exchange, Source(reader, 0, fill.size, fill))
            route = exchange.route
            if (
                outcome.error is not None
                and fill.spilled
                and route is not None
                and not exchange.disconnected
            ):
                # The disk failed under the fill: finish this client from the upstream.
                outcome.error = await self._finish_watched(
                    exchange, partial(self._resume_from_upstream, exchange, route, reader, fill)
                )
        finally:
            reader.close()
            if exchange.route is not None:  # here for the reason given in `_serve_file`
                self._observe(exchange, exchange.route.registry, "join")
        if outcome.error is not None:
            raise outcome.error

    async def _finish_watched(
        self, exchange: Exchange, finish: Callable[[], Awaitable[None]]
    ) -> RelayError | None:
        """`finish()` until done or the client leaves; its error, if any."""
        error: RelayError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, exchange, nursery.cancel_scope)
            try:
                await finish()
            except RelayError as exc:  # returned, so it is not wrapped in a group
                error = exc
            nursery.cancel_scope.cancel()
        return error

    async def _resume_from_upstream(
        self, exchange: Exchange, route: routing.Route, reader: BlobReader, fill: Fill
    ) -> None:
        """Send a joined client the rest of a fill whose disk failed: what the disk took,
        then the upstream's bytes from there (`_upstream_from`), all of it hashed again
        and the last chunk held back until the digest matched.

        Raises:
            RelayError: the upstream failed, or the bytes did not match the digest.
        """
        position, written = exchange.bytes_sent, fill.written
        # Hash what the disk holds before asking the upstream, whose connection would
        # otherwise sit idle (and may be dropped) while gigabytes are read back.
        verifier = Verifier(Digest.parse(fill.digest))
        offset = 0
        while offset < written:
            data = await reader.read(offset, min(written - offset, READ_CHUNK), verifier)
            offset += len(data)
        log.info("cache: resuming %s for a joined client at byte %d", fill.digest, written)
        async with self._upstream_from(exchange, route, written) as chunks:
            while position < written:  # the disk's bytes this client lacks
                data = await reader.read(position, min(written - position, READ_CHUNK))
                position += len(data)
                await exchange.body(data, more=True)
            async with contextlib.aclosing(held_back(chunks, verifier)) as body:
                async for chunk in body:
                    await exchange.body(chunk, more=True)
        await exchange.body(b"", more=False)

    @contextlib.asynccontextmanager
    async def _upstream_from(
        self, exchange: Exchange, route: routing.Route, at: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """The blob's bytes from `at` on, from the upstream with the client's credentials
        (`Range: bytes=<at>-`; of an upstream that ignores it, the 200's first `at` bytes
        are skipped, unhashed).

        Raises:
            RelayError: the upstream failed or refused.
        """
        registry = self.registries[route.registry]
        headers = [
            (name, value)
            for name, value in await self.forwarder.upstream_headers(exchange, registry, route)
            if name.lower() not in ("range", "if-range")  # the client's: this one asks its own
        ]
        request = UpstreamRequest(
            "GET", self._url(route, route.upstream_path), (*headers, ("range", f"bytes={at}-"))
        )
        async with self.upstream.open(request, what=route.registry) as response:
            self.observer.upstream_answered(exchange, response)
            ranged = response.status_code == 206 and response.headers.get(
                "content-range", ""
            ).startswith(f"bytes {at}-")
            if not ranged and response.status_code != 200:
                raise UpstreamError(f"the upstream answered {response.status_code} to a resume")
            upstream = self.forwarder.chunks(response, exchange)
            rest = upstream if ranged else skipped(upstream, at)
            async with contextlib.aclosing(upstream), contextlib.aclosing(rest):
                yield rest

    def _observe(self, exchange: Exchange, registry: str, result: str) -> None:
        """The cache's part of the access log and metrics: hit, join (of a fill) or miss."""
        exchange.cache = result
        metrics = self.metrics
        if result == "miss":
            metrics.cache_miss(registry)
        else:
            metrics.cache_hit(registry, exchange.bytes_sent)
        metrics.cache_size(self.store.stats().used_bytes)

    async def _lead(
        self,
        exchange: Exchange,
        route: routing.Route,
        fill: Fill,
        response: httpx.Response,
        headers: header_policy.Headers,
    ) -> bool:
        """The upstream answered the first client: fill the cache from it, if it is a
        whole blob; the client (and any that join) read the fill."""
        length = response.headers.get("content-length", "")
        if response.status_code != 200 or not length.isdigit():
            self.store.drop(fill)
            return False
        self._grant(exchange, route)
        size = int(length)
        if not await self.store.begin(fill, size, headers):
            return False  # no room: the forwarder streams it through, verified as before
        index = self.store.index
        index.add_origin(fill.digest, route.registry, route.upstream_name)
        index.count("misses")
        self._observe(exchange, route.registry, "miss")
        if header_policy.get(headers, "docker-content-digest") is None:
            headers = (*headers, ("docker-content-digest", fill.digest))
        await exchange.start(200, (*headers, (CACHE_HEADER, "miss")))
        reader = self.store.open_fill(fill)
        outcome = Outcome()
        try:
            # Shielded: when this client hangs up, Hypercorn cancels its task, but the fill
            # belongs to every reader (and, by default, finishes without any: see
            # `finish_abandoned`); the upstream read timeout still bounds it.
            with trio.CancelScope(shield=True):
                await self._pump_and_read(exchange, route, fill, response, reader, outcome)
        finally:
            reader.close()
        if outcome.error is not None:
            raise outcome.error
        return True

    async def _pump_and_read(
        self,
        exchange: Exchange,
        route: routing.Route,
        fill: Fill,
        response: httpx.Response,
        reader: BlobReader,
        outcome: Outcome,
    ) -> None:
        """Fill from the upstream while the first client reads the fill as it grows.

        When the disk fails mid-fill, this client still gets the whole blob: the bytes
        on disk, then the rest straight from the upstream through `rest` (verified, the
        last chunk held back as in a pass-through). Clients that joined the fill resume
        with a ranged request of their own (`_resume_from_upstream`).
        """
        rest_send, rest = trio.open_memory_channel[bytes](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_for_leader, exchange, reader, fill, outcome, rest)
            async with rest_send:
                with fill.pump_scope, contextlib.suppress(RelayError):
                    # The fill is marked failed inside; the readers report it.
                    chunks_read = self.forwarder.chunks(response, exchange)
                    async with contextlib.aclosing(chunks_read) as chunks:
                        try:
                            await self.store.pump(fill, chunks)
                        except StoreSpill as spill:
                            await pass_rest(spill, chunks, rest_send, fill)

    async def _read_for_leader(
        self,
        exchange: Exchange,
        reader: BlobReader,
        fill: Fill,
        outcome: Outcome,
        rest: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        async with rest:  # closed when this client is done: `pass_rest` then stops
            source = Source(reader, 0, fill.size, fill, rest)
            result = await self._sender.send_watched(exchange, source)
        outcome.error = result.error

    # --- manifests

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

    async def _manifest(self, exchange: Exchange, route: routing.Route) -> None:
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
        accept = _accept(exchange)
        if (
            digest is None
            or obj is None
            or obj.kind != "manifest"
            or not policy.accepts(accept, obj.media_type)
            or not self._holds(digest, route)
        ):
            if hinted is None or not await self._manifest_from_hint(exchange, route, hinted):
                await self._relay(exchange, route, partial(self._store_manifest, exchange, route))
            return
        granted = self._granted(exchange, route)
        if (
            granted
            and (tag is None or self._fresh(tag, route))
            and await self._send_manifest(exchange, digest, obj.media_type, "hit")
        ):
            return
        # Stale, or this credential is not known to be allowed: ask with a HEAD.
        try:
            status, upstream_digest = await self._head(exchange, route)
        except UpstreamError as exc:
            if await self._serve_stale(exchange, route, digest, tag, granted, exc.message):
                return
            raise
        if policy.upstream_is_failing(status) and await self._serve_stale(
            exchange, route, digest, tag, granted, f"upstream answered {status}"
        ):
            return
        if status != 200:
            await self._relay(exchange, route, partial(self._store_manifest, exchange, route))
            return
        self._grant(exchange, route)
        index.count("revalidations")
        now = time.time()
        if upstream_digest is None or upstream_digest == digest:
            body = await self.store.read_small(digest)
            if body is None:  # gone from the store: the upstream's answer instead
                await self._relay(exchange, route, partial(self._store_manifest, exchange, route))
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
            and self._holds(upstream_digest, route)
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
            exchange, route, hook=partial(self._store_manifest, exchange, route), refused=stale
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
        public = self._public(route)
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
        status, upstream_digest, media_type = await self._head_typed(exchange, route)
        accept = _accept(exchange)
        if status != 200 or upstream_digest != hinted or not policy.accepts(accept, media_type):
            return False
        body = await self.store.read_small(hinted)
        if body is None:
            return False
        # What the upstream just confirmed, and nothing the store said: this repository
        # holds this manifest (and what it names), for this credential.
        self._grant(exchange, route)
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

    async def _store_manifest(
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
        self._grant(exchange, route)
        index = self.store.index
        accept = _accept(exchange)
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
        if seen is not None and time.time() - seen < self.config.public_ttl:
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
        registry = self.registries[route.registry]
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
                self._url(route, f"/v2/{route.upstream_name}/manifests/{digest}"),
                tuple(headers),
            )
            async with self.upstream.open(request, what=route.registry, follow=False) as response:
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


async def _nothing() -> AsyncIterator[bytes]:
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk


def _accept(exchange: Exchange) -> str:
    """The client's `Accept`, its header lines joined."""
    return ", ".join(header_policy.get_all(exchange.headers, "accept"))
