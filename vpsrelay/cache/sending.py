"""Sending a blob to a client: a committed file, or a fill as it grows.

`BlobSender` reads the bytes through the store's `BlobReader`, one chunk ahead of the
client, and stops an abandoned fill unless `finish_abandoned`; after
a disk failure it hands the first client the rest of the body through `pass_rest`.
Which client gets what, and from where, is decided in `vpsrelay.cache.blobs`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.storage import FillState
from vpsrelay.core.digest import held_back
from vpsrelay.errors import RelayError, UpstreamError
from vpsrelay.exchange import watch_disconnect

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from vpsrelay.cache.storage import BlobReader, Fill, Handover, StoreSpill
    from vpsrelay.exchange import Exchange

log = logging.getLogger("vpsrelay.cache")

READ_CHUNK = 1024 * 1024


@dataclass(slots=True)
class Outcome:
    """How a send ended: the error to raise once the caller's bookkeeping is done."""

    error: RelayError | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """Where a client's bytes come from: `first..end` of `reader`, a committed object or
    the growing `fill`; after a store failure the first client gets the rest through `rest`."""

    reader: BlobReader
    first: int
    end: int
    fill: Fill | None = None
    rest: trio.MemoryReceiveChannel[bytes] | None = None


class BlobSender:
    """Sends byte ranges of a cached file or of a growing fill to clients."""

    def __init__(self, finish_abandoned: bool) -> None:
        self._finish_abandoned = finish_abandoned

    async def send_watched(self, exchange: Exchange, source: Source) -> Outcome:
        """Send `source` to the client until done or it leaves."""
        outcome = Outcome()
        fill = source.fill
        if fill is not None:
            fill.readers += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_disconnect, exchange, nursery.cancel_scope)
                try:
                    await self._send_range(exchange, source)
                except RelayError as exc:
                    outcome.error = exc
                nursery.cancel_scope.cancel()
        finally:
            if fill is not None:
                fill.readers -= 1
                if (
                    fill.readers == 0
                    and fill.state is FillState.STREAMING
                    and not self._finish_abandoned
                ):
                    log.info("cache: last reader of %s left, stopping its fill", fill.digest)
                    fill.pump_scope.cancel()
        return outcome

    async def _send_range(self, exchange: Exchange, source: Source) -> None:
        """Send `source`, reading the next chunk while one is sent.

        The reader runs one chunk ahead (a zero-size channel: at most one chunk read and
        one being sent), so the worker-thread read overlaps the client write.
        """
        failure: list[RelayError] = []
        send, receive = trio.open_memory_channel[bytes](0)
        error: Exception | None = None
        first, end = source.first, source.end
        position = first
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_range, send, source, failure)
            try:
                async with receive:
                    async for data in receive:
                        position += len(data)
                        await exchange.body(data, more=position < end)
            except Exception as exc:  # re-raised outside, so it is not wrapped in a group
                error = exc
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if failure:
            raise failure[0]
        if position == first == end:
            await exchange.body(b"", more=False)

    async def _read_range(
        self, send: trio.MemorySendChannel[bytes], source: Source, failure: list[RelayError]
    ) -> None:
        async with send:
            try:
                await self._read_chunks(send, source)
            except RelayError as exc:
                failure.append(exc)

    async def _read_chunks(self, send: trio.MemorySendChannel[bytes], source: Source) -> None:
        reader, position, end, fill = source.reader, source.first, source.end, source.fill
        size = fill.size if fill is not None else end
        while position < end:
            limit = end
            if fill is not None and fill.state is not FillState.COMMITTED:
                if fill.state is FillState.FAILED:
                    if fill.spilled and source.rest is not None:
                        await self._read_spilled(send, reader, position, end, fill, source.rest)
                        return
                    raise fill.error or UpstreamError("the fill failed")
                # The last byte waits for the digest check: a bad body ends short.
                limit = min(end, fill.written, size - 1)
                if position >= limit:
                    await fill.wait_changed()
                    continue
            data = await reader.read(position, min(limit - position, READ_CHUNK))
            position += len(data)
            await send.send(data)

    async def _read_spilled(
        self,
        send: trio.MemorySendChannel[bytes],
        reader: BlobReader,
        position: int,
        end: int,
        fill: Fill,
        rest: trio.MemoryReceiveChannel[bytes],
    ) -> None:
        """The first client's read after the disk failed: what the disk holds (every
        byte before `fill.written` was written whole), then the rest from the upstream."""
        while position < min(end, fill.written):
            data = await reader.read(position, min(fill.written - position, READ_CHUNK))
            position += len(data)
            await send.send(data)
        async for data in rest:
            position += len(data)
            await send.send(data)
        if position < end:
            raise fill.error or UpstreamError("the upstream body ended early")


async def skipped(chunks: AsyncIterator[bytes], count: int) -> AsyncGenerator[bytes]:
    """`chunks` without their first `count` bytes."""
    async for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


async def verified_window(
    handover: Handover, chunks: AsyncIterator[bytes], first: int, end: int, size: int
) -> AsyncGenerator[bytes]:
    """Bytes `first..end` of a `size`-byte object whose verified read stopped at
    `handover`: what the read held, then `chunks` (the object from `handover.hashed` on),
    every byte to the object's end hashed on, the last piece only once the whole matched
    (a range's bytes are served only from an object that matched).

    The read held every byte of `first..min(end, handover.hashed)` (the caller checks).

    Raises:
        DigestMismatch: the object's bytes did not match, with the last piece kept back.
        UpstreamError: the body was longer or shorter than the object.
    """
    verifier, position = handover.verifier, handover.hashed
    pending = handover.held[first - handover.held_at : end - handover.held_at]
    async for chunk in chunks:
        verifier.update(chunk)
        low, high = max(first, position), min(end, position + len(chunk))
        if low < high:
            if pending:
                yield pending
            pending = chunk[low - position : high - position]
        position += len(chunk)
        if position > size:
            raise UpstreamError(f"the upstream sent more than {size} bytes")
    if position != size:
        raise UpstreamError(f"the upstream sent {position} of {size} bytes")
    verifier.finish()
    if pending:
        yield pending


async def pass_rest(
    spill: StoreSpill,
    chunks: AsyncIterator[bytes],
    send: trio.MemorySendChannel[bytes],
    fill: Fill,
) -> None:
    """After a disk failure: the unwritten pieces and the rest of the upstream body to the
    first client, hashed on the way; the last chunk only once the digest matched."""
    try:
        async with contextlib.aclosing(
            held_back(chunks, spill.verifier, hashed=spill.pieces)
        ) as body:
            async for chunk in body:
                await send.send(chunk)
    except trio.BrokenResourceError:
        return  # the client left: stop reading the upstream
    except RelayError as exc:  # a digest mismatch, the upstream broke off
        fill.error = exc
        log.warning("cache: pass-through after a disk error failed: %s", exc.message)
