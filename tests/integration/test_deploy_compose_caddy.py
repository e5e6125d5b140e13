"""Issue 18: the compose stack's Caddy profile, as the README runs it, against a real dockerd.

`docker-compose --profile caddy up -d caddy` with the shipped docker-compose.yml and
Caddyfile.alt: Caddy (built from Debian's caddy package on the test base image; no registry is
reachable) gets its certificate for relay.test from pebble, and proxies to the plain relay over
h2c. The override only adapts the stack to host networking inside the test dockerd's namespace
(no compose network, so the relay is 127.0.0.1:5000 there) and points Caddy's ACME at pebble
through the `import` the Caddyfile offers for site-local global options.
"""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from tests.infra import require_binary
from tests.infra.compose import ComposeProject
from tests.infra.deployhost import DOMAIN, TRUST, upstream_env
from tests.infra.oci import BuiltImage

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.infra.deployhost import DeployHost
    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration, pytest.mark.clients]


def _caddy_transports(host: DeployHost) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [require_binary("nsenter"), f"--net={host.docker.netns_path}", "--",
         require_binary("curl"), "-sf", "--max-time", "10", "http://127.0.0.1:2019/config/"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    found: list[dict[str, Any]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("handler") == "reverse_proxy":
                found.append(node.get("transport", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(proc.stdout))
    return found


@pytest.fixture(scope="module")
def caddy_stack(
    deploy_host: DeployHost, hub: Hub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComposeProject]:
    workdir = tmp_path_factory.mktemp("compose-caddy")
    trust = deploy_host.trust_dir(workdir / "trust")
    globals_file = trust / "test-globals.caddy"
    globals_file.write_text(
        f"acme_ca {deploy_host.acme.directory_url}\nacme_ca_root {TRUST}/acme-api-ca.pem\n"
    )
    globals_file.chmod(0o644)
    project = ComposeProject(
        workdir / "project",
        deploy_host.docker,
        dotenv={"VPSRELAY_DOMAIN": DOMAIN, "VPSRELAY_EMAIL": "ops@relay.test"},
        override={
            "services": {
                "relay-plain": {
                    "image": deploy_host.relay_image(),
                    "network_mode": "host",
                    "environment": {
                        **upstream_env(hub),
                        "VPSRELAY_SERVER__LISTEN": "127.0.0.1:5000",
                        "VPSRELAY_SERVER__TRUSTED_PROXIES": "127.0.0.1/32",
                    },
                    "healthcheck": {"interval": "1s"},
                },
                "caddy": {
                    "image": deploy_host.caddy_image(),
                    "network_mode": "host",
                    "environment": {
                        "VPSRELAY_UPSTREAM": "h2c://127.0.0.1:5000",
                        "VPSRELAY_CADDY_GLOBALS": f"{TRUST}/test-globals.caddy",
                    },
                    "volumes": [f"{trust}:{TRUST}:ro"],
                },
            }
        },
        name="vrcaddy",
        profile="caddy",
    )
    try:
        yield project
    finally:
        project.down()


def test_caddy_profile_gets_a_certificate_and_dockerd_pulls_through_caddy(
    caddy_stack: ComposeProject, deploy_host: DeployHost, clean_hub: Hub
) -> None:
    orders = deploy_host.order_count()
    caddy_stack.run("up", "-d", "caddy")
    # compose started Caddy only once the relay was healthy (depends_on: service_healthy).
    print(f"relay-plain healthy after {caddy_stack.wait_healthy('relay-plain'):.1f}s")
    answer = deploy_host.probe()
    assert deploy_host.order_count() > orders, "Caddy's certificate should come from pebble"
    assert answer["status"] == 401
    assert answer["http_version"] == "HTTP/2"
    # The relay built the realm from Caddy's X-Forwarded-Host/-Proto: the public name.
    assert f'realm="https://{DOMAIN}/token"' in str(answer["www_authenticate"])

    # A client's own X-Forwarded-* do not reach the relay through Caddy: the realm stays.
    hostile = {"x-forwarded-host": "evil.example", "x-forwarded-proto": "http"}
    steered = deploy_host.probe(headers=hostile)["www_authenticate"]
    assert f'realm="https://{DOMAIN}/token"' in str(steered), steered

    # Caddy -> relay is HTTP/2 only: the transport Caddy runs (its admin API, on the
    # namespace's loopback) allows h2c and no HTTP/1.1.
    transports = _caddy_transports(deploy_host)
    assert transports, "no reverse_proxy transport in Caddy's running configuration"
    for transport in transports:
        assert "h2c" in transport["versions"], transport
        assert "1.1" not in transport["versions"], transport

    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    deploy_host.pull_through_mirror(image)
    relay_log = caddy_stack.logs("relay-plain")
    assert f'path="/v2/library/alpine/manifests/{image.manifest_digest}"' in relay_log or (
        'path="/v2/library/alpine/manifests/latest"' in relay_log
    ), relay_log
