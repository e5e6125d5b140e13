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
files are allocated with `posix_fallocate` before the library maps a new size (it then
finds the file at that size already, and calls `truncate` with the size it has):
on a full disk that is an `OSError` the caller handles (`ops/metrics.py` drops the new
series; the supervisor keeps the dead worker's files), and a mapped page never needs a
block again. On tmpfs, ext4 and XFS, that is the whole fix; a copy-on-write file system
(btrfs, ZFS) may still need new blocks to rewrite a page (README, "Health and metrics").
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from prometheus_client import mmap_dict
from prometheus_client.mmap_dict import MmapedDict

if TYPE_CHECKING:
    from collections.abc import Callable

PINNED = {"prometheus-client": "0.26.0"}
_PATCHED = "_vpsrelay_allocated"
# The library's own methods: the patch allocates, then calls them.
UNPATCHED: dict[str, Callable[..., None]] = {
    "__init__": MmapedDict.__init__,
    "_init_value": MmapedDict._init_value,
}


def versions_match() -> bool:
    return all(version(name) == pinned for name, pinned in PINNED.items())


def _allocate(fd: int, size: int) -> None:
    """Give bytes [0, size) of the file their blocks (and the file that size).

    Raises:
        OSError: the file system has no room (ENOSPC) or cannot allocate (EOPNOTSUPP).
    """
    os.posix_fallocate(fd, 0, size)


def _allocate_file(filename: str) -> None:
    """Allocate the file `MmapedDict` is about to map (made with its mode), whole: a file
    grown before a failed allocation may have holes. A new file is made and allocated under
    a temporary name, then linked into place: readers (a scrape, the supervisor's fold)
    that glob `*.db` never see it empty, even while a full disk fails it again and again.

    Raises:
        OSError: no room (the library's own `__init__` has not run).
    """
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
        try:
            # The size the library gives a new file, and then finds it has already (an empty
            # one: its maker died before allocating it).
            _allocate(fd, os.fstat(fd).st_size or mmap_dict._INITIAL_MMAP_SIZE)
        finally:
            os.close(fd)
        return
    # Not `*.db`: no reader globs it; a dead worker's is removed with its files (ops/fleet.py).
    temporary = f"{filename}.{os.getpid()}.new"
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        _allocate(fd, mmap_dict._INITIAL_MMAP_SIZE)
        with contextlib.suppress(FileExistsError):  # made meanwhile: the library opens it
            os.link(temporary, filename)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _grow_file(filename: str, size: int) -> None:
    """Allocate `filename` to `size` through a descriptor of its own: the library's handle is
    opened to append, and glibc's `posix_fallocate` emulation (file systems without native
    fallocate: some FUSE, NFS, older OpenZFS) refuses one (EBADF).

    Raises:
        OSError: the allocation failed (its message says which file, how much, and why).
    """
    fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
    try:
        _allocate(fd, size)
    except OSError as exc:
        name = os.path.basename(filename)
        raise OSError(exc.errno, f"allocating {size} bytes of {name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _init(self: MmapedDict, filename: str, read_mode: bool = False) -> None:
    if not read_mode:
        _allocate_file(filename)
    UNPATCHED["__init__"](self, filename, read_mode)


def _init_value(self: Any, key: str) -> None:
    # The size the library's `_init_value` grows the file to for `key`, allocated first: it
    # then only maps it (its `truncate` to the same size changes nothing). On failure
    # nothing changed: the dict works on, without `key`.
    encoded = key.encode("utf-8")
    padded_length = len(encoded) + 8 - (len(encoded) + 4) % 8
    needed = self._used + struct.calcsize(f"i{padded_length}sdd")
    if needed > 2 * self._capacity:
        # The library would truncate to each doubling on the way, shrinking what was
        # allocated: a key that big (tens of KiB) is a bug, not a series.
        raise OSError(errno.EFBIG, f"a metrics key of {len(encoded)} bytes")
    if needed > self._capacity:
        _grow_file(self._fname, 2 * self._capacity)
    UNPATCHED["_init_value"](self, key)


def applied() -> bool:
    return getattr(MmapedDict, _PATCHED, False)


def apply() -> None:
    """Make `MmapedDict` allocate before it maps (the caller checked `versions_match`)."""
    if applied():
        return
    MmapedDict.__init__ = _init  # type: ignore[method-assign]
    MmapedDict._init_value = _init_value  # type: ignore[method-assign]
    setattr(MmapedDict, _PATCHED, True)
