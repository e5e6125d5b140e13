"""`DiskReader`: a reader of one file of the disk cache (a `BlobReader`), by offset, in a
worker thread. Also what the bucket store reads its staging files with."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import trio

from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from vpsrelay.core.digest import Verifier

log = logging.getLogger("vpsrelay.cache")


class DiskReader:
    """Reads one file by offset in a worker thread (a `BlobReader`); owns its descriptor."""

    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self._fd = fd
        self._limiter = limiter

    async def read(self, offset: int, count: int, verifier: Verifier | None = None) -> bytes:
        """Up to `count` bytes at `offset`, read (and hashed, with a verifier) in a thread.

        Raises:
            UpstreamError: the file ended early or could not be read (the cache's disk
            failing is the upstream's stream failing, as far as the client can tell).
        """
        try:
            data = await trio.to_thread.run_sync(
                _read_blocking, self._fd, count, offset, verifier, limiter=self._limiter
            )
        except OSError as exc:
            log.warning("cache: cannot read a cached file: %s", exc)
            raise UpstreamError("the relay could not read its cache") from exc
        if not data:
            raise UpstreamError("the cached file ended early")
        return data

    def set_end(self, end: int) -> None:
        """Nothing: a file on this disk was verified when it was written."""

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _read_blocking(fd: int, count: int, offset: int, verifier: Verifier | None) -> bytes:
    data = os.pread(fd, count, offset)
    if verifier is not None:
        verifier.update(data)
    return data
