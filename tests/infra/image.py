"""Build the project's real Dockerfile against a test dockerd, with no registry and no PyPI.

* The base image: ``tests.infra.baseimage`` (debootstrap'd bookworm + python3), ``docker
  import``-ed and passed as ``--build-arg BASE_IMAGE``.
* The wheels: built here on the host with ``pip wheel`` (from this machine's package index) into
  ``wheelhouse/`` of a copy of the build context, passed as ``--build-arg WHEELHOUSE``, so pip
  inside the build installs offline. Without that argument the Dockerfile gets them from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from tests.infra.baseimage import cache_key, debian_mirror, rootfs_tarball
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.clients import DockerDaemon

IMAGE = "vpsrelay:test"
# Generous: a loaded 2-core machine once needed more than 600 s; the legacy builder reuses
# the layers of an earlier build on the same daemon, so a rebuild takes seconds.
BUILD_TIMEOUT = 1500
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


def build_image(
    dockerd: DockerDaemon, workdir: Path, tag: str = IMAGE, *, base: str | None = None
) -> str:
    """Build the Dockerfile (legacy builder, host network, offline); returns the tag."""
    base = base or import_base(dockerd)
    context = build_context(workdir / "context")
    return run_build(dockerd, context, tag, {"BASE_IMAGE": base, "WHEELHOUSE": "wheelhouse"})


def run_build(
    dockerd: DockerDaemon,
    context: Path,
    tag: str,
    build_args: dict[str, str],
    timeout: float = BUILD_TIMEOUT,
) -> str:
    """``docker build`` with its output streamed to ``build-<tag>.log`` and progress printed
    (a step line with the time since the start), bounded by ``timeout`` in all."""
    args = [f"--build-arg={key}={value}" for key, value in build_args.items()]
    argv = [dockerd.docker_cli, "build", "--network", "host", "--tag", tag, *args, str(context)]
    log = dockerd.workdir / f"build-{tag.replace(':', '-').replace('/', '-')}.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
        "DOCKER_HOST": dockerd.host,
        "DOCKER_CONFIG": str(dockerd.docker_config_dir),
        "DOCKER_BUILDKIT": "0",
    }
    began = time.monotonic()
    with (
        log.open("w") as out,
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, start_new_session=True,
        ) as proc,
    ):  # fmt: skip
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.startswith("Step "):
                    print(f"[build {tag} +{time.monotonic() - began:.0f}s] {line.rstrip()}")
            proc.wait()
        finally:
            timer.cancel()
    seconds = time.monotonic() - began
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        why = f"timed out after {timeout:.0f}s" if seconds >= timeout else f"rc={proc.returncode}"
        raise RuntimeError(f"docker build {tag} failed ({why}):\n{tail}")
    print(f"[build {tag}] done in {seconds:.0f}s")
    return tag
