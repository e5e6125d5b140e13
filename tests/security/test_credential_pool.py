"""Issue 16, part B: attacks on the operator's credential pool and on the relay's own
upstream tokens.

- An anonymous client cannot learn the pool's tokens: nothing the relay sends it (headers,
  bodies, `/token` answers, errors) nor its log holds a JWT issued to a pool account, and
  what the client holds (a placeholder) is worthless at the registry itself.
- A registry that answers 401 to every token, fresh ones included, does not make the
  relay loop: one refresh, then the client gets the registry's 401.
- A client with wrong credentials of its own is not retried with the operator's: its
  401 is its answer, and no token request carries the operator's credentials.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import bcrypt
import httpx
import jwt
import pytest

from tests.infra import require_binary
from tests.infra.front import HubFront
from tests.infra.hub import _registry_config, start_registry
from tests.infra.relay import RelayProcess, pull_token

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
BOB = ("bob", "builder-of-things")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TIMEOUT = 20.0
_JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")


@pytest.fixture
def pool_relay(clean_hub: Hub, tmp_path: Path) -> Iterator[RelayProcess]:
    """An open relay with a pool of two Docker Hub accounts (alice and bob)."""
    clean_hub.tokens.users[BOB[0]] = BOB[1]
    alice, password = clean_hub.creds
    config = tmp_path / "relay.toml"
    config.write_text(
        '[registries."docker.io"]\n'
        f'credentials = [{{ username = "{alice}", password = "{password}" }},'
        f' {{ username = "{BOB[0]}", password = "{BOB[1]}" }}]\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={clean_hub.registry_url}")
    try:
        with RelayProcess(tmp_path / "relay", *args) as relay:
            yield relay
    finally:
        clean_hub.tokens.users.pop(BOB[0], None)
        clean_hub.clear()


def _subjects(text: str) -> set[str]:
    """The subjects of every JWT in `text`."""
    found = set()
    for token in _JWT.findall(text):
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        found.add(str(claims.get("sub")))
    return found


def _seen(response: httpx.Response) -> str:
    return "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items()) + response.text


def test_a_client_cannot_learn_or_use_the_pools_tokens(
    pool_relay: RelayProcess, clean_hub: Hub
) -> None:
    image = clean_hub.images["library/alpine:latest"]
    seen: list[str] = []
    with httpx.Client(base_url=pool_relay.url, timeout=TIMEOUT) as client:
        for params in (
            {"service": "registry.docker.io", "scope": "repository:library/alpine:pull"},
            {
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:push,pull,delete",
                "offline_token": "true",
            },
            {"service": "registry.docker.io"},
        ):
            answer = client.get("/token", params=params)
            seen.append(_seen(answer))
        token = pull_token(pool_relay.url, "library/alpine")
        auth = {"authorization": f"Bearer {token}", "accept": OCI_MANIFEST}
        for path in (
            "/v2/",
            "/v2/alpine/manifests/latest",
            f"/v2/alpine/blobs/{image.layers[0].digest}",  # type: ignore[union-attr]
            "/v2/private/secret/manifests/1.0",
            "/v2/alpine/manifests/no-such-tag",
            "/v2/alpine/tags/list",
        ):
            seen.append(_seen(client.get(path, headers=auth)))
            seen.append(_seen(client.head(path, headers=auth)))
    issued = {claims["sub"] for claims in clean_hub.tokens.issued}
    assert {"alice", "bob"} & issued  # the relay did fetch pool tokens
    everything = "\n".join(seen)
    assert _subjects(everything) <= {""}  # anonymous tokens at most, never a pool account's
    assert not _subjects(pool_relay.log_text())
    for secret in (clean_hub.creds[1], BOB[1]):
        assert secret not in everything
        assert secret not in pool_relay.log_text()
    # What the client holds does not open the registry itself.
    direct = httpx.get(
        f"{clean_hub.registry_url}/v2/library/alpine/manifests/latest",
        headers={"authorization": f"Bearer {token}", "accept": OCI_MANIFEST},
        timeout=TIMEOUT,
    )
    assert direct.status_code == 401


def test_a_registry_refusing_every_token_gets_one_refresh_then_the_client_its_401(
    pool_relay: RelayProcess, clean_hub: Hub
) -> None:
    token = pull_token(pool_relay.url, "library/alpine")
    clean_hub.tokens.clear()
    clean_hub.front.reject_tokens = -1  # forever, fresh tokens too
    began = time.monotonic()
    response = httpx.get(
        f"{pool_relay.url}/v2/alpine/manifests/latest",
        headers={"authorization": f"Bearer {token}", "accept": OCI_MANIFEST},
        timeout=TIMEOUT,
    )
    assert time.monotonic() - began < 10
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert response.headers["www-authenticate"].startswith(f'Bearer realm="{pool_relay.url}/token"')
    assert clean_hub.front.rejected == 2  # the first token and one fresh one
    assert len(clean_hub.tokens.requests()) == 2
    assert httpx.get(f"{pool_relay.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_a_client_with_wrong_credentials_is_not_retried_with_the_operators(
    pool_relay: RelayProcess, clean_hub: Hub
) -> None:
    with httpx.Client(base_url=pool_relay.url, timeout=TIMEOUT) as client:
        # Its own token request, with a wrong password: the token service's 401.
        refused = client.get(
            "/token",
            params={"service": "registry.docker.io", "scope": "repository:library/alpine:pull"},
            auth=("alice", "not-the-password"),
        )
        assert refused.status_code == 401
        # A token of its own that the registry does not accept (no signature it knows).
        forged = jwt.encode({"sub": "alice", "access": []}, "k" * 32, algorithm="HS256")
        clean_hub.clear()
        answer = client.get(
            "/v2/alpine/manifests/latest",
            headers={"authorization": f"Bearer {forged}", "accept": OCI_MANIFEST},
        )
    assert answer.status_code == 401
    assert clean_hub.tokens.requests() == []  # no token fetched for it, with any credential
    requests = clean_hub.wait_registry_requests(lambda log: len(log) >= 1)
    assert requests == [("GET", "/v2/library/alpine/manifests/latest")]  # asked once
    assert not clean_hub.front.limits.pulls


def test_a_cdn_429_rests_no_pool_account(pool_relay: RelayProcess, clean_hub: Hub) -> None:
    """A CDN (or a hostile redirect target) that throttles the VPS says nothing about the
    operator's accounts: the client gets the 429, no account rests, none is tried in turn."""
    layer = clean_hub.images["library/alpine:latest"].layers[0].digest  # type: ignore[union-attr]
    token = pull_token(pool_relay.url, "library/alpine")
    auth = {"authorization": f"Bearer {token}"}
    clean_hub.clear()
    clean_hub.cdn.too_many = 86400
    with httpx.Client(base_url=pool_relay.url, timeout=TIMEOUT) as client:
        throttled = client.get(f"/v2/alpine/blobs/{layer}", headers=auth)
        assert throttled.status_code == 429
        blob_asks = clean_hub.wait_registry_requests(lambda log: len(log) >= 1)
        assert [p for _, p in blob_asks if "/blobs/" in p] == [f"/v2/library/alpine/blobs/{layer}"]
        clean_hub.cdn.too_many = None
        again = client.get(f"/v2/alpine/blobs/{layer}", headers=auth)
        assert again.status_code == 200  # the accounts were not put to rest


@pytest.fixture
def basic_registry(clean_hub: Hub, tmp_path: Path) -> Iterator[HubFront]:
    """The hub's images behind a registry that asks for Basic credentials (htpasswd:
    alice and bob), with Docker Hub's per-account pull limits in front."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}\n"
            for user, password in (clean_hub.creds, BOB)
        )
    )
    registry = start_registry(
        require_binary("docker-registry"),
        tmp_path / "logs",
        "basic",
        _registry_config(
            clean_hub.storage_dir, auth={"htpasswd": {"realm": "basic", "path": str(htpasswd)}}
        ),
    )
    front = HubFront(registry.port)
    try:
        yield front
    finally:
        front.close()
        registry.stop()


def test_client_auth_a_basic_registrys_pool_moves_on_after_a_429(
    basic_registry: HubFront, clean_hub: Hub, tmp_path: Path
) -> None:
    """With client authentication, a registry asking for Basic credentials: the pull goes
    on with bob when alice is spent; with both spent the client gets the registry's 429
    (not a 502), after one ask per account."""
    alice, password = clean_hub.creds
    config = tmp_path / "relay.toml"
    config.write_text(
        '[auth]\nenabled = true\npull_tokens = ["ci-token-0123456789abcdef"]\n'
        f'[registries."docker.io"]\nurl = "{basic_registry.url}"\n'
        f'credentials = [{{ username = "{alice}", password = "{password}" }},'
        f' {{ username = "{BOB[0]}", password = "{BOB[1]}" }}]\n'
    )
    basic_registry.limits.set({alice: 0, BOB[0]: 1})
    with (
        RelayProcess(tmp_path / "relay", "--config", str(config)) as relay,
        httpx.Client(base_url=relay.url, timeout=TIMEOUT) as client,
    ):
        token = client.get(
            "/token",
            params={"service": "vpsrelay", "scope": "repository:library/alpine:pull"},
            auth=("ci", "ci-token-0123456789abcdef"),
        ).json()["token"]
        auth = {"authorization": f"Bearer {token}", "accept": OCI_MANIFEST}
        first = client.get("/v2/alpine/manifests/latest", headers=auth)
        spent = client.get("/v2/alpine/manifests/latest", headers=auth)
        alive = client.get("/healthz")
    assert first.status_code == 200, first.text
    assert basic_registry.limits.pulls == {BOB[0]: 1}
    assert spent.status_code == 429, spent.text
    assert spent.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert sum(basic_registry.limits.refused.values()) <= 3  # bounded: no loop
    assert alive.status_code == 200
