"""Issue 2: real container clients use the relay as their Docker Hub mirror.

dockerd runs in a loopback-only network namespace (a failed mirror makes it fall back to
the real Docker Hub, which must be unreachable); containerd and podman get a dead loopback
address for the real host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.infra.clients import Containerd, DeadPort, DockerDaemon, Podman
from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration, pytest.mark.clients]


@pytest.fixture(scope="module")
def relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with RelayProcess(
        tmp_path_factory.mktemp("relay"), "--upstream", f"docker.io={hub.registry_url}"
    ) as process:
        yield process


def _alpine(hub: Hub) -> BuiltImage:
    image = hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    return image


def _mark(relay: RelayProcess) -> int:
    return len(relay.log_text())


def _access_lines(relay: RelayProcess, mark: int) -> list[str]:
    return [line for line in relay.log_text()[mark:].splitlines() if "vpsrelay.access" in line]


def test_dockerd_pulls_alpine_through_the_relay(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = _alpine(clean_hub)
    with DockerDaemon(
        tmp_path / "dockerd", forward_ports=[relay.port], mirrors=[relay.url]
    ) as dockerd:
        assert dockerd.netns_interfaces() == ["lo"]
        mark = _mark(relay)
        dockerd.docker("pull", "alpine")
        image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", "alpine").stdout
        assert image_id.strip() == image.config.digest
        lines = _access_lines(relay, mark)
        assert any(
            'path="/v2/alpine/manifests/latest"' in line
            or 'path="/v2/library/alpine/manifests/latest"' in line
            for line in lines
        ), lines
        for layer in image.layers:
            assert any(layer.digest in line and "status=200" in line for line in lines), lines
    # Every blob reached the client through the relay's own CDN hop, without credentials.
    assert all(r.header("authorization") is None for r in clean_hub.cdn.requests())


def test_containerd_pulls_through_the_relay_with_ns(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = _alpine(clean_hub)
    with DeadPort() as dead, Containerd(tmp_path / "containerd") as containerd:
        containerd.write_hosts("docker.io", mirror_url=relay.url, dead_server=dead.url)
        mark = _mark(relay)
        containerd.pull("docker.io/library/alpine:latest")
        lines = _access_lines(relay, mark)
        assert any("ns=docker.io" in line and "/manifests/latest" in line for line in lines), lines
        listed = containerd.ctr("images", "ls").stdout
        assert image.manifest_digest in listed


def test_podman_pulls_through_the_relay(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = _alpine(clean_hub)
    with (
        DeadPort() as dead,
        Podman(
            tmp_path / "podman",
            mirror=relay.url.removeprefix("http://"),
            dead_location=dead.address,
        ) as podman,
    ):
        mark = _mark(relay)
        podman.pull("docker.io/library/alpine:latest")
        digest = podman.podman(
            "image", "inspect", "--format", "{{.Digest}}", "docker.io/library/alpine:latest"
        ).stdout.strip()
        assert digest == image.manifest_digest
        lines = _access_lines(relay, mark)
        assert any("/v2/library/alpine/manifests/latest" in line for line in lines), lines


def test_docker_login_then_pull_private_through_the_relay(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    """`docker login relay` stores an identity (refresh) token from the upstream's token
    service, and the pull of a private repository uses it (POST /token, refresh grant)."""
    image = clean_hub.images["private/secret:1.0"]
    assert isinstance(image, BuiltImage)
    address = relay.url.removeprefix("http://")
    user, password = clean_hub.creds
    with DockerDaemon(tmp_path / "dockerd", forward_ports=[relay.port]) as dockerd:
        denied = dockerd.docker("pull", f"{address}/private/secret:1.0", check=False)
        assert denied.returncode != 0
        login = dockerd.docker("login", address, "-u", user, "-p", password)
        assert "Login Succeeded" in login.stdout
        dockerd.docker("pull", f"{address}/private/secret:1.0")
        image_id = dockerd.docker(
            "image", "inspect", "--format", "{{.Id}}", f"{address}/private/secret:1.0"
        ).stdout.strip()
        assert image_id == image.config.digest
    token_requests = clean_hub.tokens.requests()
    # login asked for an offline token with Basic credentials ...
    assert any(
        r.method == "GET" and "offline_token=true" in r.path and r.header("authorization")
        for r in token_requests
    )
    # ... and the pull used the refresh token in a POST form, scoped to the upstream name.
    posts = [r for r in token_requests if r.method == "POST"]
    assert posts
    assert any(b"grant_type=refresh_token" in r.body for r in posts)
    assert any(b"private%2Fsecret" in r.body for r in posts)
    assert password not in relay.log_text()
