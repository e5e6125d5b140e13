"""Reading an object back from the bucket, verified as it streams.

The bucket is another trust domain: anyone with its keys (or a fault in it) may change an
object behind the relays' back. `S3Reader` reads the object from its first byte with one
streamed GET, hashes every byte, and hands out the bytes that end the object only once the
whole object matched its digest: a tampered object ends short for the client (never
complete and valid) and is deleted from the bucket. Only evidence against the object
deletes it: a digest mismatch, a body longer than the object, a declared length that
differs; a body that merely stops early is the bucket failing.

A bucket that fails under the read (an error, a reset, a body that stops early, or one
slower than `MIN_RATE` over `RATE_WINDOW` seconds of waiting for it) raises
`StoreReadFailed`, with what the read hashed (`Handover`): the caller may finish the
client's download from the upstream, checked on from there. It is reported through
`on_failed` (the store then passes pulls by until its probe) unless the caller had left
the connection unread for over `CLIENT_GAP` seconds first: many stores close a connection
whose reader stalls, and a slow client must not switch the bucket off for everyone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

import httpx
import trio

from vpsrelay.cache.s3.client import MIN_RATE, S3Busy, S3Error
from vpsrelay.cache.storage import Handover, StoreReadFailed
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.core.transferfloor import TransferFloor
from vpsrelay.errors import DigestMismatch, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from vpsrelay.cache.s3.client import S3Client

log = logging.getLogger("vpsrelay.cache")


class Closable(Protocol):
    """A response, or a body's generator left mid-way: closed later, in Trio."""

    def aclose(self) -> Awaitable[None]: ...


RATE_WINDOW = 10.0  # seconds of waiting on the bucket over which MIN_RATE must hold
CLIENT_GAP = 5.0  # seconds between reads after which a mid-body failure may be our doing


