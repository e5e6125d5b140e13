"""Parallel ranged fetch: a big blob from a CDN over several connections at once.

Where a CDN (or the path to it) limits each TCP stream, K ranged requests get K times
the speed. `ParallelStream` replaces a whole blob body: the first response delivers the
first piece and is closed once the second came as a range (else it delivers the whole
body, as one stream); up to K workers fetch the following pieces with
`Range: bytes=a-b` (each piece resumes itself, `ResumingStream`), at most K pieces ahead
of the reader, so memory is bounded by K pieces; the reader gets the bytes in order from
the first byte, and whoever reads it (the pass-through, a cache fill) verifies the digest
over the whole as before.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import httpx
import trio

from vpsrelay.core import resume
from vpsrelay.errors import RelayError, UpstreamError, UpstreamProtocolError
from vpsrelay.upstream.resume import Ask, Reopen, ResumingStream, headers_of

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from vpsrelay.core.resume import Attempts

log = logging.getLogger("vpsrelay.upstream")

# Bytes one ranged request asks for. A reader holds at most `connections` of them.
PIECE = 4 * 1024 * 1024
# The largest chunk handed to the reader, as a single stream's: an HTTP/2 stream buffer
# holds one (docs/security.md).
CHUNK = 1024 * 1024


def pieces(window: resume.Window, size: int) -> list[resume.Window]:
    """`window` cut into consecutive pieces of `size` bytes (the last one shorter)."""
    return [
        resume.Window(first, min(first + size, window.end), window.total, window.validator)
        for first in range(window.first, window.end, size)
    ]


async def fetch_piece(
    reopen: Reopen,
    piece: resume.Window,
    direct_url: str | None,
    attempts: Callable[[], Attempts],
    *,
    own_origin: Callable[[str], bool],
    what: str,
    resumed: Callable[[], None],
) -> bytearray:
    """One piece's bytes: asked at `direct_url` (the CDN), or at the registry when that
    answers anything but the exact range (an expired URL); resumed if it breaks off.

    Raises:
        UpstreamError: the piece could not be had.
    """
    answer = 0
    for direct in (direct_url, None) if direct_url is not None else (None,):
        ask = Ask(resume.ask_headers(piece, piece.first), direct, fresh_token=False)
        async with contextlib.AsyncExitStack() as stack:
            response = await stack.enter_async_context(reopen(ask))
            answer = response.status_code
            verdict = resume.judge(piece, piece.first, answer, headers_of(response))
            if verdict is not resume.Verdict.CONTINUE:
                continue
            body = ResumingStream(
                response, piece, reopen, attempts(), own_origin=own_origin, what=what,
                resumed=resumed,
            )  # fmt: skip
            stack.push_async_callback(body.aclose)
            data = bytearray()
            async for chunk in body:
                data += chunk
            return data  # not copied again: the reader hands out slices of it
    raise UpstreamProtocolError(f"{what}: upstream answered {answer} to a ranged request")


class ParallelStream(httpx.AsyncByteStream):
    """A whole blob body fetched as pieces over up to `connections` connections.

    The first response stays open until the second piece arrived as the exact range
    asked for: a CDN that ignores `Range` (or answers it wrongly) leaves the whole body
    to the first response, read as one stream. Pieces are handed out in chunks of at
    most `CHUNK` bytes, views of the piece (not copies). `release` runs once, when the
    stream closes (the process-wide count of parallel fetches)."""

    def __init__(
        self,
        first: httpx.AsyncByteStream,
        window: resume.Window,
        fetch: Callable[[resume.Window], Awaitable[bytes | bytearray]],
        nursery: trio.Nursery,
        *,
        connections: int,
        piece: int = PIECE,
        release: Callable[[], None] | None = None,
    ) -> None:
        self._first: httpx.AsyncByteStream | None = first
        self._pieces = pieces(window, piece)
        self._fetch = fetch
        self._nursery = nursery
        self._connections = connections
        self._release = release
        self._done: dict[int, bytes | bytearray] = {}
        self._changed = trio.Event()
        self._next_to_fetch = 1  # the first piece comes from `first`
        self._next_to_read = 0
        self._error: RelayError | None = None
        self._second_failed = False  # the ranged answer for piece 1 was not usable
        self._single = False  # fell back: the rest comes from `first`
        # Shielded: a cache fill reads on when its first client's task is cancelled (see
        # `finish_abandoned`); `aclose`, which always runs when the response closes, ends them.
        self._workers: list[trio.CancelScope] = []
        self._started = False
        self._chunks: AsyncIterator[bytes] | None = None
        self._left_in_first = self._pieces[0].end - self._pieces[0].first
        self._carry = b""  # what the first response sent past piece 0, for a fallback
        self._reading: memoryview | None = None  # the piece being handed out
        self._offset = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self._started:
            self._started = True
            log.info(
                "fetching %d bytes in %d ranges over %d connections",
                self._pieces[-1].end - self._pieces[0].first,
                len(self._pieces),
                self._connections,
            )
            for _ in range(max(1, self._connections - 1)):
                self._nursery.start_soon(self._worker)
        if self._single:
            return await self._rest_of_first()
        if self._next_to_read == 0:
            return await self._from_first()
        if self._reading is not None:
            return self._slice()
        index = self._next_to_read
        if index >= len(self._pieces):
            raise StopAsyncIteration
        if index == 1 and self._first is not None and not await self._second_or_fallback():
            return await self._rest_of_first()
        while index not in self._done:
            if self._error is not None:
                raise self._error
            await self._wait_changed()
        self._next_to_read += 1
        self._notify()  # a worker may fetch one more piece ahead
        self._reading, self._offset = memoryview(self._done.pop(index)), 0
        return self._slice()

    def _slice(self) -> bytes:
        assert self._reading is not None
        chunk = self._reading[self._offset : self._offset + CHUNK]
        self._offset += len(chunk)
        if self._offset >= len(self._reading):
            self._reading = None
        return chunk  # type: ignore[return-value]  # a view: bytes-like, not copied

    async def _from_first(self) -> bytes:
        """The first piece, from the response that was already open."""
        assert self._first is not None
        if self._chunks is None:
            self._chunks = aiter(self._first)
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            raise UpstreamProtocolError("upstream body ended early") from None
        chunk, self._carry = chunk[: self._left_in_first], chunk[self._left_in_first :]
        self._left_in_first -= len(chunk)
        if self._left_in_first == 0:
            self._next_to_read = 1
        return chunk

    async def _second_or_fallback(self) -> bool:
        """Wait for piece 1 (its worker is fetching it): as the exact range, the first
        response is closed and its connection fetches ranges too (True); else the
        workers stop and the rest is read from the first response (False)."""
        while 1 not in self._done and not self._second_failed:
            await self._wait_changed()
        if self._second_failed:
            log.info("the upstream did not answer a range: reading on over one connection")
            self._single = True
            for scope in self._workers:
                scope.cancel()
            self._done.clear()
            return False
        self._carry = b""
        await self._close_first()  # its connection is dropped: the rest is ranged
        if self._connections > 1:
            self._nursery.start_soon(self._worker)  # the first one's connection is free
        return True

    async def _rest_of_first(self) -> bytes:
        if self._carry:
            chunk, self._carry = self._carry, b""
            return chunk
        assert self._chunks is not None
        return await anext(self._chunks)  # StopAsyncIteration ends the body

    async def _worker(self) -> None:
        scope = trio.CancelScope(shield=True)
        self._workers.append(scope)
        with scope:
            while self._error is None and not self._single:
                index = self._next_to_fetch
                if index >= len(self._pieces):
                    return
                self._next_to_fetch += 1
                # Bounded memory: never more than `connections` pieces ahead of the reader.
                while index > self._next_to_read + self._connections:
                    await self._wait_changed()
                try:
                    self._done[index] = await self._fetch(self._pieces[index])
                except RelayError as exc:
                    if index == 1:
                        self._second_failed = True
                    else:
                        self._error = exc
                self._notify()
                if self._second_failed:
                    return

    async def _wait_changed(self) -> None:
        event = self._changed
        await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def aclose(self) -> None:
        for scope in self._workers:
            scope.cancel()
        self._done.clear()
        self._reading = None
        release, self._release = self._release, None
        if release is not None:
            release()
        await self._close_first()

    async def _close_first(self) -> None:
        first, self._first = self._first, None
        chunks, self._chunks = self._chunks, None
        close = getattr(chunks, "aclose", None)
        with contextlib.suppress(UpstreamError):
            if close is not None and id(chunks) != id(first):  # not the stream itself
                await close()
            if first is not None:
                await first.aclose()
