"""Digests: parsing and streaming verification."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TYPE_CHECKING

import pytest

from vpsrelay import errors
from vpsrelay.core.digest import (
    MAX_SCHEMA1_BYTES,
    SCHEMA1_SIGNED,
    Digest,
    ManifestVerifier,
    Verifier,
    held_back,
    manifest_verifier,
    schema1_payload,
)

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


# --- manifests: signed schema 1 (its digest is of the body without the signatures)

PAYLOAD = b'{\n   "schemaVersion": 1,\n   "name": "library/x",\n   "tag": "v"\n}'
PAYLOAD_DIGEST = Digest.parse("sha256:" + hashlib.sha256(PAYLOAD).hexdigest())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed(payload: bytes, *, tails: tuple[bytes, ...] = (b"\n}",)) -> bytes:
    """A schema 1 manifest signed as libtrust does: the signatures go before the last
    `\n}`, and each protected header says how to cut them out again."""
    length = len(payload) - 2
    signatures = [
        {
            "header": {"alg": "ES256"},
            "signature": "c2ln",
            "protected": _b64url(
                json.dumps({"formatLength": length, "formatTail": _b64url(tail)}).encode()
            ),
        }
        for tail in tails
    ]
    return payload[:length] + b',\n   "signatures": ' + json.dumps(signatures).encode() + b"\n}"


def test_schema1_payload() -> None:
    assert schema1_payload(_signed(PAYLOAD)) == PAYLOAD
    assert schema1_payload(_signed(PAYLOAD, tails=(b"\n}", b"\n}"))) == PAYLOAD


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"signatures": 1}',
        b'{"signatures": [{"protected": "!!"}]}',
        b'{"signatures": [{"protected": 5}]}',
        b'{"signatures": []}',
        _signed(PAYLOAD, tails=(b"\n}", b"}")),  # signatures that disagree
        BODY,
    ],
)
def test_schema1_payload_of_anything_else_is_none(body: bytes) -> None:
    assert schema1_payload(body) is None


def test_a_signed_schema1_manifest_matches_the_digest_of_its_payload() -> None:
    body = _signed(PAYLOAD)
    verifier = manifest_verifier(PAYLOAD_DIGEST, f"{SCHEMA1_SIGNED}; charset=utf-8")
    assert isinstance(verifier, ManifestVerifier)
    for start in range(0, len(body), 7):
        verifier.update(body[start : start + 7])
    verifier.finish()


def test_a_manifest_of_another_type_must_match_by_its_bytes() -> None:
    verifier = manifest_verifier(PAYLOAD_DIGEST, "application/vnd.oci.image.manifest.v1+json")
    verifier.update(_signed(PAYLOAD))
    with pytest.raises(errors.DigestMismatch):
        verifier.finish()


def test_a_signed_schema1_manifest_with_other_bytes_does_not_match() -> None:
    verifier = ManifestVerifier(PAYLOAD_DIGEST)
    verifier.update(_signed(PAYLOAD.replace(b'"v"', b'"w"')))
    with pytest.raises(errors.DigestMismatch):
        verifier.finish()


def test_a_schema1_verifier_keeps_no_more_than_a_manifest() -> None:
    for padding, kept in ((MAX_SCHEMA1_BYTES // 2, True), (MAX_SCHEMA1_BYTES, False)):
        payload = b" " * padding + PAYLOAD
        verifier = ManifestVerifier(Digest.parse("sha256:" + hashlib.sha256(payload).hexdigest()))
        verifier.update(_signed(payload))
        if kept:
            verifier.finish()
        else:
            with pytest.raises(errors.DigestMismatch):
                verifier.finish()
