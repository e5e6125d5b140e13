"""The relay's healing of its own upstream credentials, without sockets (the ASGI app in
front, a MockTransport behind): a refused token of its own is fetched again once, a spent
pool account is left for another, a client's own credentials are never retried."""

from __future__ import annotations

import base64
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.cache.harness import FakeRegistry, cached_relay
from tests.cache.test_front import ACCEPT, TAG_PATH
from tests.test_app import HUB, HUB_CHALLENGE, challenge_401, reply
from vpsrelay import config
from vpsrelay.app import RelayApp
from vpsrelay.upstream import Upstream

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

MANIFEST = b'{"schemaVersion":2}'
MANIFEST_PATH = "/v2/library/alpine/manifests/latest"
SCOPE = {"service": "registry.docker.io", "scope": "repository:library/alpine:pull"}
CI_TOKEN = "ci-token-0123456789abcdef"


@dataclass
class Registry:
    """The registry and its token service: tokens name their account (`alice-1`)."""

    manifest: Callable[[str], httpx.Response]  # token -> the manifest answer
    tokens: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)  # the Authorization of each ask

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return challenge_401()
        if request.url.host == "auth.test":
            basic = request.headers.get("authorization", "").removeprefix("Basic ")
            user = base64.b64decode(basic).decode().partition(":")[0] or "anonymous"
            self.tokens.append(user)
            return reply(200, body=f'{{"token": "{user}-{len(self.tokens)}"}}'.encode())
        assert request.url.path == MANIFEST_PATH
        authorization = request.headers.get("authorization", "")
        self.manifests.append(authorization)
        return self.manifest(authorization.removeprefix("Bearer "))


def ok(token: str) -> httpx.Response:
    headers = {"content-type": "application/vnd.oci.image.index.v1+json"}
    return reply(200, headers, MANIFEST)


