"""Build the project's real Dockerfile against a test dockerd, with no registry and no PyPI.

* The base image: ``tests.infra.baseimage`` (debootstrap'd bookworm + python3), ``docker
  import``-ed and passed as ``--build-arg BASE_IMAGE``.
* The wheels: built here on the host with ``pip wheel`` (from this machine's package index) into
  ``wheelhouse/`` of a copy of the build context, passed as ``--build-arg WHEELHOUSE``, so pip
  inside the build installs offline. Without that argument the Dockerfile gets them from PyPI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.infra.baseimage import cache_key, debian_mirror, rootfs_tarball
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.clients import DockerDaemon

IMAGE = "vpsrelay:test"
BUILD_TIMEOUT = 600
# What the Dockerfile's COPY needs (see .dockerignore).
_CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt", "README.md")


def base_image_tag() -> str:
    return f"vpsrelay-test-base:{cache_key(debian_mirror())}"


def import_base(dockerd: DockerDaemon) -> str:
    """``docker import`` the cached debootstrap root filesystem; returns its tag."""
    tag = base_image_tag()
    tarball = rootfs_tarball()
    dockerd.docker("import", "--change", 'CMD ["/bin/bash"]', str(tarball), tag, timeout=300)
    return tag


def build_context(directory: Path) -> Path:
    """A copy of the checkout's build context plus ``wheelhouse/`` with every wheel needed."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _CONTEXT_FILES:
        shutil.copy2(REPO_ROOT / name, directory / name)
    shutil.copytree(
        REPO_ROOT / "vpsrelay",
        directory / "vpsrelay",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    wheelhouse = directory / "wheelhouse"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse),
         "-c", str(REPO_ROOT / "constraints.txt"), str(REPO_ROOT), "setuptools>=77"],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # The image must be built from the context's source, not from a wheel made here.
    for wheel in wheelhouse.glob("vpsrelay-*.whl"):
        wheel.unlink()
    return directory


def build_image(dockerd: DockerDaemon, workdir: Path, tag: str = IMAGE) -> str:
    """Build the Dockerfile (legacy builder, host network, offline); returns the tag."""
    base = import_base(dockerd)
    context = build_context(workdir / "context")
    dockerd.docker(
        "build", "--network", "host", "--tag", tag,
        "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "WHEELHOUSE=wheelhouse",
        str(context),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    return tag
