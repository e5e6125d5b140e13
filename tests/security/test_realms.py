"""Issue 13, one token client: a hostile registry announces a token realm the relay must
not use (no scheme, another scheme, a broken host, a query that smuggles a scope).

A real Distribution announces each realm; the relay must answer an OCI 502 for every
token it would fetch there (a client's own `/token`, a pull with the operator's
credentials), never a 500, never a request to a non-http(s) URL, and stay up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.hub import _registry_config, start_registry
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub, RegistryProcess

TIMEOUT = 20.0
BAD_REALMS = [
    "127.0.0.1:notaport/token",
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/token",
    "http://[::1/token",
    "http:///token",
]


@pytest.fixture(params=BAD_REALMS)
def hostile(request: pytest.FixtureRequest, hub: Hub, tmp_path: Path) -> Iterator[RegistryProcess]:
    """Distribution with the hub's images whose token realm the relay cannot use."""
    auth = {
        "token": {
            "realm": request.param,
            "service": "registry.docker.io",
            "issuer": hub.tokens.issuer,
            "rootcertbundle": str(hub.tokens.cert_path),
        }
    }
    registry = start_registry(
        require_binary("docker-registry"),
        tmp_path / "registry",
        "hostile",
        _registry_config(hub.storage_dir, auth=auth),
    )
    try:
        yield registry
    finally:
        registry.stop()


def _assert_oci_502(response: httpx.Response) -> None:
    assert response.status_code == 502, response.text
    assert response.headers["content-type"].startswith("application/json")
    (error,) = response.json()["errors"]
    assert error["code"] == "UNAVAILABLE"


def test_an_unusable_realm_is_a_502_and_the_relay_stays_up(
    hostile: RegistryProcess, hub: Hub, tmp_path: Path
) -> None:
    user, password = hub.creds
    config = tmp_path / "relay.toml"
    config.write_text(f'[registries."docker.io"]\nusername = "{user}"\npassword = "{password}"\n')
    args = ("--config", str(config), "--upstream", f"docker.io={hostile.url}")
    with RelayProcess(tmp_path / "relay", *args) as relay, httpx.Client(timeout=TIMEOUT) as client:
        hub.tokens.clear()
        challenge = client.get(f"{relay.url}/v2/")
        assert challenge.status_code == 401  # the relay's own realm, whatever upstream said
        assert f'realm="{relay.url}/token"' in challenge.headers["www-authenticate"]
        # A client with its own credentials: passed on, to a realm that cannot be used.
        own = client.get(
            f"{relay.url}/token",
            params={"scope": "repository:alpine:pull", "service": "registry.docker.io"},
            auth=(user, password),
        )
        _assert_oci_502(own)
        # An anonymous client: the relay fetches its own token with the operator's.
        manifest = client.get(
            f"{relay.url}/v2/library/alpine/manifests/3.20",
            headers={"authorization": "Bearer vpsrelay-relay-credentials"},
        )
        _assert_oci_502(manifest)
        assert client.get(f"{relay.url}/healthz").status_code == 200
        assert relay.process.poll() is None
        assert "Traceback" not in relay.log_text()
        assert password not in relay.log_text()
    assert hub.tokens.requests() == []  # nothing went anywhere near a token service
