"""Issue 18: the compose stack as the README runs it, with real ACME, against a real dockerd.

The shipped docker-compose.yml and Caddyfile.alt, a `.env` with the domain and e-mail (and the
ACME CA settings a user of another CA would add), and a test override: the images built from
the Dockerfile and Debian's caddy package, host networking inside the test dockerd's
loopback-only namespace, the Docker Hub stand-in as upstream, pebble's CA files mounted. The
relay (or Caddy) gets its certificate from pebble over HTTP-01 / TLS-ALPN-01 on ports 80/443
of that namespace, and dockerd, whose only registry mirror is `https://relay.test` and which
trusts pebble's root for it and nothing else, pulls through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.infra.compose import ComposeProject
from tests.infra.deployhost import DOMAIN, TRUST, upstream_env
from tests.infra.oci import BuiltImage, build_image

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.deployhost import DeployHost
    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration, pytest.mark.clients]
EMAIL = "ops@relay.test"


def _hello_world(hub: Hub, directory: Path) -> None:
    """`vpsrelay check` asks for docker.io's library/hello-world:latest by default."""
    image = build_image(directory / "hello-world", "latest", files={"hello": b"hello\n"})
    hub.push_image(image, "library/hello-world:latest")


@pytest.fixture(scope="module")
def tls_stack(
    deploy_host: DeployHost, hub: Hub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeProject]:
    workdir = tmp_path_factory.mktemp("compose-tls")
    trust = deploy_host.trust_dir(workdir / "trust")
    _hello_world(hub, workdir)
    project = ComposeProject(
        workdir / "project",
        deploy_host.docker,
        dotenv={
            "VPSRELAY_DOMAIN": DOMAIN,
            "VPSRELAY_EMAIL": EMAIL,
            # What a user of another ACME CA adds to .env (README, "Docker Compose").
            "VPSRELAY_TLS__ACME_DIRECTORY": deploy_host.acme.directory_url,
            "VPSRELAY_TLS__ACME_CA_BUNDLE": f"{TRUST}/acme-api-ca.pem",
        },
        override={
            "services": {
                "relay": {
                    "image": deploy_host.relay_image(),
                    "network_mode": "host",
                    "environment": upstream_env(hub),
                    "volumes": [f"{trust}:{TRUST}:ro"],
                    "healthcheck": {"interval": "1s"},
                }
            }
        },
        name="vrtls",
    )
    try:
        yield project
    finally:
        project.down()


def test_compose_up_gets_a_certificate_and_dockerd_pulls_over_verified_https(
    tls_stack: ComposeProject, deploy_host: DeployHost, clean_hub: Hub
) -> None:
    orders = deploy_host.order_count()
    tls_stack.run("up", "-d")
    print(f"relay healthy after {tls_stack.wait_healthy('relay'):.1f}s")
    answer = deploy_host.probe()
    # One order, answered over HTTP-01 on port 80 (the relay's only challenge type by default).
    assert deploy_host.order_count() == orders + 1
    assert answer["status"] == 401
    assert answer["http_version"] == "HTTP/2"
    assert f'realm="https://{DOMAIN}/token"' in str(answer["www_authenticate"])
    logs = tls_stack.logs("relay")
    assert "http-01" in logs.lower(), logs

    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    deploy_host.pull_through_mirror(image)
    assert clean_hub.cdn.requests(), "blobs should have come through the CDN hop"


def test_vpsrelay_check_in_the_container_passes(tls_stack: ComposeProject) -> None:
    """The README's command; `--ca` because pebble's root is nobody's trust store (the
    interpreter's file capability makes OpenSSL ignore SSL_CERT_FILE as well)."""
    result = tls_stack.run(
        "exec", "-T", "relay", "vpsrelay", "check", "--ca", f"{TRUST}/root.pem",
        check=False, timeout=120,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
    for row in ("dns", "tls", "http/2", "port 80"):
        assert any(line.startswith(row) and " ok " in line for line in result.stdout.splitlines())


def test_restart_and_down_up_reuse_the_certificate_from_the_volume(
    tls_stack: ComposeProject, deploy_host: DeployHost, clean_hub: Hub
) -> None:
    first = deploy_host.probe()["sha256"]
    orders = deploy_host.order_count()

    tls_stack.run("restart")
    tls_stack.wait_healthy("relay")
    assert deploy_host.probe()["sha256"] == first

    tls_stack.run("down")  # keeps the named volume
    tls_stack.run("up", "-d")
    tls_stack.wait_healthy("relay")
    assert deploy_host.probe()["sha256"] == first
    assert deploy_host.order_count() == orders, "a certificate was ordered again"

    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    deploy_host.pull_through_mirror(image)
