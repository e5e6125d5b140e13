"""`BlobSender` on its own: a reader of a growing fill never gets the last byte before the
fill is verified, and a cached file that cannot be read ends the body with an error."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast

import pytest
import trio

from vpsrelay.cache.diskreader import DiskReader
from vpsrelay.cache.sending import BlobSender, Source
from vpsrelay.cache.storage import FillState
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from pathlib import Path

    from vpsrelay.exchange import Exchange

BODY = b"0123456789" * 100
DIGEST = "sha256:" + "0" * 64  # never verified here: the store's pump is not run


class Client:
    """The part of `Exchange` the sender uses: bodies are collected, the client stays."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.finished = False
        self.bytes_sent = 0
        self.disconnected = False

    async def receive(self) -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def body(self, chunk: bytes, *, more: bool) -> None:
        self.received += chunk
        self.bytes_sent += len(chunk)
        self.finished = not more

    def complete(self) -> bool:
        return self.finished and bytes(self.received) == BODY


async def test_the_last_byte_of_a_fill_waits_for_its_verification(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig(min_free=0))
    fill, _ = store.claim(DIGEST)
    assert await store.begin(fill, len(BODY), ())
    os.pwrite(fill.fd, BODY, 0)
    fill.written = len(BODY)  # every byte on disk, the digest not checked yet
    fill.changed()
    client = Client()
    sender = BlobSender(finish_abandoned=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            sender.send_watched,
            cast("Exchange", client),
            Source(store.open_fill(fill), 0, fill.size, fill),
        )
        with trio.fail_after(5):
            while len(client.received) < len(BODY) - 1:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.001)
        await trio.sleep(0.05)
        assert bytes(client.received) == BODY[:-1]  # held back
        assert not client.complete()
        fill.state = FillState.COMMITTED  # verified
        fill.changed()
    assert client.complete()
    store.drop(fill)
    os.close(fill.fd)
    await store.aclose()


async def test_an_unreadable_cached_file_is_an_upstream_error() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)  # a descriptor that no longer names a file: EBADF
    reader = DiskReader(read_end, trio.CapacityLimiter(1))
    with pytest.raises(UpstreamError, match="could not read its cache"):
        await reader.read(0, 10)
