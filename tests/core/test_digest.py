"""Digests: parsing and streaming verification."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest

from vpsrelay import errors
from vpsrelay.core.digest import Digest, Verifier, held_back

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

BODY = b"hello, layer\n" * 1000
SHA256 = "sha256:" + hashlib.sha256(BODY).hexdigest()
SHA512 = "sha512:" + hashlib.sha512(BODY).hexdigest()


@pytest.mark.parametrize("text", [SHA256, SHA512])
def test_parse_and_str(text):
    digest = Digest.parse(text)
    assert str(digest) == text
    assert digest.algorithm == text.partition(":")[0]
    assert digest.hex == text.partition(":")[2]


@pytest.mark.parametrize(
    "text", ["", "sha256", "sha256:abc", "sha256:../x", "SHA256:" + "0" * 64, SHA256 + "/x"]
)
def test_parse_rejects_malformed(text):
    with pytest.raises(errors.DigestInvalid) as info:
        Digest.parse(text)
    assert info.value.status == 400
    assert info.value.code == "DIGEST_INVALID"


@pytest.mark.parametrize("text", ["md5:d41d8cd98f00b204e9800998ecf8427e", "blake3:" + "0" * 64])
def test_parse_rejects_unverifiable_algorithms(text):
    with pytest.raises(errors.DigestInvalid, match="unsupported digest algorithm"):
        Digest.parse(text)


@pytest.mark.parametrize("text", [SHA256, SHA512])
def test_verifier_matches_whole_body(text):
    verifier = Verifier(Digest.parse(text))
    verifier.update(BODY)
    verifier.finish()
    assert verifier.size == len(BODY)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, len(BODY)])
def test_verifier_matches_chunked_body(chunk_size):
    verifier = Verifier(Digest.parse(SHA256))
    for start in range(0, len(BODY), chunk_size):
        verifier.update(BODY[start : start + chunk_size])
    verifier.update(b"")
    verifier.finish()
    assert verifier.size == len(BODY)


def test_verifier_of_empty_body():
    verifier = Verifier(Digest.parse("sha256:" + hashlib.sha256(b"").hexdigest()))
    verifier.finish()
    assert verifier.size == 0


@pytest.mark.parametrize("body", [BODY[:-1], BODY + b"x", b"", BODY.replace(b"hello", b"HELLO", 1)])
def test_verifier_mismatch_raises(body):
    verifier = Verifier(Digest.parse(SHA256))
    verifier.update(body)
    with pytest.raises(errors.DigestMismatch) as info:
        verifier.finish()
    assert info.value.status == 502
    assert info.value.code == "DIGEST_INVALID"
    assert SHA256 in info.value.message
    assert f"{len(body)} bytes" in info.value.message


async def _source(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _drain(body: AsyncIterator[bytes], got: list[bytes]) -> list[bytes]:
    """Collect what `body` yields into `got`, one by one: kept when it raises half-way."""
    async for chunk in body:
        got.append(chunk)  # noqa: PERF401 (a comprehension would lose them on a raise)
    return got


def _verifier(body: bytes) -> Verifier:
    return Verifier(Digest.parse("sha256:" + hashlib.sha256(body).hexdigest()))


async def test_held_back_passes_a_matching_body_whole() -> None:
    pieces = [b"abc", b"def", b"ghi"]
    body = held_back(_source(pieces), _verifier(b"abcdefghi"))
    assert await _drain(body, []) == pieces


async def test_held_back_keeps_the_last_chunk_of_a_wrong_body() -> None:
    got: list[bytes] = []
    body = held_back(_source([b"abc", b"dXf", b"ghi"]), _verifier(b"abcdefghi"))
    with pytest.raises(errors.DigestMismatch):
        await _drain(body, got)
    assert got == [b"abc", b"dXf"]  # the end never went out


async def test_held_back_does_not_hash_the_pieces_given_as_hashed_again() -> None:
    verifier = _verifier(b"abcdefghi")
    verifier.update(b"abcdef")  # what the caller hashed already
    body = held_back(_source([b"ghi"]), verifier, hashed=[b"abc", b"def"])
    assert await _drain(body, []) == [b"abc", b"def", b"ghi"]