@contextlib.asynccontextmanager
async def pool_relay(
    tmp_path: Path,
    registry: Callable[[httpx.Request], httpx.Response],
    accounts: tuple[str, ...] = ("alice", "bob"),
    client_auth: bool = False,
    extra: dict[str, object] | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    path = tmp_path / "relay.toml"
    entries = ", ".join(f'{{ username = "{a}", password = "pw-{a}" }}' for a in accounts)
    path.write_text(f'[registries."docker.io"]\ncredentials = [{entries}]\n')
    overrides: dict[str, object] = {"cache.enabled": False, "data_dir": str(tmp_path / "data")}
    if client_auth:
        overrides |= {"auth.enabled": True, "auth.pull_tokens": [CI_TOKEN]}
    overrides |= extra or {}
    settings = config.load(path, {}, overrides, upstreams={"docker.io": HUB})
    upstream = Upstream(settings, transport=httpx.MockTransport(registry))
    transport = httpx.ASGITransport(app=RelayApp(settings, upstream))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as client:
            yield client
    finally:
        await upstream.aclose()


async def pull(client: httpx.AsyncClient) -> httpx.Response:
    placeholder = (await client.get("/token", params=SCOPE)).json()["token"]
    return await client.get(
        "/v2/alpine/manifests/latest", headers={"authorization": f"Bearer {placeholder}"}
    )


async def test_a_refused_own_token_is_fetched_again_once(tmp_path):
    refused = {"alice-1"}  # revoked after it was issued
    registry = Registry(lambda token: challenge_401() if token in refused else ok(token))
    async with pool_relay(tmp_path, registry, ("alice",)) as client:
        response = await pull(client)
    assert response.status_code == 200
    assert response.content == MANIFEST
    assert registry.tokens == ["alice", "alice"]
    assert registry.manifests == ["Bearer alice-1", "Bearer alice-2"]


async def test_a_registry_refusing_every_token_gets_one_refresh(tmp_path):
    registry = Registry(lambda token: challenge_401())
    async with pool_relay(tmp_path, registry, ("alice",)) as client:
        response = await pull(client)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer realm="http://relay.test/')
    assert len(registry.manifests) == 2
    assert len(registry.tokens) == 2


async def test_a_clients_own_token_is_not_retried(tmp_path):
    registry = Registry(lambda token: challenge_401())
    async with pool_relay(tmp_path, registry) as client:
        response = await client.get(
            "/v2/alpine/manifests/latest", headers={"authorization": "Bearer its-own"}
        )
    assert response.status_code == 401
    assert registry.manifests == ["Bearer its-own"]
    assert registry.tokens == []


def spent(token: str) -> httpx.Response:
    if token.startswith("alice"):
        headers = {"retry-after": "120", "ratelimit-remaining": "0;w=21600"}
        return reply(429, headers, b'{"errors":[{"code":"TOOMANYREQUESTS"}]}')
    return ok(token)


async def test_a_spent_account_is_left_for_another_and_rests(tmp_path):
    registry = Registry(spent)
    async with pool_relay(tmp_path, registry) as client:
        first = await pull(client)
        second = await pull(client)
    assert first.status_code == 200
    assert second.status_code == 200
    # alice answered 429 once; the retry and the next pull went to bob.
    accounts = [m.removeprefix("Bearer ").split("-")[0] for m in registry.manifests]
    assert accounts == ["alice", "bob", "bob"]


async def test_every_account_spent_gives_the_client_the_429(tmp_path):
    registry = Registry(spent)
    async with pool_relay(tmp_path, registry, ("alice",)) as client:
        response = await pull(client)
        again = await pull(client)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "120"
    assert again.status_code == 429
    assert len(registry.manifests) == 2  # once per pull: no retry without another account


async def test_a_token_short_of_the_rights_is_not_refreshed(tmp_path):
    def short(token: str) -> httpx.Response:
        insufficient = f'{HUB_CHALLENGE},error="insufficient_scope"'
        return reply(401, {"www-authenticate": insufficient}, b'{"errors":[]}')

    registry = Registry(short)
    async with pool_relay(tmp_path, registry, ("alice",)) as client:
        response = await pull(client)
    assert response.status_code == 401
    assert len(registry.manifests) == 1
    assert registry.tokens == ["alice"]


async def test_the_public_probes_refused_token_is_fetched_again_once(tmp_path):
    """After caching a manifest the relay asks, anonymously, whether the repository is
    public; a refused anonymous token is fetched again once, never in a loop."""
    registry = FakeRegistry(token_realm=True, refused={"Bearer anon-token"})
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(
            TAG_PATH, headers={"authorization": "Bearer user-token", **ACCEPT}
        )
        assert response.status_code == 200
        probes = registry.requests("HEAD", "/manifests/")
        assert [p.headers["authorization"] for p in probes] == ["Bearer anon-token"] * 2
        assert len([q for q in registry.seen if q.url.host == "auth.test"]) == 2
        assert r.store.index.public == {}


async def relay_token_pull(client: httpx.AsyncClient) -> httpx.Response:
    """A pull by a client of a relay with client authentication (a CI pull token)."""
    answer = await client.get(
        "/token", params={**SCOPE, "service": "vpsrelay"}, auth=("ci", CI_TOKEN)
    )
    token = answer.json()["token"]
    return await client.get(
        "/v2/alpine/manifests/latest", headers={"authorization": f"Bearer {token}"}
    )


async def test_client_auth_a_spent_bearer_account_is_left_for_another(tmp_path):
    registry = Registry(spent)
    async with pool_relay(tmp_path, registry, client_auth=True) as client:
        first = await relay_token_pull(client)
        second = await relay_token_pull(client)
    assert (first.status_code, second.status_code) == (200, 200)
    accounts = [m.removeprefix("Bearer ").split("-")[0] for m in registry.manifests]
    assert accounts == ["alice", "bob", "bob"]


async def test_client_auth_a_spent_basic_account_is_left_for_another(tmp_path):
    """A registry that asks for Basic credentials: the pool still applies, and when
    every account is spent the client gets the registry's 429, not a 502."""
    seen: list[str] = []

    def basic_registry(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return reply(401, {"www-authenticate": 'Basic realm="hub"'})
        pair = request.headers.get("authorization", "").removeprefix("Basic ")
        user = base64.b64decode(pair).decode().partition(":")[0]
        seen.append(user)
        return spent(user)

    async with pool_relay(tmp_path, basic_registry, client_auth=True) as client:
        first = await relay_token_pull(client)
        second = await relay_token_pull(client)
    assert (first.status_code, second.status_code) == (200, 200)
    assert seen == ["alice", "bob", "bob"]
    seen.clear()
    async with pool_relay(tmp_path, basic_registry, ("alice",), client_auth=True) as client:
        refused = await relay_token_pull(client)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "120"
    assert seen == ["alice"]


class Broken(httpx.AsyncByteStream):
    """A blob body that breaks off after `keep` bytes, as a reset connection."""

    def __init__(self, data: bytes, keep: int) -> None:
        self.data, self.keep = data, keep

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.keep]
        raise httpx.RemoteProtocolError("peer closed connection")


BLOB = bytes(range(256)) * 64
BLOB_PATH = "/v2/library/alpine/blobs/sha256:" + "a" * 64


def resume_registry(
    ranged: Callable[[str], httpx.Response],
) -> tuple[Callable[[httpx.Request], httpx.Response], list[str], list[str]]:
    """The registry serves the blob itself; its first answer breaks off at half, and each
    resume (a ranged GET) gets `ranged(token)`."""
    tokens: list[str] = []
    resumes: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return challenge_401()
        if request.url.host == "auth.test":
            pair = request.headers.get("authorization", "").removeprefix("Basic ")
            tokens.append(base64.b64decode(pair).decode().partition(":")[0] or "anonymous")
            return reply(200, body=f'{{"token": "{tokens[-1]}-{len(tokens)}"}}'.encode())
        assert request.url.path == BLOB_PATH
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if "range" in request.headers:
            resumes.append(token)
            return ranged(token)
        headers = {"content-length": str(len(BLOB)), "accept-ranges": "bytes", "etag": '"e"'}
        return httpx.Response(200, headers=headers, stream=Broken(BLOB, len(BLOB) // 2))

    return handle, tokens, resumes


QUICK_RESUMES: dict[str, object] = {"upstream.resume_attempts": 3, "upstream.resume_backoff": 0.01}


async def pull_broken_blob(client: httpx.AsyncClient) -> None:
    """GET the blob; the relay breaks its answer off (the resumes fail), which httpx's
    ASGI transport reports as an AssertionError (`response_complete`)."""
    placeholder = (await client.get("/token", params=SCOPE)).json()["token"]
    with pytest.raises(AssertionError):
        await client.get(
            BLOB_PATH.replace("library/", ""), headers={"authorization": f"Bearer {placeholder}"}
        )


async def test_a_registry_429_to_a_resume_rests_the_account(tmp_path):
    def spent_resume(token: str) -> httpx.Response:
        return reply(429, {"retry-after": "120"}, b"{}")

    handle, _, resumes = resume_registry(spent_resume)
    async with pool_relay(tmp_path, handle, ("alice",), extra=QUICK_RESUMES) as client:
        await pull_broken_blob(client)
        metrics = (await client.get("/metrics")).text
    assert resumes  # the body broke off and was resumed at the registry
    rests = [
        line
        for line in metrics.splitlines()
        if line.startswith("vpsrelay_upstream_credential_rest_until_timestamp_seconds{")
        and 'credential="alice"' in line
    ]
    assert rests, metrics
    assert float(rests[0].rsplit(" ", 1)[1]) > 0


async def test_a_resume_refused_for_insufficient_scope_fetches_no_new_tokens(tmp_path):
    def short(token: str) -> httpx.Response:
        insufficient = f'{HUB_CHALLENGE},error="insufficient_scope"'
        return reply(401, {"www-authenticate": insufficient}, b"{}")

    handle, tokens, resumes = resume_registry(short)
    async with pool_relay(tmp_path, handle, ("alice",), extra=QUICK_RESUMES) as client:
        await pull_broken_blob(client)
    assert len(resumes) >= 2  # the resumes were attempted ...
    assert tokens == ["alice"]  # ... with the token it had: a new one has the same rights
