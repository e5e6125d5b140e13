"""A local Debian bookworm + python3 root filesystem, for ``docker build --build-arg BASE_IMAGE``.

No container registry is reachable here, so ``python:3.12-slim`` cannot be pulled. Instead
``debootstrap`` builds a minimal bookworm with ``python3`` and ``python3-venv`` from the
Debian mirror this machine's apt already uses, and ``docker import`` turns the tarball into
an image. debootstrap takes minutes, so the tarball is cached in a stable directory keyed
by everything that goes into it; a fresh machine builds it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.infra.binaries import require_binary

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = ("python3", "python3-venv", "ca-certificates")
CACHE_DIR = Path(os.environ.get("VPSRELAY_TEST_CACHE", "/var/cache/vpsrelay-tests"))
DEBOOTSTRAP_TIMEOUT = 900
# Removed from the root filesystem: docs, caches and package lists nobody reads in a container.
_PRUNE = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
_URI = re.compile(r"https?://\S+/debian/?(?=\s|$)")


def debian_mirror() -> str:
    """The Debian archive URI apt already uses (deb822 ``URIs:`` or one-line ``deb``)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                if line.lstrip().startswith("#"):
                    continue
                match = _URI.search(line)
                if match:
                    return match.group(0).rstrip("/")
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list*")


def cache_key(mirror: str) -> str:
    text = "\n".join([SUITE, VARIANT, mirror, *PACKAGES, "prune:" + ",".join(_PRUNE)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rootfs_tarball() -> Path:
    """The cached tarball of the root filesystem, built with debootstrap if missing."""
    debootstrap = require_binary("debootstrap")
    mirror = debian_mirror()
    key = cache_key(mirror)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"debian-{SUITE}-python3-{key}.tar"
    if tarball.exists():
        return tarball
    # One builder at a time (parallel test runs on one machine share the cache).
    with (CACHE_DIR / f".{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        with tempfile.TemporaryDirectory(prefix="vr-rootfs-", dir=CACHE_DIR) as tmp:
            root = Path(tmp) / "root"
            proc = subprocess.run(
                [debootstrap, f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}",
                 SUITE, str(root), mirror],
                capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
            if proc.returncode != 0:
                log = root / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(
                    f"debootstrap failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{detail}"
                )
            for rel in _PRUNE:
                target = root / rel
                if target.is_dir():
                    shutil.rmtree(target)
                    target.mkdir()
            partial = Path(tmp) / "rootfs.tar"
            subprocess.run(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            partial.rename(tarball)
    return tarball


if __name__ == "__main__":  # pragma: no cover - a manual warm-up of the cache
    print(rootfs_tarball())
