"""A small tmpfs mounted for one test: a real file system that fills up or turns read-only."""

from __future__ import annotations

import contextlib
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.infra.binaries import REQUIRE_ENV, integration_required, require_binary

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's syntax: `4m`) on `path` (created), unmount after.

    Needs root: skips without it, or fails under `VPSRELAY_REQUIRE_INTEGRATION=1`.
    """
    require_binary("mount")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}"
        if integration_required():
            pytest.fail(f"{reason} and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=False)


def fill_up(directory: Path, name: str = "filler") -> int:
    """Take every free byte of `directory`'s file system with one file; its size."""
    written = 0
    block = b"\0" * (64 * 1024)
    with (directory / name).open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block) or 0
            except OSError:  # ENOSPC: full
                return written
