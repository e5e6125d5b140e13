"""private_files: owner-only folders and files under the data dir, whatever the umask."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import pytest

from vpsrelay import private_files

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture(autouse=True)
def _lax_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_dir_makes_every_missing_level_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    private_files.make_dir(tmp_path / "a" / "b" / "c")
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a/b", tmp_path / "a/b/c")] == [0o700] * 3
    assert mode(tmp_path) == 0o755  # what existed is not the relay's to change
    private_files.make_dir(tmp_path / "a" / "b" / "c")  # again: nothing to do


def test_secure_data_dir_tightens_an_existing_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(0o755)
    private_files.secure_data_dir(data)
    assert mode(data) == 0o700


def test_open_file_is_0600_even_with_a_lax_umask(tmp_path: Path) -> None:
    path = tmp_path / "f"
    os.close(private_files.open_file(path, os.O_WRONLY | os.O_EXCL))
    assert mode(path) == 0o600
    path.chmod(0o644)  # an earlier version's file is tightened when reopened
    os.close(private_files.open_file(path, os.O_RDWR))
    assert mode(path) == 0o600


def test_secure_data_dir_warns_about_a_dir_it_cannot_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(0o755)

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("vpsrelay.private_files.os.chmod", refuse)
    private_files.secure_data_dir(data)  # goes on
    assert "mode 755 and not the relay's to change" in caplog.text