class S3Reader:
    """Reads one committed object in order (a `BlobReader`); a read at an earlier
    offset starts the GET again."""

    def __init__(
        self,
        client: S3Client,
        key: str,
        digest: str,
        size: int,
        on_bad: Callable[[str, str], Awaitable[None]],
        on_close: Callable[[Closable], None],
        response: httpx.Response | None = None,
        on_failed: Callable[[S3Error], None] = lambda _: None,
    ) -> None:
        self._client = client
        self._key = key
        self._digest = digest
        self._size = size
        self._on_bad = on_bad  # (digest, why): the object is wrong or gone
        self._on_close = on_close  # closes a response later, in Trio (`close` is sync)
        self._on_failed = on_failed  # the bucket failed (not the object): leave it alone
        self._floor = TransferFloor(MIN_RATE, RATE_WINDOW)
        self._response = response  # opened already (by the store's `locate`), or None
        self._unchecked = response  # its declared length, checked at the first read
        self._chunks: AsyncIterator[bytes] | None = (
            None if response is None else response.aiter_raw()
        )
        self._verifier = Verifier(Digest.parse(digest))
        self._received = 0  # bytes read from the bucket (and hashed)
        self._buffer = bytearray()  # received, not handed out; it starts at `_position`
        # (past a `Range`'s end it holds the caller's last bytes only, until the whole matched)
        self._position = 0
        self._ended = False
        self._end = size  # the caller reads no further (`set_end`)
        self._last_read: float | None = None  # when `read` last returned
        self._left_unread = False  # this GET sat unread over CLIENT_GAP (a slow caller)

    def set_end(self, end: int) -> None:
        """The caller reads no further than `end` (a `Range`): the bytes that reach it
        are handed out only once the rest of the object was read and the whole matched."""
        self._end = min(end, self._size)

    async def read(self, offset: int, count: int, verifier: Verifier | None = None) -> bytes:
        """Up to `count` bytes at `offset`.

        Raises:
            StoreReadFailed: the bucket failed, was too slow, or its body stopped early.
            UpstreamError: the object is longer than its size, or declared so (it is then
                deleted), or `offset` is past the end.
            DigestMismatch: the object is not what its digest says (it is then deleted).
        """
        try:
            if self._unchecked is not None:
                response, self._unchecked = self._unchecked, None
                await self._check_length(response)
            if self._chunks is None or offset < self._position:
                await self._open()
            elif self._last_read is not None:
                self._left_unread |= trio.current_time() - self._last_read > CLIENT_GAP
            while self._position + len(self._buffer) < offset:  # skip to `offset`, hashing
                self._position += len(self._buffer)
                self._buffer.clear()
                if not await self._pull():
                    break
            if offset > self._position:
                del self._buffer[: offset - self._position]
                self._position = offset
            want = min(count, self._end - offset)
            while len(self._buffer) < want and await self._pull():
                pass
            if want <= 0:
                self.close()
                raise UpstreamError(f"a read past the end of {self._digest}")
            if len(self._buffer) < want:
                raise self._short()
            data = bytes(self._buffer[:want])
            if offset + want >= self._end:  # the caller's last bytes: the whole must match
                del self._buffer[want:]  # past `end`: hashed, never handed out
                while await self._pull():
                    del self._buffer[want:]
                if self._received != self._size:
                    raise self._short()
                try:
                    self._verifier.finish()
                except DigestMismatch:
                    await self._bad("does not match its digest")
                    raise
            del self._buffer[:want]
        except httpx.HTTPError as exc:
            raise self._failure(S3Error(f"GET {self._key}: {type(exc).__name__}")) from None
        except S3Error as exc:
            raise self._failure(exc) from None
        except S3Busy as exc:  # this process's stream connections: not the bucket failing
            raise self._failure(S3Error(str(exc)), busy=True) from None
        self._position += want
        self._last_read = trio.current_time()
        if verifier is not None:
            verifier.update(data)
        return data

    def _short(self) -> S3Error:
        """The body stopped before the object's end: the bucket failed, not the object."""
        return S3Error(f"GET {self._key}: ended at byte {self._received}", reason="short")

    def _failure(self, exc: S3Error, *, busy: bool = False) -> StoreReadFailed:
        self.close()
        if self._left_unread:
            # Perhaps the store closed a connection we left unread: fail this one over.
            log.info("cache: %s after a slow client: the bucket stays in use", exc)
        elif exc.status != 404 and not busy:  # 404: the object gone; busy: this process
            self._on_failed(exc)
        # What was read and hashed, for the caller to check the upstream's bytes on from.
        handover = Handover(self._verifier, self._received, bytes(self._buffer), self._position)
        return StoreReadFailed(f"the relay's bucket failed: {exc}", handover)

    async def _open(self) -> None:
        self.close()
        self._unchecked = None
        self._response = None
        self._response = await self._client.open_get(self._key, blob=True)
        self._chunks = self._response.aiter_raw()
        self._left_unread = False
        self._last_read = None
        await self._check_length(self._response)
        self._verifier = Verifier(Digest.parse(self._digest))
        self._floor = TransferFloor(MIN_RATE, RATE_WINDOW)
        self._received = self._position = 0
        self._buffer.clear()
        self._ended = False

    async def _pull(self) -> bool:
        """One more chunk into the buffer (hashed); False at the end of the body."""
        assert self._chunks is not None
        if self._ended:
            return False
        started = trio.current_time()
        chunk = None
        with trio.move_on_after(RATE_WINDOW):
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
                return False
        # Only the time spent waiting here counts: not the time a slow client takes. A
        # cancelled wait closed the body's iterator for good: the stream is dead either way.
        waited = trio.current_time() - started
        if self._floor.feed(len(chunk or b""), waited) or chunk is None:
            raise S3Error(f"GET {self._key}: slower than {MIN_RATE // 1024} KiB/s", reason="slow")
        self._received += len(chunk)
        if self._received > self._size:
            raise await self._bad(f"longer than {self._size} bytes")
        self._verifier.update(chunk)
        self._buffer += chunk
        return True

    async def _check_length(self, response: httpx.Response) -> None:
        """A declared length other than the object's is evidence against the object."""
        declared = response.headers.get("content-length")
        if declared is not None and declared != str(self._size):
            raise await self._bad(f"is {declared[:20]!r} bytes long, not {self._size}")

    async def _bad(self, why: str) -> UpstreamError:
        chunks = self._chunks
        self.close()
        aclose = getattr(chunks, "aclose", None)  # the body's iterator, stopped mid-body
        if aclose is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await aclose()
        await self._on_bad(self._digest, why)
        return UpstreamError(f"the cached object {self._digest} {why}")

    def close(self) -> None:
        response, chunks = self._response, self._chunks
        self._response, self._chunks = None, None
        if isinstance(chunks, AsyncGenerator):  # left mid-body: its generator first
            self._on_close(chunks)
        if response is not None:
            self._on_close(response)
