"""The token client without sockets: what it keeps, for whom, and how it fails.

`httpx.MockTransport` stands in for the token service here, for the keeping logic
only; the real token server is exercised in tests/integration and tests/security.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from vpsrelay import config
from vpsrelay.core.auth import parse_challenge
from vpsrelay.errors import TokenRefused, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from vpsrelay.upstream import Upstream, tokens as tokens_module
from vpsrelay.upstream.tokens import TokenClient, fetch_token_blocking

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

REALM = "http://auth.test/token?account=relay"
OPERATOR = ("operator", "s3cret")


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the token service must not be asked: {request.url}")


class Service:
    """Answers token requests, numbering the tokens, and remembers what it was asked."""

    def __init__(self, status: int = 200, expires_in: int = 300) -> None:
        self.status = status
        self.expires_in = expires_in
        self.asked: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request)
        if self.status != 200:
            return httpx.Response(self.status, json={"errors": [{"message": "no"}]})
        token = f"t{len(self.asked)}"
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})


@pytest.fixture
def make_client(
    tmp_path: Path,
) -> Iterator[Callable[..., tuple[TokenClient, config.RegistryConfig]]]:
    opened: list[Upstream] = []

    def make(
        handler: Callable[[httpx.Request], httpx.Response],
        *,
        realm: str = REALM,
        operator: bool = False,
    ) -> tuple[TokenClient, config.RegistryConfig]:
        path = tmp_path / "relay.toml"
        path.write_text(
            f'[registries."docker.io"]\nusername = "{OPERATOR[0]}"\npassword = "{OPERATOR[1]}"\n'
            if operator
            else ""
        )
        settings = config.load(
            path,
            {},
            {"data_dir": str(tmp_path / "data")},
            upstreams={"docker.io": "http://hub.test"},
        )
        upstream = Upstream(settings, transport=httpx.MockTransport(handler))
        opened.append(upstream)
        upstream.remember_challenge(
            "docker.io", parse_challenge(f'Bearer realm="{realm}",service="hub"')
        )
        return TokenClient(upstream), settings.registries[0]

    yield make
    for upstream in opened:
        trio.run(upstream.aclose)


async def test_a_token_is_fetched_once_and_kept_until_its_expiry_margin(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = Service(expires_in=60)
    client, registry = make_client(service)
    assert await client.pull_token(registry, ["library/a"], operator=False) == "t1"
    assert await client.pull_token(registry, ["library/a"], operator=False) == "t1"
    assert len(service.asked) == 1
    await trio.sleep(60 - tokens_module.TOKEN_MARGIN + 1)
    assert await client.pull_token(registry, ["library/a"], operator=False) == "t2"


async def test_the_realms_own_query_and_the_scopes_reach_the_token_service(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    service = Service()
    client, registry = make_client(service)
    await client.pull_token(registry, ["library/b", "library/a"], operator=False)
    (asked,) = service.asked
    assert asked.url.path == "/token"
    assert asked.url.params.multi_items() == [
        ("account", "relay"),
        ("service", "hub"),
        ("scope", "repository:library/a:pull"),
        ("scope", "repository:library/b:pull"),
    ]


async def test_anonymous_and_operator_tokens_are_kept_apart(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    service = Service()
    client, registry = make_client(service, operator=True)
    assert await client.pull_token(registry, ["library/a"], operator=True) == "t1"
    assert await client.pull_token(registry, ["library/a"], operator=False) == "t2"
    assert await client.pull_token(registry, ["library/a"], operator=True) == "t1"
    expected = "Basic " + base64.b64encode(":".join(OPERATOR).encode()).decode()
    assert service.asked[0].headers["authorization"] == expected
    assert "authorization" not in service.asked[1].headers


async def test_operator_without_configured_credentials_asks_anonymously(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    service = Service()
    client, registry = make_client(service)
    assert await client.pull_token(registry, ["library/a"], operator=True) == "t1"
    assert await client.pull_token(registry, ["library/a"], operator=False) == "t1"
    assert "authorization" not in service.asked[0].headers


async def test_forget_drops_the_token_for_every_credential(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    service = Service()
    client, registry = make_client(service, operator=True)
    await client.pull_token(registry, ["library/a"], operator=True)
    await client.pull_token(registry, ["library/a"], operator=False)
    await client.pull_token(registry, ["library/b"], operator=True)
    client.forget("docker.io", ["library/a"])
    assert len(client) == 1
    assert await client.pull_token(registry, ["library/a"], operator=True) == "t4"


async def test_the_kept_tokens_are_a_bounded_lru(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past the bound, the least recently used token goes, expired or not."""
    monkeypatch.setattr(tokens_module, "MAX_TOKENS", 3)
    service = Service()
    client, registry = make_client(service)
    for name in ("a", "b", "c", "a", "d"):  # "a" is used again: "b" is the oldest
        await client.pull_token(registry, [name], operator=False)
    assert [key[1] for key in client._tokens] == ["c", "a", "d"]
    await client.pull_token(registry, ["a"], operator=False)
    assert len(service.asked) == 4


