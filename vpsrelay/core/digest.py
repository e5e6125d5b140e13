"""Content digests: parse them and check bytes against them as they stream.

Only `hashlib`; the verifier is fed chunk by chunk, so no blob is ever held whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.core import grammar
from vpsrelay.errors import DigestInvalid, DigestMismatch

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterable, Iterable

HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


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
