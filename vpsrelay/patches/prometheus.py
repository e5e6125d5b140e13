"""The one place where vpsrelay changes prometheus-client's internals: its metrics files
get every page on disk before the page is mapped. A safety reach (`vpsrelay.patches`),
pinned to the version it was checked on (`tests/test_prometheus_patches.py` fails when the
source changes).

With several workers, prometheus-client keeps each worker's values in files it maps into
memory (`MmapedDict`, under `<data_dir>/run/metrics`). It makes and grows them with
`truncate`, which leaves holes: the file system gives a page its block only when the
mapped page is first touched. On a full disk it has none to give, and the kernel answers
that touch with SIGBUS, which kills the worker and every connection it holds (a new
label value, a worker starting, the supervisor folding a dead worker's files). Here the
files are made and grown with `posix_fallocate` instead, before the new size is mapped:
on a full disk that is an `OSError` the caller handles (`ops/metrics.py` drops the new
series; the supervisor keeps the dead worker's files), and a mapped page never needs a
block again. On tmpfs, ext4 and XFS, that is the whole fix; a copy-on-write file system
(btrfs, ZFS) may still need new blocks to rewrite a page (README, "Health and metrics").
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from importlib.metadata import version
from typing import Any

from prometheus_client import mmap_dict
from prometheus_client.mmap_dict import MmapedDict

PINNED = {"prometheus-client": "0.26.0"}
_PATCHED = "_vpsrelay_allocated"
UNPATCHED = {"__init__": MmapedDict.__init__, "_init_value": MmapedDict._init_value}


def versions_match() -> bool:
    return all(version(name) == pinned for name, pinned in PINNED.items())


def _allocate(fd: int, size: int) -> None:
    """Give bytes [0, size) of the file their blocks (and the file that size).

    Raises:
        OSError: the file system has no room (ENOSPC) or cannot allocate (EOPNOTSUPP).
    """
    os.posix_fallocate(fd, 0, size)


def _init(self: Any, filename: str, read_mode: bool = False) -> None:
    # prometheus-client 0.26.0's `MmapedDict.__init__`, with `_allocate` for `truncate`.
    f = open(filename, "rb" if read_mode else "a+b")  # noqa: SIM115 - kept open, closed in close()
    new = False
    try:
        capacity = os.fstat(f.fileno()).st_size
        new = capacity == 0
        if not read_mode:
            # Every page of the file, not only a new one's: one grown before a failed
            # allocation may have holes.
            capacity = capacity or mmap_dict._INITIAL_MMAP_SIZE
            _allocate(f.fileno(), capacity)
        m = mmap.mmap(
            f.fileno(), capacity, access=mmap.ACCESS_READ if read_mode else mmap.ACCESS_WRITE
        )
    except BaseException:
        f.close()
        if new and not read_mode:
            # Readers (a scrape, the supervisor's fold) cannot parse an empty file.
            with contextlib.suppress(OSError):
                os.unlink(filename)
        raise
    self._f = f
    self._fname = filename
    self._capacity = capacity
    self._m = m
    self._positions = {}
    self._used = mmap_dict._unpack_integer(self._m, 0)[0]
    if self._used == 0:
        self._used = 8
        mmap_dict._pack_integer(self._m, 0, self._used)  # type: ignore[no-untyped-call]
    elif not read_mode:
        for key, _, _, pos in self._read_all_values():
            self._positions[key] = pos


def _init_value(self: Any, key: str) -> None:
    # prometheus-client 0.26.0's `MmapedDict._init_value`: the file grows (allocated) to
    # the new size before anything changes, so a failure leaves the dict as it was.
    encoded = key.encode("utf-8")
    padded = encoded + (b" " * (8 - (len(encoded) + 4) % 8))
    value = struct.pack(f"i{len(padded)}sdd".encode(), len(encoded), padded, 0.0, 0.0)
    capacity = self._capacity
    while self._used + len(value) > capacity:
        capacity *= 2
    if capacity != self._capacity:
        _allocate(self._f.fileno(), capacity)
        self._m = mmap.mmap(self._f.fileno(), capacity)
        self._capacity = capacity
    self._m[self._used : self._used + len(value)] = value
    self._used += len(value)
    mmap_dict._pack_integer(self._m, 0, self._used)  # type: ignore[no-untyped-call]
    self._positions[key] = self._used - 16


def applied() -> bool:
    return getattr(MmapedDict, _PATCHED, False)


def apply() -> None:
    """Make `MmapedDict` allocate before it maps (the caller checked `versions_match`)."""
    if applied():
        return
    MmapedDict.__init__ = _init  # type: ignore[method-assign]
    MmapedDict._init_value = _init_value  # type: ignore[method-assign]
    setattr(MmapedDict, _PATCHED, True)
