"""`S3Reader` against bodies timed by Trio's mock clock (review 15b, findings 1 and 2).

Only evidence against an object deletes it (a digest mismatch, a longer body, a declared
length that differs); a body that stalls or stops early is the bucket failing: the read
fails over (`StoreReadFailed`), the object stays. A failure after the caller left the
stream unread for a while fails that one read over and leaves the bucket in use.
The real-bucket versions are in tests/security/test_s3_failover.py.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
import trio.testing

from vpsrelay.cache.s3.reader import CLIENT_GAP, S3Reader
from vpsrelay.cache.storage import StoreReadFailed
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator

    from vpsrelay.cache.s3.client import S3Error

MiB = 1024 * 1024
CHUNK = 64 * 1024
OBJECT = bytes(range(256)) * (16 * 1024)  # 4 MiB
DIGEST = "sha256:" + hashlib.sha256(OBJECT).hexdigest()


class _Body(httpx.AsyncByteStream):
    """`data` in 64 KiB chunks; at byte `at`: a pause of `pause` seconds, then `then`
    ("go on", "stop": the body ends there, "reset": a network error)."""

    def __init__(self, data: bytes, at: int = -1, pause: float = 0.0, then: str = "go on"):
        self.data, self.at, self.pause, self.then = data, at, pause, then
        self._chunks: AsyncGenerator[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = self._generate()
        return self._chunks

    async def aclose(self) -> None:  # as a connection's stream: the response closes it
        if self._chunks is not None:
            await self._chunks.aclose()

    async def _generate(self) -> AsyncGenerator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            if start == self.at:
                await trio.sleep(self.pause)
                if self.then == "stop":
                    return
                if self.then == "reset":
                    raise httpx.ReadError("connection reset by peer")
            yield self.data[start : start + CHUNK]


class _Bucket:
    """Answers each GET with a fresh `_Body`, as the store's client would."""

    def __init__(self, body: _Body, headers: dict[str, str] | None = None) -> None:
        self.body, self.headers, self.gets = body, headers or {}, 0

    async def open_get(self, key: str, *, blob: bool = False) -> httpx.Response:
        self.gets += 1
        return httpx.Response(200, headers=self.headers, stream=self.body)


class _Seen:
    def __init__(self) -> None:
        self.bad: list[str] = []
        self.failed: list[S3Error] = []

    async def on_bad(self, digest: str, why: str) -> None:
        self.bad.append(why)


def _reader(bucket: _Bucket, seen: _Seen, data: bytes = OBJECT) -> S3Reader:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    reader = S3Reader(
        bucket,  # type: ignore[arg-type]  # the one method the reader calls
        "relay/blobs/x",
        digest,
        len(data),
        seen.on_bad,
        lambda _: None,
        on_failed=seen.failed.append,
    )
    reader.set_end(len(data))
    return reader


async def _read_all(reader: S3Reader, size: int = len(OBJECT), pause: float = 0.0) -> bytes:
    """The whole object in 1 MiB reads, sleeping `pause` seconds between them (a slow client)."""
    got = bytearray()
    while len(got) < size:
        got += await reader.read(len(got), min(MiB, size - len(got)))
        await trio.sleep(pause)
    return bytes(got)


async def test_a_healthy_body_reads_whole(autojump_clock: trio.testing.MockClock) -> None:
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT), {"content-length": str(len(OBJECT))}), seen)
    assert await _read_all(reader, pause=CLIENT_GAP + 1) == OBJECT  # a slow client is fine
    assert (seen.bad, seen.failed) == ([], [])


async def test_a_stall_after_a_fast_burst_fails_over_and_keeps_the_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """3 MiB fast, then 12 s of silence (under httpx's 30 s read timeout): the stall is the
    bucket being slow, not the object's end."""
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT, at=3 * MiB, pause=12.0)), seen)
    started = trio.current_time()
    with pytest.raises(StoreReadFailed, match="slower than 256 KiB/s") as raised:
        await _read_all(reader)
    assert trio.current_time() - started <= 10.5  # the rate window, not the stall
    assert seen.bad == []  # never deleted
    assert [error.reason for error in seen.failed] == ["slow"]
    assert raised.value.handover.hashed == 3 * MiB


async def test_a_body_that_stops_early_fails_over_and_keeps_the_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT, at=2 * MiB, then="stop")), seen)
    with pytest.raises(StoreReadFailed, match="ended at byte 2097152"):
        await _read_all(reader)
    assert seen.bad == []
    assert [error.reason for error in seen.failed] == ["short"]


async def test_a_declared_length_that_differs_is_evidence_against_the_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = _Seen()
    bucket = _Bucket(_Body(OBJECT), {"content-length": str(len(OBJECT) + 1)})
    with pytest.raises(UpstreamError, match="bytes long, not 4194304") as raised:
        await _read_all(_reader(bucket, seen))
    assert not isinstance(raised.value, StoreReadFailed)
    assert len(seen.bad) == 1
    assert seen.failed == []


async def test_a_longer_body_is_evidence_against_the_object(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = _Seen()
    bucket = _Bucket(_Body(OBJECT + b"x" * CHUNK))
    with pytest.raises(UpstreamError, match="longer than") as raised:
        await _read_all(_reader(bucket, seen))
    assert not isinstance(raised.value, StoreReadFailed)
    assert seen.bad == ["longer than 4194304 bytes"]


async def test_a_reset_marks_the_bucket_failing(autojump_clock: trio.testing.MockClock) -> None:
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT, at=2 * MiB, then="reset")), seen)
    with pytest.raises(StoreReadFailed, match="ReadError"):
        await _read_all(reader)
    assert len(seen.failed) == 1
    assert seen.bad == []


async def test_a_reset_after_a_slow_client_fails_over_without_marking_the_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The store may have closed a connection the relay left unread while its client was
    slow: this download fails over, the bucket stays in use for the others."""
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT, at=3 * MiB, then="reset")), seen)
    got = await reader.read(0, MiB)
    await trio.sleep(CLIENT_GAP + 1)  # the client takes its time
    got += await reader.read(MiB, MiB)  # still buffered: the error comes later
    with pytest.raises(StoreReadFailed, match="ReadError"):
        await _read_all_from(reader, got)
    assert seen.failed == []
    assert seen.bad == []


async def test_a_short_pause_by_the_client_still_marks_a_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = _Seen()
    reader = _reader(_Bucket(_Body(OBJECT, at=3 * MiB, then="reset")), seen)
    with pytest.raises(StoreReadFailed, match="ReadError"):
        await _read_all(reader, pause=CLIENT_GAP - 1)
    assert len(seen.failed) == 1


async def _read_all_from(reader: S3Reader, got: bytes) -> bytes:
    data = bytearray(got)
    while len(data) < len(OBJECT):
        data += await reader.read(len(data), min(MiB, len(OBJECT) - len(data)))
    return bytes(data)
