"""Parallel ranged fetch without sockets: pieces, order, and the bound on pieces held."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from vpsrelay.core import resume
from vpsrelay.errors import UpstreamProtocolError, UpstreamTimeout
from vpsrelay.upstream.parallel import ParallelStream, pieces

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

DATA = bytes(range(256)) * 40  # 10240 bytes
PIECE = 1000
MiB = 1024 * 1024


class Chunks(httpx.AsyncByteStream):
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


def test_pieces_cover_the_window_in_order() -> None:
    window = resume.Window(0, 2500, 2500, None)
    assert [(p.first, p.end) for p in pieces(window, 1000)] == [
        (0, 1000),
        (1000, 2000),
        (2000, 2500),
    ]


async def read_all(connections: int, *, fail_at: int | None = None) -> tuple[bytes, int, Chunks]:
    window = resume.Window(0, len(DATA), len(DATA), '"x"')
    held = {"now": 0, "most": 0}
    fetched: list[int] = []

    async def fetch(piece: resume.Window) -> bytes:
        if piece.first == fail_at:
            raise UpstreamTimeout("stalled")
        held["now"] += 1
        held["most"] = max(held["most"], held["now"])
        await trio.sleep(0.001 * (piece.first % 3000) / 1000)  # finish out of order
        fetched.append(piece.first)
        return DATA[piece.first : piece.end]

    first = Chunks(DATA[:600], DATA[600:1200])  # sends past its piece: cut at 1000
    body = b""
    failure: UpstreamTimeout | None = None
    async with trio.open_nursery() as nursery:
        stream = ParallelStream(first, window, fetch, nursery, connections=connections, piece=PIECE)
        try:
            async for chunk in stream:
                body += chunk
                held["now"] = max(0, held["now"] - 1)
                await trio.sleep(0.002)  # a slow reader
        except UpstreamTimeout as exc:  # raised outside the nursery, as the forwarder does
            failure = exc
        finally:
            await stream.aclose()
    if failure is not None:
        raise failure
    return body, held["most"], first


@pytest.mark.trio
@pytest.mark.parametrize("connections", [2, 4])
async def test_the_reader_gets_every_byte_in_order_and_the_first_answer_is_closed(
    connections: int,
) -> None:
    body, most, first = await read_all(connections)
    assert body == DATA
    assert first.closed
    assert most <= connections + 1  # never more pieces held than the bound


@pytest.mark.trio
async def test_a_piece_that_cannot_be_had_ends_the_body_with_its_error() -> None:
    with pytest.raises(UpstreamTimeout):
        await read_all(4, fail_at=5000)


async def read_with(
    fetch: Callable[[resume.Window], Awaitable[bytes | bytearray]],
    first: Chunks,
    data: bytes,
    piece: int,
) -> tuple[list[bytes], int]:
    window = resume.Window(0, len(data), len(data), '"x"')
    released: list[int] = []
    chunks: list[bytes] = []
    async with trio.open_nursery() as nursery:
        stream = ParallelStream(
            first, window, fetch, nursery, connections=4, piece=piece,
            release=lambda: released.append(1),
        )  # fmt: skip
        try:
            chunks.extend([chunk async for chunk in stream])
        finally:
            await stream.aclose()
            await stream.aclose()  # released once all the same
    return chunks, len(released)


@pytest.mark.trio
async def test_a_cdn_that_ignores_ranges_leaves_the_whole_body_to_the_first_answer() -> None:
    async def no_ranges(piece: resume.Window) -> bytes:
        await trio.sleep(0.01)
        raise UpstreamProtocolError("upstream answered 200 to a ranged request")

    first = Chunks(DATA[:600], DATA[600:1500], DATA[1500:])  # the whole body, as a 200 sends it
    chunks, released = await read_with(no_ranges, first, DATA, PIECE)
    assert b"".join(chunks) == DATA
    assert released == 1


@pytest.mark.trio
async def test_pieces_go_out_as_views_of_at_most_one_mib() -> None:
    data = bytes(range(256)) * (9 * 4096)  # 9 MiB: two 4 MiB pieces and a short one
    fetched: list[bytearray] = []

    async def fetch(piece: resume.Window) -> bytearray:
        fetched.append(bytearray(data[piece.first : piece.end]))
        return fetched[-1]

    first = Chunks(*(data[at : at + MiB] for at in range(0, 5 * MiB, MiB)))  # as a 200 sends
    chunks, released = await read_with(fetch, first, data, 4 * MiB)
    assert b"".join(chunks) == data
    assert max(map(len, chunks)) <= MiB
    handed: list[object] = list(chunks)  # typed bytes; views in fact
    ranged = [c for c in handed if isinstance(c, memoryview)]
    assert sum(map(len, ranged)) == len(data) - 4 * MiB  # every ranged byte, uncopied
    assert {id(c.obj) for c in ranged} == {id(p) for p in fetched}
    assert released == 1
