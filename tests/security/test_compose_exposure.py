"""Issue 18: the relay as docker-compose.yml configures it, attacked by an anonymous client.

The compose relay serves a public name (`server.public_url = https://$VPSRELAY_DOMAIN`) and
trusts no proxy. A client that sends its own Host and X-Forwarded-* headers must not steer the
token realm the relay hands out (a realm on the attacker's host would collect the next
`docker login`'s password), nor the scheme, whatever it sends. The relay is started with the
environment the shipped compose file gives it (read from the file, not copied by hand).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest
import yaml

from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.infra.hub import Hub

DOMAIN = "relay.example.com"
HOSTILE = [
    {"host": "evil.example"},
    {"host": "evil.example", "x-forwarded-host": "evil.example", "x-forwarded-proto": "http"},
    {"x-forwarded-host": "evil.example:443", "forwarded": "host=evil.example;proto=http"},
    {"host": "relay.example.com@evil.example"},
]


def _compose_relay_environment() -> dict[str, str]:
    """The relay service's plain settings from docker-compose.yml, `${VPSRELAY_DOMAIN}`
    filled in; the TLS listeners are left out (the test serves plain HTTP on loopback)."""
    service = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["relay"]
    env = {}
    for name, value in service["environment"].items():
        if name.startswith("VPSRELAY_TLS__") or name == "VPSRELAY_SERVER__LISTEN":
            continue
        env[name] = str(value).replace("${VPSRELAY_DOMAIN}", DOMAIN)
    assert env["VPSRELAY_SERVER__PUBLIC_URL"] == f"https://{DOMAIN}"
    return env


@pytest.fixture(scope="module")
def compose_relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with RelayProcess(
        tmp_path_factory.mktemp("compose-relay"),
        "--upstream", f"docker.io={hub.registry_url}",
        env=_compose_relay_environment(),
    ) as relay:  # fmt: skip
        yield relay


@pytest.mark.parametrize("headers", HOSTILE)
def test_a_client_cannot_steer_the_realm(
    compose_relay: RelayProcess, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=compose_relay.url, timeout=10, trust_env=False) as client:
        for path in ("/v2/", "/v2/library/alpine/manifests/latest"):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, response.text
            challenge = response.headers["www-authenticate"]
            assert f'realm="https://{DOMAIN}/token"' in challenge, challenge
            assert "evil" not in challenge


def test_the_relay_still_serves_the_token_its_realm_names(compose_relay: RelayProcess) -> None:
    """The fixed realm is a working one: /token answers on the relay itself."""
    with httpx.Client(base_url=compose_relay.url, timeout=10, trust_env=False) as client:
        response = client.get(
            "/token",
            params={"service": "registry.docker.io", "scope": "repository:library/alpine:pull"},
            headers={"host": "evil.example"},
        )
    assert response.status_code == 200, response.text
    assert response.json()["token"]
