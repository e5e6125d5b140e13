"""Pending ACME challenges as files, so every worker can answer them.

With `server.workers` > 1 the supervisor orders certificates, but the CA's validation
connection reaches whichever worker accepts it (port 80 for HTTP-01, the TLS port for
TLS-ALPN-01). The supervisor writes each pending challenge under
`<data_dir>/run/acme/<type>/<name>` (atomically: a reader sees all of it or nothing) and
removes it when the order is done; the workers read them when a validation arrives.

Names are checked before they become paths: a token is base64url (RFC 8555 §8.1), a
domain is letters, digits, hyphens and dots. A client's SNI that is not such a name is
simply not a pending challenge.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import TYPE_CHECKING

from vpsrelay import private_files, worker_identity

if TYPE_CHECKING:
    from pathlib import Path

HTTP01 = "http-01"
TLS_ALPN01 = "tls-alpn-01"
_NAMES = {
    HTTP01: re.compile(r"[A-Za-z0-9_-]{1,256}"),
    TLS_ALPN01: re.compile(r"[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63}){0,126}"),
}
MAX_VALUE = 4096


def directory(data_dir: Path) -> Path:
    return worker_identity.run_dir(data_dir) / "acme"


class ChallengeFiles:
    """One relay's pending challenges under `<data_dir>/run/acme/` (thread-safe: files)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def clear(self) -> None:
        """Forget what an earlier run left (the supervisor, before it orders anything)."""
        for kind in _NAMES:
            folder = self.root / kind
            private_files.make_dir(folder)
            for leftover in folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _path(self, kind: str, name: str) -> Path | None:
        if _NAMES[kind].fullmatch(name) is None:
            return None
        return self.root / kind / name

    def put(self, kind: str, name: str, value: str) -> None:
        path = self._path(kind, name)
        if path is None:
            raise ValueError(f"not a {kind} challenge name: {name!r}")
        private_files.make_dir(path.parent)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(value)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def remove(self, kind: str, name: str) -> None:
        path = self._path(kind, name)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def get(self, kind: str, name: str) -> str | None:
        path = self._path(kind, name)
        if path is None:
            return None
        try:
            with path.open() as file:
                return file.read(MAX_VALUE)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def pending(self, kind: str) -> dict[str, str]:
        """Every pending challenge of `kind`: name -> key authorization."""
        try:
            names = [n for n in os.listdir(self.root / kind) if not n.startswith(".")]
        except FileNotFoundError:
            return {}
        found = {name: self.get(kind, name) for name in names}
        return {name: value for name, value in found.items() if value is not None}

    def any_pending(self, kind: str) -> bool:
        try:
            return any(not n.startswith(".") for n in os.listdir(self.root / kind))
        except FileNotFoundError:
            return False
