"""The token client's side of the operator's credential pool, without sockets: a token per
credential, which credential an `Authorization` stands for, and a spent one resting."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
import trio.lowlevel

from vpsrelay import config
from vpsrelay.core.auth import parse_challenge
from vpsrelay.upstream import Upstream
from vpsrelay.upstream.tokens import TokenClient, basic

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

POOL = (("alice", "pw-a"), ("bob", "pw-b"))


def user_of(request: httpx.Request) -> str:
    encoded = request.headers["authorization"].removeprefix("Basic ")
    return base64.b64decode(encoded).decode().partition(":")[0]


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[TokenClient, config.RegistryConfig]]:
    asked: list[str] = []

    def service(request: httpx.Request) -> httpx.Response:
        asked.append(user_of(request))
        return httpx.Response(200, json={"token": f"{asked[-1]}-{len(asked)}"})

    path = tmp_path / "relay.toml"
    entries = ", ".join(f'{{ username = "{u}", password = "{p}" }}' for u, p in POOL)
    path.write_text(f'[registries."docker.io"]\ncredentials = [{entries}]\n')
    settings = config.load(
        path, {}, {"data_dir": str(tmp_path / "data")}, upstreams={"docker.io": "http://hub.test"}
    )
    upstream = Upstream(settings, transport=httpx.MockTransport(service))
    upstream.remember_challenge(
        "docker.io", parse_challenge('Bearer realm="http://auth.test/token",service="hub"')
    )
    try:
        yield TokenClient(upstream), settings.registry("docker.io")
    finally:
        await upstream.aclose()


async def test_each_credential_earns_and_keeps_its_own_token(pool) -> None:
    client, registry = pool
    first = await client.pull_token(registry, ["library/a"], operator=True)
    second = await client.pull_token(registry, ["library/a"], operator=True)
    assert (first, second) == ("alice-1", "bob-2")  # spread in turn
    assert await client.pull_token(registry, ["library/a"], operator=True, username="alice") == (
        "alice-1"
    )
    assert client.holder(registry, f"Bearer {first}") == "alice"
    assert client.holder(registry, f"Bearer {second}") == "bob"
    assert client.holder(registry, "Bearer someone-elses") is None
    assert client.holder(registry, None) is None
    assert client.holder(registry, basic(registry, "bob")) == "bob"
    assert client.holder(registry, "Basic Zm9vOmJhcg==") is None
    client.forget("docker.io", ["library/a"])
    assert len(client) == 0
    assert client.holder(registry, f"Bearer {first}") is None


async def test_basic_takes_the_named_credential_or_the_first(pool) -> None:
    _, registry = pool
    assert basic(registry) == "Basic " + base64.b64encode(b"alice:pw-a").decode()
    assert basic(registry, "bob") == "Basic " + base64.b64encode(b"bob:pw-b").decode()


async def test_a_429_rests_the_credential_and_the_next_pulls_use_the_other(pool) -> None:
    client, registry = pool
    refused = httpx.Response(429, headers={"retry-after": "60", "ratelimit-limit": "100;w=21600"})
    state = client.credential_answered(registry, "alice", refused)
    assert state is not None
    assert (state.remaining, state.limit, state.refusals) == (0, 100, 1)
    assert client.may_retry_elsewhere(registry, ["alice"])
    assert not client.may_retry_elsewhere(registry, ["alice", "bob"])
    assert {client.choose_credential(registry) for _ in range(4)} == {"bob"}
    await trio.lowlevel.checkpoint()
    spent = httpx.Response(200, headers={"ratelimit-remaining": "0;w=600"})
    client.credential_answered(registry, "bob", spent)
    assert not client.may_retry_elsewhere(registry, [])
    assert client.choose_credential(registry) == "alice"  # back first (60 s < 600 s)
    anonymous = config.Settings().registry("quay.io")
    assert client.credential_answered(anonymous, "x", spent) is None
    assert not client.may_retry_elsewhere(anonymous, [])
