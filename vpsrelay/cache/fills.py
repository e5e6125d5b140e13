"""Fills on disk: one this process leads (`DiskFill`), or one another process leads
that this process joins (`RemoteFill`).

A remote fill is followed by polling: its claim (`claims.py`) says whether the leader
lives and which temporary file it writes; the file's size is how far it got. Its bytes
are complete and verified exactly when the final path under `blobs/` is the very file
this process has open (same inode: the leader renames its temporary file into place
only after the digest matched), so a joiner never needs to hash to know its last byte
may go; a fill never seen streaming (filled between two polls) is complete when that
path exists. A leader that dies (its claim free, nothing committed) makes the fill `FAILED`
and `spilled`: joiners finish from the upstream with a ranged request, hashing the
whole blob again (`UpstreamFinisher.after_fill_spilled`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache import claims
from vpsrelay.cache.storage import Fill, FillState
from vpsrelay.errors import UpstreamError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger("vpsrelay.cache")

POLL_INTERVAL = 0.02  # seconds between looks at another process's fill
# A leader that is alive but makes no progress this long is given up on (its own upstream
# read timeout should have ended it long before): joiners then ask the upstream themselves.
STALL_LIMIT = 180.0


@dataclass(eq=False)
class DiskFill(Fill):
    """A fill written to a temporary file under `tmp/`, renamed into place when verified."""

    fd: int = -1
    tmp_path: Path | None = None
    claim_fd: int = -1  # the held claim (leader) or the watched one (joiner)


@dataclass(eq=False)
class RemoteFill(DiskFill):
    """A fill another process leads; `wait_changed` polls it."""

    claim_path: Path | None = None
    tmp_dir: Path | None = None
    final_path: Path | None = None
    on_end: Callable[[RemoteFill], None] | None = None
    _seen: tuple[FillState, int] = (FillState.PENDING, 0)
    _progress_at: float | None = None

    async def wait_changed(self) -> None:
        await trio.sleep(POLL_INTERVAL)
        self.refresh()

    def refresh(self) -> None:
        """Look at the leader's claim and file once; settle the fill when it ended."""
        if self.settled and self.state is not FillState.STREAMING:
            return
        assert self.claim_path is not None
        assert self.final_path is not None
        if self._committed():
            self._settle(FillState.COMMITTED)
            return
        if self.claim_fd < 0 or claims.is_free(self.claim_fd):
            if self._committed():  # renamed just before the claim was let go
                self._settle(FillState.COMMITTED)
                return
            self._leader_gone("its process stopped before the blob was verified")
            return
        if self.state is FillState.PENDING:
            self._begin_from_note()
        elif self.fd >= 0:
            self.written = min(os.fstat(self.fd).st_size, self.size)
        now = trio.current_time()
        seen = (self.state, self.written)
        if seen != self._seen or self._progress_at is None:
            self._seen, self._progress_at = seen, now
        elif now - self._progress_at > STALL_LIMIT:
            self._leader_gone(f"no progress for {STALL_LIMIT:.0f} s")

    def _committed(self) -> bool:
        assert self.final_path is not None
        if self.fd < 0:
            # Never seen streaming (a small blob filled between two polls): any file under
            # blobs/ is verified, so its being there is the commit.
            return self.final_path.exists()
        try:
            return os.stat(self.final_path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def _begin_from_note(self) -> None:
        note = claims.read_note(self.claim_fd)
        assert self.tmp_dir is not None
        if note is None:
            return  # the leader is still asking the upstream
        try:
            fd = os.open(self.tmp_dir / note.tmp_name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # announced, not created yet
        self.fd, self.size = fd, note.size
        self.tmp_path = self.tmp_dir / note.tmp_name
        self.written = min(os.fstat(fd).st_size, note.size)
        self.state = FillState.STREAMING
        self.changed()

    def _leader_gone(self, why: str) -> None:
        if self.state is FillState.STREAMING:
            log.warning("cache: the fill of %s in another process ended: %s", self.digest, why)
            self.error = UpstreamError(f"the fill of {self.digest} in another worker stopped")
            self.spilled = True  # joiners finish from the upstream
            self._settle(FillState.FAILED)
        else:
            self._settle(FillState.DROPPED)
        assert self.claim_path is not None
        assert self.tmp_dir is not None
        with contextlib.suppress(OSError):
            claims.reap(self.claim_path, self.tmp_dir)

    def _settle(self, state: FillState) -> None:
        self.state = state
        if state is FillState.COMMITTED:
            self.written = self.size
        for name in ("fd", "claim_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
        if self.on_end is not None:
            self.on_end(self)
        self.changed()
