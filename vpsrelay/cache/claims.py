"""Claims: which process of a relay fills a digest, on disk, so that workers share one cache.

A claim is the file `<data_dir>/claims/<hex>` held with `flock(LOCK_EX)` by the process
that fills (or stores) that digest. `flock` belongs to the open file, so the kernel
releases it the instant its holder dies, SIGKILL included: a claim can never outlive its
process. While it is held the file names the fill's temporary file and its size
(`<tmp name> <size>`), written before that file is created: so another process can join
the fill (open the temporary file by name and read it as it grows), count its size
against the cache's cap, and, once the claim is free, know which leftover to remove.

Every function blocks on small local syscalls only (no waiting: `LOCK_NB`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay import private_files

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("vpsrelay.cache")

ATTEMPTS = 3  # a claim file replaced between open and lock is opened again, this often


@dataclass(frozen=True, slots=True)
class ClaimNote:
    """What a held claim says: the fill's temporary file (a name under `tmp/`), its size."""

    tmp_name: str
    size: int

    def encode(self) -> bytes:
        return f"{self.tmp_name} {self.size}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> ClaimNote | None:
        """The note in `data`; None when empty or torn (a claim not yet written)."""
        name, _, size = data.decode("ascii", "replace").strip().partition(" ")
        if not name or "/" in name or name.startswith(".") or not size.isdigit():
            return None
        return cls(name, int(size))


def read_note(fd: int) -> ClaimNote | None:
    return ClaimNote.decode(os.pread(fd, 256, 0))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def try_claim(path: Path, tmp_dir: Path) -> int | None:
    """Take the claim at `path`: its descriptor (held), or None while another holds it.

    A claim taken from a dead holder still names the dead fill's temporary file: that
    leftover is removed here (it was never served complete, and is never renamed into
    place), and the note cleared.
    """
    for _ in range(ATTEMPTS):
        fd = private_files.open_file(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not _same_file(fd, path):  # released and removed while we opened it
            os.close(fd)
            continue
        note = read_note(fd)
        if note is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_dir / note.tmp_name)
                log.info("cache: removed %s, left by a fill whose process died", note.tmp_name)
            os.ftruncate(fd, 0)
        return fd
    return None


def write_note(fd: int, note: ClaimNote) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(), 0)


def release(fd: int, path: Path) -> None:
    """Give up a held claim: the file goes first, so no one takes a claim on a dead name."""
    with contextlib.suppress(FileNotFoundError):
        if _same_file(fd, path):
            os.unlink(path)
    os.close(fd)


def is_free(fd: int) -> bool:
    """Whether no process holds the claim `fd` was opened on (a shared lock, let go at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def open_held(path: Path) -> int | None:
    """A descriptor on the claim file at `path` to watch it (no lock); None if it is gone."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def reap(path: Path, tmp_dir: Path) -> None:
    """Remove the leftovers of a dead claim at `path`, if no one holds it."""
    fd = try_claim(path, tmp_dir)
    if fd is not None:
        release(fd, path)


def reserved_by_others(claims_dir: Path, own: set[str]) -> int:
    """Bytes that fills of other processes have announced (claim files not in `own`).

    A dead claim's note counts too until it is reaped: the cap errs on the safe side.
    """
    total = 0
    for entry in os.scandir(claims_dir):
        if entry.name in own:
            continue
        with contextlib.suppress(OSError):
            with open(entry.path, "rb") as f:
                note = ClaimNote.decode(f.read(256))
            if note is not None:
                total += note.size
    return total


def remove_leftovers(claims_dir: Path, tmp_dir: Path) -> int:
    """Remove what dead processes left in `tmp/` and `claims/`; live fills are untouched.

    A temporary file is live while a held claim names it; the files are listed before
    the claims are read, and a claim's note is written before its file is created, so a
    fill that starts meanwhile is never mistaken for a leftover.
    """
    listed = [entry.name for entry in os.scandir(tmp_dir)]
    live: set[str] = set()
    for entry in os.scandir(claims_dir):
        path = claims_dir / entry.name
        fd = try_claim(path, tmp_dir)  # removes a dead claim's file
        if fd is not None:
            release(fd, path)
            continue
        watch = open_held(path)
        if watch is not None:
            try:
                note = read_note(watch)
            finally:
                os.close(watch)
            if note is not None:
                live.add(note.tmp_name)
    removed = 0
    for name in listed:
        if name not in live:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_dir / name)
                removed += 1
    return removed