async def test_no_bearer_challenge_means_no_token(tmp_path: Path) -> None:
    settings = config.load(
        None, {}, {"data_dir": str(tmp_path / "d")}, upstreams={"docker.io": "http://hub.test"}
    )
    upstream = Upstream(settings, transport=httpx.MockTransport(never))
    try:
        upstream.remember_challenge("docker.io", None)
        client = TokenClient(upstream)
        assert await client.pull_token(settings.registries[0], ["x"], operator=True) is None
    finally:
        await upstream.aclose()


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refusal_is_token_refused_and_not_kept(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]], status: int
) -> None:
    service = Service(status=status)
    client, registry = make_client(service)
    with pytest.raises(TokenRefused) as refused:
        await client.pull_token(registry, ["library/a"], operator=False)
    assert refused.value.status == 502
    assert len(client) == 0


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_other_failures_are_not_a_refusal(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]], status: int
) -> None:
    client, registry = make_client(Service(status=status))
    with pytest.raises(UpstreamProtocolError) as failed:
        await client.pull_token(registry, ["library/a"], operator=False)
    assert not isinstance(failed.value, TokenRefused)


async def test_an_answer_without_a_token_is_a_502(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    client, registry = make_client(lambda r: httpx.Response(200, json={"token": "a b"}))
    with pytest.raises(UpstreamProtocolError, match="no token"):
        await client.pull_token(registry, ["library/a"], operator=False)


@pytest.mark.parametrize(
    "realm", ["http://[::1/token", "ftp://auth.test/t", "http://127.0.0.1:9/" + "x" * 70000]
)
async def test_a_token_service_url_the_relay_cannot_use_is_a_502(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]], realm: str
) -> None:
    """A URL that cannot be built or parsed is an upstream error, not a bug."""
    client, registry = make_client(never, realm=realm)
    with pytest.raises(UpstreamError) as failed:
        await client.pull_token(registry, ["library/alpine"], operator=False)
    assert failed.value.status == 502


async def test_a_token_service_timeout_mid_body_is_an_upstream_timeout(
    make_client: Callable[..., tuple[TokenClient, config.RegistryConfig]],
) -> None:
    """Issue 13: the token body read is inside the upstream boundary (504, not a bug)."""

    class Stalled(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"token": "upstr'
            raise httpx.ReadTimeout("slow body")

    def token_service(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Stalled())

    client, registry = make_client(token_service)
    with pytest.raises(UpstreamTimeout) as failed:
        await client.pull_token(registry, ["library/alpine"], operator=False)
    assert failed.value.status == 504
    assert failed.value.code == "UNAVAILABLE"


# --- the blocking flavour (check, warm)


def blocking(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_blocking_fetch_keeps_the_realms_query_and_sends_the_credentials() -> None:
    service = Service()
    challenge = parse_challenge(f'Bearer realm="{REALM}",service="hub"')
    with blocking(service) as client:
        token = fetch_token_blocking(client, challenge, ["repository:a:pull"], ("u", "p"))
    assert token == "t1"
    (asked,) = service.asked
    assert asked.url.params.multi_items() == [
        ("account", "relay"),
        ("service", "hub"),
        ("scope", "repository:a:pull"),
    ]
    assert asked.headers["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()


@pytest.mark.parametrize(
    ("realm", "handler", "error", "message"),
    [
        ("not a url", never, UpstreamProtocolError, "not an absolute http"),
        ("http://[::1/token", never, UpstreamProtocolError, "not an absolute http"),
        (REALM, Service(status=401), TokenRefused, "refused \\(401\\): no"),
        (REALM, Service(status=500), UpstreamProtocolError, "answered 500: no"),
    ],
)
def test_blocking_fetch_raises_relay_errors_with_one_line_messages(
    realm: str,
    handler: Callable[[httpx.Request], httpx.Response],
    error: type[UpstreamError],
    message: str,
) -> None:
    challenge = parse_challenge(f'Bearer realm="{realm}"')
    with blocking(handler) as client, pytest.raises(error, match=message) as raised:
        fetch_token_blocking(client, challenge, ["repository:a:pull"])
    assert "\n" not in raised.value.message


def test_blocking_fetch_maps_transport_errors_without_logging(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    challenge = parse_challenge(f'Bearer realm="{REALM}"')
    with blocking(refuse) as client, pytest.raises(UpstreamError, match="unreachable"):
        fetch_token_blocking(client, challenge, [])
    assert caplog.records == []
