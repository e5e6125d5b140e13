"""Content digests: parse them and check bytes against them as they stream.

Only `hashlib`; the verifier is fed chunk by chunk, so no blob is ever held whole.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.core import grammar
from vpsrelay.errors import DigestInvalid, DigestMismatch

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, Iterable

HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MAX_SCHEMA1_BYTES = 4 * 1024 * 1024  # Distribution's limit on any manifest


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse `algorithm:hex`.

        Raises:
            DigestInvalid: malformed, or an algorithm the relay cannot verify.
        """
        if not grammar.is_valid_digest(text):
            raise DigestInvalid(f"invalid digest: {text!r}")
        algorithm, _, encoded = text.partition(":")
        if algorithm not in HASHES:
            raise DigestInvalid(f"unsupported digest algorithm: {algorithm!r}")
        return cls(algorithm, encoded)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Verifier:
    """Hashes a body as it passes and says at the end whether it matched."""

    def __init__(self, expected: Digest) -> None:
        self.expected = expected
        self._hash = HASHES[expected.algorithm]()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        """Check the bytes seen so far.

        Raises:
            DigestMismatch: they do not hash to the expected digest.
        """
        actual = self._hash.hexdigest()
        if actual != self.expected.hex:
            raise DigestMismatch(
                f"upstream sent {self.size} bytes that hash to {self.expected.algorithm}:{actual},"
                f" not {self.expected}"
            )


class ManifestVerifier(Verifier):
    """A manifest's verifier: its bytes must hash to the digest, or, for a signed schema 1
    manifest, its bytes without the signatures (what Distribution's digest is of). Keeps
    up to `MAX_SCHEMA1_BYTES` of the body for that."""

    def __init__(self, expected: Digest) -> None:
        super().__init__(expected)
        self._body: bytearray | None = bytearray()

    def update(self, chunk: bytes) -> None:
        super().update(chunk)
        if self._body is not None and len(self._body) + len(chunk) <= MAX_SCHEMA1_BYTES:
            self._body += chunk
        else:
            self._body = None  # larger than any schema 1 manifest: the bytes must match

    def finish(self) -> None:
        try:
            super().finish()
        except DigestMismatch:
            payload = schema1_payload(bytes(self._body)) if self._body is not None else None
            if payload is None or HASHES[self.expected.algorithm](payload).hexdigest() != (
                self.expected.hex
            ):
                raise


def manifest_verifier(expected: Digest, content_type: str | None) -> Verifier:
    """The verifier for a manifest's body of `content_type` (a signed schema 1 manifest's
    digest is not of its bytes)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    return ManifestVerifier(expected) if media_type == SCHEMA1_SIGNED else Verifier(expected)


def schema1_payload(body: bytes) -> bytes | None:
    """The bytes a signed schema 1 manifest's digest is of (libtrust's JWS: the body up to
    `formatLength`, then `formatTail`, as every signature's protected header says), or None
    if `body` is not one."""
    try:
        signatures = json.loads(body)["signatures"]
        formats = {
            (protected["formatLength"], protected["formatTail"])
            for protected in (json.loads(_unbase64url(s["protected"])) for s in signatures)
        }
    except (ValueError, KeyError, TypeError):  # binascii.Error is a ValueError
        return None
    if len(formats) != 1:
        return None
    length, tail = formats.pop()
    if not isinstance(length, int) or not isinstance(tail, str) or not 0 <= length <= len(body):
        return None
    try:
        return body[:length] + _unbase64url(tail)
    except ValueError:
        return None


def _unbase64url(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


async def held_back(
    chunks: AsyncIterable[bytes], verifier: Verifier, *, hashed: Iterable[bytes] = ()
) -> AsyncGenerator[bytes]:
    """`hashed` (already fed to `verifier`), then `chunks`, hashed on the way; the last
    chunk only once the whole body matched the digest, so that a body with the wrong
    bytes ends short instead of completing.

    Raises:
        DigestMismatch: at the end, with the last chunk kept back.
    """
    pending = b""
    for piece in hashed:
        if pending:
            yield pending
        pending = piece
    async for chunk in chunks:
        verifier.update(chunk)
        if pending:
            yield pending
        pending = chunk
    verifier.finish()
    if pending:
        yield pending
