"""`verified_window`: finishing a client's range of an object from the upstream after the
store's verified read stopped; every byte of the object is checked before the last one
the client gets."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest

from vpsrelay.cache.sending import skipped, verified_window
from vpsrelay.cache.storage import Handover
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.errors import DigestMismatch, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

OBJECT = bytes(range(256)) * 40  # 10240 bytes
DIGEST = "sha256:" + hashlib.sha256(OBJECT).hexdigest()


async def _chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _handover(read: bytes, held_at: int) -> Handover:
    """A store read that hashed `read` (from byte 0) and handed out `held_at` bytes."""
    verifier = Verifier(Digest.parse(DIGEST))
    verifier.update(read)
    return Handover(verifier, len(read), read[held_at:], held_at)


async def _window(
    handover: Handover, upstream: bytes, first: int, end: int
) -> tuple[bytes, BaseException | None]:
    got, error = bytearray(), None
    try:
        async for piece in verified_window(
            handover, _chunks(upstream[handover.hashed :]), first, end, len(OBJECT)
        ):
            got += piece
    except (DigestMismatch, UpstreamError) as exc:
        error = exc
    return bytes(got), error


@pytest.mark.parametrize(
    ("hashed", "held_at", "first", "end"),
    [
        (4000, 4000, 0, len(OBJECT)),  # a whole object, nothing held
        (4500, 4000, 0, len(OBJECT)),  # a whole object, 500 bytes read but not sent
        (6000, 3000, 3000, 5000),  # a range whose last bytes were held (read past its end)
        (2000, 2000, 5000, 9000),  # a range the read had not reached
        (0, 0, 100, 200),  # the read failed before any byte
        (10240, 9000, 9000, 10240),  # all of it read: only the check and the send were left
    ],
)
async def test_the_client_gets_exactly_its_bytes(
    hashed: int, held_at: int, first: int, end: int
) -> None:
    handover = _handover(OBJECT[:hashed], held_at)
    if end < hashed:  # past a range's end the read keeps the caller's last bytes only
        handover = Handover(handover.verifier, hashed, OBJECT[held_at:end], held_at)
    got, error = await _window(handover, OBJECT, max(first, held_at), end)
    assert error is None
    assert got == OBJECT[max(first, held_at) : end]


@pytest.mark.parametrize(("first", "end"), [(4000, len(OBJECT)), (4000, 4500)])
async def test_a_tampered_part_read_from_the_store_is_never_completed(first: int, end: int) -> None:
    """The store's bytes were altered before it failed: the upstream's good rest does
    not make them whole. The client's last bytes never come."""
    forged = bytearray(OBJECT)
    forged[100] ^= 0xFF
    got, error = await _window(_handover(bytes(forged[:4200]), 4000), OBJECT, first, end)
    assert isinstance(error, DigestMismatch)
    assert len(got) < end - first


async def test_an_upstream_body_of_the_wrong_length_is_an_error() -> None:
    handover = _handover(OBJECT[:4000], 4000)
    got, error = await _window(handover, OBJECT[:-10], 4000, len(OBJECT))
    assert isinstance(error, UpstreamError)
    assert len(got) < len(OBJECT) - 4000
    _, error = await _window(_handover(OBJECT[:4000], 4000), OBJECT + b"x", 4000, len(OBJECT))
    assert isinstance(error, UpstreamError)


async def test_skipped_drops_exactly_the_first_bytes() -> None:
    for count in (0, 1, 999, 1000, 1001, 10239, 10240, 20000):
        got = b"".join([piece async for piece in skipped(_chunks(OBJECT), count)])
        assert got == OBJECT[count:]
