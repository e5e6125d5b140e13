"""Parallel ranged fetch: a big blob from a CDN over several connections at once.

Where a CDN (or the path to it) limits each TCP stream, K ranged requests get K times
the speed. `ParallelStream` replaces a whole blob body: the first response delivers the
first piece and is closed; up to K workers fetch the following pieces with
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
) -> bytes:
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
            return bytes(data)
    raise UpstreamProtocolError(f"{what}: upstream answered {answer} to a ranged request")


class ParallelStream(httpx.AsyncByteStream):
    """A whole blob body fetched as pieces over up to `connections` connections."""

    def __init__(
        self,
        first: httpx.AsyncByteStream,
        window: resume.Window,
        fetch: Callable[[resume.Window], Awaitable[bytes]],
        nursery: trio.Nursery,
        *,
        connections: int,
        piece: int = PIECE,
    ) -> None:
        self._first: httpx.AsyncByteStream | None = first
        self._pieces = pieces(window, piece)
        self._fetch = fetch
        self._nursery = nursery
        self._connections = connections
        self._done: dict[int, bytes] = {}
        self._changed = trio.Event()
        self._next_to_fetch = 1  # the first piece comes from `first`
        self._next_to_read = 0
        self._error: RelayError | None = None
        # Shielded: a cache fill reads on when its first client's task is cancelled (see
        # `finish_abandoned`); `aclose`, which always runs when the response closes, ends them.
        self._workers: list[trio.CancelScope] = []
        self._started = False
        self._chunks: AsyncIterator[bytes] | None = None
        self._left_in_first = self._pieces[0].end - self._pieces[0].first

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
        if self._next_to_read == 0:
            return await self._from_first()
        index = self._next_to_read
        if index >= len(self._pieces):
            raise StopAsyncIteration
        while index not in self._done:
            if self._error is not None:
                raise self._error
            await self._wait_changed()
        self._next_to_read += 1
        self._notify()  # a worker may fetch one more piece ahead
        return self._done.pop(index)

    async def _from_first(self) -> bytes:
        """The first piece, from the response that was already open."""
        assert self._first is not None
        if self._chunks is None:
            self._chunks = aiter(self._first)
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            raise UpstreamProtocolError("upstream body ended early") from None
        chunk = chunk[: self._left_in_first]
        self._left_in_first -= len(chunk)
        if self._left_in_first == 0:
            await self._close_first()  # its connection is dropped: the rest is ranged
            self._next_to_read = 1
            if self._connections > 1:
                self._nursery.start_soon(self._worker)  # the first one's connection is free
        return chunk

    async def _worker(self) -> None:
        scope = trio.CancelScope(shield=True)
        self._workers.append(scope)
        with scope:
            while self._error is None:
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
                    self._error = exc
                self._notify()

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
