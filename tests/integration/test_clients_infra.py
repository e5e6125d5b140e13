"""Self-tests for tests/infra/clients.py: real dockerd / containerd / podman against a plain
``docker-registry`` standing in as "the mirror"."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.infra.binaries import require_binary
from tests.infra.clients import Containerd, DeadPort, DockerDaemon, Podman
from tests.infra.oci import build_image, push

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.integration, pytest.mark.clients]

HELLO_FILES = {"hello.txt": b"hello from vpsrelay tests\n"}


@dataclass
class Registry:
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def requests_since(self, mark: int) -> list[str]:
        """Access-log request lines (``GET /v2/... HTTP/1.1`` plus user agent) after ``mark``."""
        with self.log_path.open("rb") as f:
            f.seek(mark)
            text = f.read().decode("utf-8", "replace")
        return [ln for ln in text.splitlines() if re.search(r'"(GET|HEAD) /v2/', ln)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain docker-registry on 127.0.0.1:<random> seeded with library/hello:latest."""
    binary = require_binary("docker-registry")
    require_binary("skopeo")
    d = tmp_path_factory.mktemp("registry")
    (d / "data").mkdir()
    config = d / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  accesslog:\n"
        "    disabled: false\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {d / 'data'}\n"
        "http:\n"
        "  addr: 127.0.0.1:0\n"
    )
    log_path = d / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            if m:
                port = int(m.group(1))
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not start:\n{log_path.read_text()}")
            else:
                time.sleep(0.05)
        image = build_image(d / "layout", "latest", files=HELLO_FILES)
        push(image, f"127.0.0.1:{port}/library/hello:latest")
        yield Registry(port=port, log_path=log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[DockerDaemon]:
    with DockerDaemon(
        tmp_path_factory.mktemp("dockerd"),
        forward_ports=[registry.port],
        mirrors=[registry.url],
    ) as daemon:
        yield daemon


def test_dockerd_runs_in_isolated_netns(dockerd: DockerDaemon) -> None:
    assert dockerd.netns_interfaces() == ["lo"]
    version = dockerd.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    assert version.startswith("20.10")


def test_dockerd_pulls_through_mirror(dockerd: DockerDaemon, registry: Registry) -> None:
    dockerd.docker("rmi", "-f", "hello:latest", check=False)
    mark = registry.mark()
    dockerd.docker("pull", "hello:latest")
    lines = registry.requests_since(mark)
    assert any("/v2/library/hello/manifests/" in ln and "docker/20.10" in ln for ln in lines), lines
    assert any("/v2/library/hello/blobs/sha256:" in ln for ln in lines), lines
    out = dockerd.docker("image", "inspect", "--format", "{{.Id}}", "hello:latest").stdout
    assert out.startswith("sha256:")


def test_dockerd_fallback_cannot_leave_the_machine(
    dockerd: DockerDaemon, registry: Registry
) -> None:
    mark = registry.mark()
    start = time.monotonic()
    proc = dockerd.docker("pull", "library/doesnotexist:1", timeout=60, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    # The mirror was asked first (and said 404) ...
    assert any("/v2/library/doesnotexist/manifests/1" in ln for ln in registry.requests_since(mark))
    # ... then the fallback to Docker Hub died at the DNS lookup inside the namespace.
    err = proc.stderr
    assert "registry-1.docker.io" in err, err
    assert "network is unreachable" in err, err


def test_dockerd_reload_changes_mirrors(dockerd: DockerDaemon, registry: Registry) -> None:
    with DeadPort() as dead:
        dockerd.reload(mirrors=[dead.url])
        info = dockerd.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
        assert dead.url in info, info
    dockerd.reload(mirrors=[registry.url])
    info = dockerd.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    assert registry.url in info, info


def test_containerd_pulls_through_mirror(tmp_path: Path, registry: Registry) -> None:
    with DeadPort() as dead, Containerd(tmp_path / "containerd") as ctrd:
        hosts = ctrd.write_hosts("docker.io", mirror_url=registry.url, dead_server=dead.url)
        assert hosts == ctrd.hosts_dir / "docker.io" / "hosts.toml"
        mark = registry.mark()
        ctrd.pull("docker.io/library/hello:latest")
        lines = registry.requests_since(mark)
        assert any(
            "/v2/library/hello/manifests/latest?ns=docker.io" in ln and "containerd/" in ln
            for ln in lines
        ), lines
        assert any("/blobs/sha256:" in ln and "?ns=docker.io" in ln for ln in lines), lines
        listed = ctrd.ctr("images", "ls", "-q").stdout.split()
        assert "docker.io/library/hello:latest" in listed
        # pull() is cold every time: the blobs are fetched again.
        mark = registry.mark()
        ctrd.pull("docker.io/library/hello:latest")
        assert any("/blobs/sha256:" in ln for ln in registry.requests_since(mark))


def test_containerd_dead_server_fails_closed(tmp_path: Path, registry: Registry) -> None:
    """A mirror that fails falls back to the dead port, not to the internet."""
    with DeadPort() as dead, DeadPort() as dead_mirror, Containerd(tmp_path / "ctrd") as ctrd:
        ctrd.write_hosts("docker.io", mirror_url=dead_mirror.url, dead_server=dead.url)
        start = time.monotonic()
        proc = ctrd.pull("docker.io/library/hello:latest", check=False, timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - start < 30
        assert f"127.0.0.1:{dead.port}" in proc.stderr, proc.stderr
        assert "connection refused" in proc.stderr, proc.stderr


def test_podman_pulls_through_mirror(tmp_path: Path, registry: Registry) -> None:
    with (
        DeadPort() as dead,
        Podman(tmp_path / "podman", mirror=registry.url, dead_location=dead.address) as podman,
    ):
        mark = registry.mark()
        podman.pull("docker.io/library/hello:latest")
        lines = registry.requests_since(mark)
        assert any(
            "/v2/library/hello/manifests/latest" in ln and "containers/" in ln for ln in lines
        ), lines
        out = podman.podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
        assert "docker.io/library/hello:latest" in out.split()


def test_podman_dead_mirror_fails_closed(tmp_path: Path) -> None:
    with (
        DeadPort() as dead,
        DeadPort() as dead_mirror,
        Podman(
            tmp_path / "podman", mirror=dead_mirror.address, dead_location=dead.address
        ) as podman,
    ):
        start = time.monotonic()
        proc = podman.pull("docker.io/library/hello:latest", check=False, timeout=60)
        assert proc.returncode != 0
        assert time.monotonic() - start < 30
        assert f"127.0.0.1:{dead.port}" in proc.stderr, proc.stderr
