"""Finishing a blob download from the upstream when the store fails under it.

A hit whose store read fails midway (a bucket that resets, a disk that errs), and a
client joined to a fill whose disk failed, both still get the whole blob: what the
store handed out, then the upstream's bytes from there (`Range: bytes=<at>-`, with the
client's credentials), the whole object hashed on and the last chunk held back until
the digest matched. `vpsrelay.cache.blobs` decides when; this module does it.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.authorization import FrontPart, upstream_url
from vpsrelay.cache.sending import READ_CHUNK, skipped, verified_window
from vpsrelay.cache.storage import StoreReadFailed
from vpsrelay.core.digest import Digest, Verifier, held_back
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import RelayError, UpstreamError
from vpsrelay.exchange import watch_disconnect

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from vpsrelay.cache.storage import BlobReader, Fill, Handover
    from vpsrelay.core import routing
    from vpsrelay.exchange import Exchange

log = logging.getLogger("vpsrelay.cache")

MAX_RANGE_OVERREAD = 6 * 1024 * 1024  # bytes past a range's end fetched upstream to check it


class UpstreamFinisher(FrontPart):
    """Finishes from the upstream the blob downloads that the store failed under."""

    async def after_store_failed(
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
        if size - max(end, handover.hashed) > MAX_RANGE_OVERREAD:
            # A small range of a big blob: checking it would fetch the rest of the object
            # upstream. Broken off instead: the client retries (through the upstream, with
            # just its range, while the bucket is marked failing), so a burst of tiny
            # ranges cannot multiply upstream bytes.
            return error
        self.store.index.count("bucket_failovers")
        self.forwarder.metrics.cache_store_failover(route.registry)
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

    async def after_fill_spilled(
        self, exchange: Exchange, route: routing.Route, reader: BlobReader, fill: Fill
    ) -> RelayError | None:
        """The disk failed under a fill this client joined: finish the client's response
        from the upstream (`_resume_from_upstream`). The error that ends it, if any."""
        return await self._finish_watched(
            exchange, partial(self._resume_from_upstream, exchange, route, reader, fill)
        )

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
        forwarder = self.forwarder
        registry = forwarder.registries[route.registry]
        headers = [
            (name, value)
            for name, value in await forwarder.upstream_headers(exchange, registry, route)
            if name.lower() not in ("range", "if-range")  # the client's: this one asks its own
        ]
        url = upstream_url(forwarder, route, route.upstream_path)
        request = UpstreamRequest("GET", url, (*headers, ("range", f"bytes={at}-")))
        async with forwarder.upstream.open(request, what=route.registry) as response:
            forwarder.observer.upstream_answered(exchange, response)
            ranged = response.status_code == 206 and response.headers.get(
                "content-range", ""
            ).startswith(f"bytes {at}-")
            if not ranged and response.status_code != 200:
                raise UpstreamError(f"the upstream answered {response.status_code} to a resume")
            upstream = forwarder.chunks(response, exchange)
            rest = upstream if ranged else skipped(upstream, at)
            async with contextlib.aclosing(upstream), contextlib.aclosing(rest):
                yield rest


async def _nothing() -> AsyncIterator[bytes]:
    """No bytes: the upstream is not asked when the store handed out the last one."""
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk
