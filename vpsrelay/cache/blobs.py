"""Blobs from the cache: a hit, a join of a fill under way, or leading a fill.

A blob the store holds is served once the authorization rule allows it
(`vpsrelay.cache.authorization`): from the store, or by a redirect to the bucket. A
miss makes the first client the leader: the upstream's answer fills the store while
that client, and every client that joins, reads the fill as it grows
(`vpsrelay.cache.sending`). When the store fails under a download, the client is
finished from the upstream (`vpsrelay.cache.finishing`).
"""

from __future__ import annotations

import contextlib
import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.authorization import CACHE_HEADER, FrontPart
from vpsrelay.cache.finishing import UpstreamFinisher
from vpsrelay.cache.sending import BlobSender, Outcome, Source, pass_rest
from vpsrelay.cache.storage import FillState, StoreSpill
from vpsrelay.core import cachepolicy as policy, headers as header_policy
from vpsrelay.errors import RelayError
from vpsrelay.exchange import API_VERSION_HEADER

if TYPE_CHECKING:
    import httpx

    from vpsrelay.cache.authorization import Authorization
    from vpsrelay.cache.storage import BlobReader, Fill
    from vpsrelay.core import routing
    from vpsrelay.exchange import Exchange

JOIN_ATTEMPTS = 3


class BlobFront(FrontPart):
    """Serves blobs from the `BlobStore`, filling it from the upstream."""

    def __init__(self, authorization: Authorization) -> None:
        super().__init__(authorization)
        self._finisher = UpstreamFinisher(authorization)
        self._sender = BlobSender(self.store.config.finish_abandoned)

    async def serve(self, exchange: Exchange, route: routing.Route) -> None:
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
                if not await self.authorization.may_serve_blob(exchange, route, digest):
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
        if not await self.authorization.may_serve_blob(exchange, route, digest):
            await self._relay(exchange, route)
            return
        # Only now, authorized, is a shared store's GET opened: a refused client never
        # holds one of the bucket's connections.
        if exchange.method == "GET" and not await self.store.locate(digest, fill=False, read=True):
            await self._relay(exchange, route)  # the bucket failed, or lost it
            return
        await self._serve_file(exchange, route, digest, size)

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
            # Observed first: a client that hangs up as the 307 goes out has its task
            # cancelled before anything after `respond` runs (its log line lacked cache=hit).
            self._observe(exchange, route.registry, "hit")
            await exchange.respond(307, redirect, b"")
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
                outcome.error = await self._finisher.after_store_failed(
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
                outcome.error = await self._finisher.after_fill_spilled(
                    exchange, route, reader, fill
                )
        finally:
            reader.close()
            if exchange.route is not None:  # here for the reason given in `_serve_file`
                self._observe(exchange, exchange.route.registry, "join")
        if outcome.error is not None:
            raise outcome.error

    def _observe(self, exchange: Exchange, registry: str, result: str) -> None:
        """The cache's part of the access log and metrics: hit, join (of a fill) or miss."""
        exchange.cache = result
        metrics = self.forwarder.metrics
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
        self.authorization.grant(exchange, route)
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
        with a ranged request of their own (`UpstreamFinisher.after_fill_spilled`).
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
