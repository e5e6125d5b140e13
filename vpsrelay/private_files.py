"""Files and folders under the data dir: the owner's alone, whatever the umask.

The data dir holds cached layers of private images, the token signing key, the ACME
account key and the budget; other local users have no business reading any of it.
A systemd unit sets `UMask=0077`, but a relay started by hand, by cron or in a container
inherits whatever umask it gets: so every folder is made 0700 and every file 0600
explicitly (after creation too, since the umask only ever takes bits away).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("vpsrelay")

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dir(path: Path) -> None:
    """Create `path` and its missing parents, each 0700; existing folders stay as they are."""
    missing: list[Path] = []
    current = path
    while not current.is_dir() and current != current.parent:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent maker won the race
            folder.mkdir(DIR_MODE)
            os.chmod(folder, DIR_MODE)


def secure_data_dir(path: Path) -> None:
    """Create the data dir 0700, or make an existing one 0700 (at start).

    A data dir the relay may write to but does not own (a bind mount owned by root, say)
    cannot be changed: that is said, loudly, and the relay goes on.

    Raises:
        OSError: it cannot be created.
    """
    make_dir(path)
    try:
        os.chmod(path, DIR_MODE)
    except PermissionError:
        current = stat.S_IMODE(path.stat().st_mode)
        if current & 0o077:
            log.warning(
                "data_dir %s is mode %o and not the relay's to change: other local users may "
                "read cached layers; make it the relay user's, mode 0700",
                path, current,
            )  # fmt: skip


def open_file(path: Path | str, flags: int) -> int:
    """`os.open` with `O_CREAT`, the file 0600 whatever the umask; a descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd
