"""Issue 16, part B, end to end: several operator credentials for Docker Hub (a pool),
Docker Hub's per-account pull limit (the hub front's `PullLimits`: a manifest GET is a
pull, a HEAD is free, a spent account gets 429 with `Retry-After`), and the relay's own
upstream token refused (401) once: refreshed and retried."""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.oci import BuiltImage, build_image
from tests.infra.relay import RelayProcess, pull_token
from tests.integration.test_operator import scrape, value, vpsrelay
from tests.integration.test_pull import assert_blobs_pulled, host, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
BOB = ("bob", "builder-of-things")
# Every manifest type, as pulling clients ask: an answer the cache may remember for the tag.
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))  # fmt: skip
TIMEOUT = 20.0


@pytest.fixture
def pool_hub(clean_hub: Hub) -> Iterator[Hub]:
    """The hub with a second account, bob, beside alice."""
    clean_hub.tokens.users[BOB[0]] = BOB[1]
    try:
        yield clean_hub
    finally:
        clean_hub.tokens.users.pop(BOB[0], None)
        clean_hub.clear()


@pytest.fixture
def pool_relay(pool_hub: Hub, tmp_path: Path) -> Iterator[RelayProcess]:
    """A relay holding a pool of two Docker Hub accounts, alice then bob (bob's password
    from a variable), with the cache on and every tag revalidated (`tag_ttl = 0.01`)."""
    alice, password = pool_hub.creds
    config = tmp_path / "relay.toml"
    config.write_text(
        "[cache]\ntag_ttl = 0.01\n\n"
        '[registries."docker.io"]\n'
        f'credentials = [{{ username = "{alice}", password = "{password}" }},'
        f' {{ username = "{BOB[0]}", password_env = "POOL_BOB_PASSWORD" }}]\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={pool_hub.registry_url}")
    env = {"POOL_BOB_PASSWORD": BOB[1]}
    with RelayProcess(tmp_path / "relay", *args, env=env) as relay:
        yield relay


def _get_manifest(relay: RelayProcess, repository: str, reference: str) -> httpx.Response:
    """A manifest GET as an anonymous client does it: the relay's /token, then the pull."""
    token = pull_token(relay.url, repository)
    return httpx.get(
        f"{relay.url}/v2/{repository}/manifests/{reference}",
        headers={"authorization": f"Bearer {token}", "accept": MANIFEST_TYPES},
        timeout=TIMEOUT,
    )


def _push_fresh(hub: Hub, tmp_path: Path, ref: str, text: str) -> BuiltImage:
    image = build_image(tmp_path / uuid.uuid4().hex, "t", files={"etc/app": text.encode()})
    hub.push_image(image, ref)
    return image


def _readyz_credentials(relay: RelayProcess) -> dict[str, dict[str, object]]:
    body = httpx.get(f"{relay.url}/readyz", timeout=TIMEOUT).json()
    return dict(body["upstreams"]["docker.io"]["credentials"])


def test_pulls_continue_on_the_second_credential_when_the_first_is_spent(
    pool_relay: RelayProcess, pool_hub: Hub, tmp_path: Path
) -> None:
    limits = pool_hub.front.limits
    limits.set({"alice": 0, "bob": 100})
    image = pool_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    skopeo_copy(tmp_path / "a", f"{host(pool_relay)}/alpine:latest")
    assert_blobs_pulled(tmp_path / "a", image)
    assert limits.refused == {"alice": 1}  # asked once, then left to rest
    assert limits.pulls.get("alice", 0) == 0
    first_pulls = limits.pulls["bob"]
    assert first_pulls >= 1

    # A second image: alice rests (her Retry-After has not passed), so she is not asked.
    skopeo_copy(tmp_path / "b", f"{host(pool_relay)}/someuser/tool:1.0")
    assert limits.refused == {"alice": 1}
    assert limits.pulls["bob"] > first_pulls

    samples = scrape(pool_relay)
    alice = {"registry": "docker.io", "credential": "alice"}
    bob = {"registry": "docker.io", "credential": "bob"}
    assert value(samples, "vpsrelay_upstream_credential_ratelimit_remaining", **alice) == 0
    assert value(samples, "vpsrelay_upstream_credential_refusals", **alice) == 1
    assert value(samples, "vpsrelay_upstream_credential_rest_until_timestamp_seconds", **alice) > 0
    assert value(samples, "vpsrelay_upstream_credential_ratelimit_limit", **bob) == 100
    assert (
        value(samples, "vpsrelay_upstream_credential_ratelimit_remaining", **bob)
        == 100 - limits.pulls["bob"]
    )
    assert value(samples, "vpsrelay_upstream_credential_rest_until_timestamp_seconds", **bob) == 0

    report = _readyz_credentials(pool_relay)
    assert report["alice"]["remaining"] == 0
    resting = report["alice"]["resting_seconds"]
    assert isinstance(resting, int)
    assert 0 < resting <= limits.retry_after
    assert report["bob"]["remaining"] == 100 - limits.pulls["bob"]
    assert report["bob"]["resting_seconds"] == 0

    result = vpsrelay("check", "--url", pool_relay.url, "--json")
    rows = {row["check"]: row for row in json.loads(result.stdout)["rows"]}
    assert rows["credential docker.io alice"]["result"] == "warn"
    assert rows["credential docker.io alice"]["detail"].startswith("0 of 0 pulls left; resting")
    assert rows["credential docker.io bob"]["result"] == "ok"
    assert "of 100 pulls left" in rows["credential docker.io bob"]["detail"]
    for secret in (pool_hub.creds[1], BOB[1]):
        assert secret not in pool_relay.log_text()
        assert secret not in result.stdout


def test_both_spent_a_cached_manifest_is_served_stale_else_429(
    pool_relay: RelayProcess, pool_hub: Hub, tmp_path: Path
) -> None:
    limits = pool_hub.front.limits
    limits.set({"alice": 100, "bob": 100})
    repository = f"pooltest/app-{uuid.uuid4().hex[:8]}"
    old = _push_fresh(pool_hub, tmp_path, f"{repository}:1", "one")
    first = _get_manifest(pool_relay, repository, "1")
    assert first.status_code == 200, first.text
    assert first.content == old.manifest_bytes
    pulls = dict(limits.pulls)

    # HEAD revalidation is free: the tag is asked about again (tag_ttl = 0.01), no pull counted.
    again = _get_manifest(pool_relay, repository, "1")
    assert again.status_code == 200
    assert again.headers["x-vpsrelay-cache"] == "revalidated"
    assert limits.pulls == pulls

    # The tag moves upstream, and both accounts are spent: the copy the tag named is
    # served, stale.
    _push_fresh(pool_hub, tmp_path, f"{repository}:1", "two")
    limits.set({"alice": 0, "bob": 0})
    stale = _get_manifest(pool_relay, repository, "1")
    assert stale.status_code == 200, stale.text
    assert stale.content == old.manifest_bytes
    assert stale.headers["x-vpsrelay-cache"] == "stale"
    assert stale.headers["warning"].startswith("110 ")
    # Each account was asked at most once (one the free HEAD showed spent is not asked).
    assert limits.refused
    assert set(limits.refused.values()) == {1}
    assert limits.pulls == pulls

    # Nothing cached for this one: the client gets the 429 and the Retry-After.
    refused = _get_manifest(pool_relay, "someuser/tool", "1.0")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == str(limits.retry_after)
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert httpx.get(f"{pool_relay.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_a_refused_relay_token_is_refreshed_once_and_the_pull_succeeds(
    pool_relay: RelayProcess, pool_hub: Hub
) -> None:
    image = pool_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    assert _get_manifest(pool_relay, "library/alpine", "latest").status_code == 200
    pool_hub.tokens.clear()
    # The relay's kept token is revoked upstream: the next request with it gets 401.
    pool_hub.front.reject_tokens = 1
    response = _get_manifest(pool_relay, "library/alpine", "latest")
    assert response.status_code == 200, response.text
    assert response.content == image.manifest_bytes
    assert pool_hub.front.rejected == 1
    operator_requests = [
        r for r in pool_hub.tokens.requests() if "authorization" in {k.lower() for k in r.headers}
    ]
    assert len(operator_requests) == 1  # the one fresh token
