"""What every store keeps in memory beside its objects: who reads what, recent manifests."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

MANIFEST_MEMORY = 32 * 1024 * 1024  # bytes of manifest bodies kept for quick answers


class Pins:
    """How many readers hold each digest: a pinned object is never evicted."""

    def __init__(self) -> None:
        self._readers: dict[str, int] = {}

    def __contains__(self, digest: object) -> bool:
        return digest in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    @contextlib.contextmanager
    def hold(self, digest: str) -> Iterator[None]:
        self._readers[digest] = self._readers.get(digest, 0) + 1
        try:
            yield
        finally:
            left = self._readers[digest] - 1
            if left:
                self._readers[digest] = left
            else:
                del self._readers[digest]


class ManifestMemory:
    """Recently used manifest bodies, least recently used dropped past `limit` bytes."""

    def __init__(self, limit: int = MANIFEST_MEMORY) -> None:
        self._bodies: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._limit = limit

    def get(self, digest: str) -> bytes | None:
        body = self._bodies.get(digest)
        if body is not None:
            self._bodies.move_to_end(digest)
        return body

    def remember(self, digest: str, body: bytes) -> None:
        if digest in self._bodies:
            return
        self._bodies[digest] = body
        self._bytes += len(body)
        while self._bytes > self._limit:
            _, old = self._bodies.popitem(last=False)
            self._bytes -= len(old)

    def forget(self, digest: str) -> None:
        body = self._bodies.pop(digest, None)
        if body is not None:
            self._bytes -= len(body)
