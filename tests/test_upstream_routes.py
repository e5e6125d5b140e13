"""Routes out (a registry's proxy and address family) and the retry after a stale pooled
connection: the settings, their errors, and the upstream client's behaviour."""

from __future__ import annotations

import json
import socket
import textwrap
from typing import TYPE_CHECKING

import httpcore
import httpx
import pytest

from vpsrelay import config
from vpsrelay.cli import shown_settings
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import ConfigError, UpstreamProtocolError
from vpsrelay.upstream import Upstream, routes

if TYPE_CHECKING:
    from pathlib import Path

PASSWORD = "pr0xy-s3cret-value"


def load(tmp_path: Path, table: str) -> config.Settings:
    path = tmp_path / "relay.toml"
    path.write_text('[registries."docker.io"]\n' + textwrap.dedent(table), encoding="utf-8")
    return config.load(path, {})


# --- settings


@pytest.mark.parametrize(
    ("value", "url", "user"),
    [
        (f"socks5://relay:{PASSWORD}@127.0.0.1:1080", "socks5://127.0.0.1:1080", "relay"),
        ("socks5h://[::1]:1080/", "socks5h://[::1]:1080", None),
        ("http://proxy.example:3128", "http://proxy.example:3128", None),
        ("https://u%40corp:p%3Aw@proxy.example:443", "https://proxy.example:443", "u@corp"),
    ],
)
def test_a_proxy_url_is_parsed_and_its_credentials_are_secret(tmp_path, value, url, user):
    registry = load(tmp_path, f'proxy = "{value}"\n').registry("docker.io")
    assert registry.proxy is not None
    assert registry.proxy.url == url
    if user is None:
        assert registry.proxy.username is None
        assert registry.proxy.password is None
    else:
        assert registry.proxy.username is not None
        assert registry.proxy.password is not None
        assert registry.proxy.username.reveal() == user
    shown = json.dumps(shown_settings(config.load(tmp_path / "relay.toml", {})))
    assert PASSWORD not in shown
    assert "relay:" not in shown
    assert url in shown
    assert PASSWORD not in repr(registry)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (f'proxy = "ftp://relay:{PASSWORD}@h:1"\n',
         "registries.docker.io.proxy: expected a http, https, socks5, socks5h URL"),
        (f'proxy = "socks5://relay:{PASSWORD}@h"\n',
         "registries.docker.io.proxy: expected scheme://host:port, with the port"),
        (f'proxy = "socks5://relay:{PASSWORD}@h:1/path"\n',
         "registries.docker.io.proxy: a proxy URL has no path, query or fragment"),
        (f'proxy = "socks5://:{PASSWORD}@h:1"\n',
         "registries.docker.io.proxy: a proxy password needs a user name"),
        (f'proxy = "socks5://relay:{PASSWORD}@h:99999"\n',
         "registries.docker.io.proxy: not a URL the relay can use"),
        ("proxy = 1080\n", "registries.docker.io.proxy: expected a proxy URL string"),
        ('address_family = "inet6"\n',
         "registries.docker.io.address_family: expected one of ipv4, ipv6, both, got 'inet6'"),
        ('adress_family = "ipv4"\n',
         "registries.docker.io.adress_family: unknown key (did you mean 'address_family'?)"),
    ],
)  # fmt: skip
def test_bad_routes_are_one_line_errors_that_never_show_the_password(tmp_path, table, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, table)
    text = str(info.value)
    assert text.startswith(f"{tmp_path / 'relay.toml'}: {message}")
    assert "\n" not in text
    assert PASSWORD not in text


def test_an_empty_proxy_is_none_and_families_are_kept(tmp_path):
    registry = load(tmp_path, 'proxy = ""\naddress_family = "ipv6"\n').registry("docker.io")
    assert registry.proxy is None
    assert registry.address_family == "ipv6"


@pytest.mark.parametrize(
    ("family", "prefer_ipv4", "chosen"),
    [
        (None, False, None),
        (None, True, "ipv4"),
        ("both", True, None),
        ("ipv6", True, "ipv6"),
        ("ipv4", False, "ipv4"),
    ],
)
def test_a_registry_family_wins_over_prefer_ipv4(family, prefer_ipv4, chosen):
    registry = config.RegistryConfig(name="r", url="https://r.example", address_family=family)
    assert routes.family_of(registry, prefer_ipv4) == chosen


# --- the address family backend, on real loopback sockets


class _Recording(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None,  # noqa: ASYNC109
                          socket_options=None):  # fmt: skip
        self.hosts.append(host)
        raise httpcore.ConnectError("recorded")


async def test_family_backend_keeps_to_its_family():
    for family, literal, allowed in (("ipv4", "::1", "127.0.0.1"), ("ipv6", "127.0.0.1", "::1")):
        inner = _Recording()
        backend = routes.FamilyBackend(family, inner)
        with pytest.raises(httpcore.ConnectError, match="has no IPv"):
            await backend.connect_tcp(literal, 80)
        assert inner.hosts == []  # refused before any connect
        with pytest.raises(httpcore.ConnectError, match="recorded"):
            await backend.connect_tcp(allowed, 80)
        assert inner.hosts == [allowed]
    assert routes.FAMILIES == {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


# --- a stale pooled connection: one retry, GET and HEAD only


def _upstream(handler) -> Upstream:
    settings = config.load(None, {}, upstreams={"docker.io": "http://registry.test"})
    return Upstream(settings, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_stale_connection_is_retried_once_for_get_and_head(method):
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, content=b"ok")

    upstream = _upstream(handler)
    request = UpstreamRequest(method, "http://registry.test/v2/x/manifests/latest", ())
    async with upstream.open(request, what="docker.io", registry="docker.io") as response:
        assert response.status_code == 200
    assert calls == [method, method]
    assert upstream.stale_retries == 1
    await upstream.aclose()


async def test_a_connection_that_always_breaks_is_retried_once_only():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    upstream = _upstream(handler)
    request = UpstreamRequest("GET", "http://registry.test/v2/x/manifests/latest", ())
    with pytest.raises(UpstreamProtocolError):
        async with upstream.open(request, what="docker.io", registry="docker.io"):
            pass
    assert calls == ["GET", "GET"]
    await upstream.aclose()


async def test_a_post_is_never_retried():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    upstream = _upstream(handler)
    request = UpstreamRequest("POST", "http://registry.test/token", ())
    with pytest.raises(UpstreamProtocolError):
        async with upstream.open(request, what="docker.io", content=b"grant_type=x"):
            pass
    assert calls == ["POST"]
    await upstream.aclose()


async def test_a_redirect_hop_is_retried_too():
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if request.url.host == "registry.test":
            return httpx.Response(307, headers={"location": "https://cdn.test/blob"})
        if len(calls) == 2:
            raise httpx.ReadError("connection reset by peer")
        return httpx.Response(200, content=b"blob")

    upstream = _upstream(handler)
    request = UpstreamRequest("GET", "http://registry.test/v2/x/blobs/sha256:0", ())
    async with upstream.open(request, what="docker.io", registry="docker.io") as response:
        assert response.status_code == 200
    assert calls == [
        "http://registry.test/v2/x/blobs/sha256:0",
        "https://cdn.test/blob",
        "https://cdn.test/blob",
    ]
    await upstream.aclose()


# --- an HTTP proxy, on a real loopback socket


async def test_an_http_proxy_gets_absolute_requests_with_its_credentials(tmp_path):
    import base64
    import threading

    from tests.infra._http import (
        BaseHandler,
        QuietThreadingHTTPServer,
        serve_in_thread,
        stop_server,
    )

    seen: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    class ForwardProxy(BaseHandler):
        def do_GET(self) -> None:
            with lock:
                seen.append((self.path, self.headers.get("proxy-authorization")))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = QuietThreadingHTTPServer(("127.0.0.1", 0), ForwardProxy)
    thread = serve_in_thread(server, "forward-proxy")
    try:
        port = server.server_address[1]
        settings = load(
            tmp_path,
            f'url = "http://registry.behind-proxy.test"\n'
            f'proxy = "http://relay:{PASSWORD}@127.0.0.1:{port}"\n',
        )
        upstream = Upstream(settings)
        try:
            assert await upstream.challenge(settings.registry("docker.io")) is None
        finally:
            await upstream.aclose()
    finally:
        stop_server(server, thread)
    expected = "Basic " + base64.b64encode(f"relay:{PASSWORD}".encode()).decode()
    assert seen == [("http://registry.behind-proxy.test/v2/", expected)]


# --- socks5:// hands the proxy an address: no kept-alive connection for another name


@pytest.mark.parametrize(("scheme", "connections"), [("socks5", 2), ("socks5h", 1)])
async def test_a_socks5_rewritten_request_keeps_no_connection(tmp_path, scheme, connections):
    """With `socks5://` httpcore would key the pooled connection by the address the relay
    put in the URL, so a connection (and its TLS, named for one host) could carry a request
    for another name on the same address: each rewritten request gets its own."""
    from tests.infra._http import (
        BaseHandler,
        QuietThreadingHTTPServer,
        serve_in_thread,
        stop_server,
    )
    from tests.infra.socks import SocksProxy

    class Registry(BaseHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = QuietThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = serve_in_thread(server, "registry")
    try:
        with SocksProxy(names={"localhost"}) as proxy:
            port = server.server_address[1]
            settings = load(
                tmp_path,
                f'url = "http://localhost:{port}"\n'
                f'proxy = "{proxy.url(scheme)}"\naddress_family = "ipv4"\n',
            )
            upstream = Upstream(settings)
            try:
                for _ in range(2):
                    request = UpstreamRequest("GET", f"http://localhost:{port}/v2/", ())
                    async with upstream.open(request, what="t", registry="docker.io") as answer:
                        assert answer.status_code == 200
                        await answer.aread()
            finally:
                await upstream.aclose()
            assert len(proxy.targets) == connections  # one CONNECT per connection
    finally:
        stop_server(server, thread)


# --- the retry after a stale pooled connection is counted in /metrics


async def test_a_stale_retry_is_counted_in_metrics():
    from vpsrelay.ops.metrics import Metrics

    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, content=b"ok")

    upstream = _upstream(handler)
    metrics = Metrics()
    upstream.on_stale_retry = metrics.upstream_stale_retry
    request = UpstreamRequest("GET", "http://registry.test/v2/x/manifests/latest", ())
    async with upstream.open(request, what="docker.io", registry="docker.io") as response:
        assert response.status_code == 200
    assert b"vpsrelay_upstream_stale_retries_total 1.0" in metrics.render()
    await upstream.aclose()


# --- a proxy that answers garbage is a dead proxy, and /readyz's probe takes the route


async def test_a_garbled_socks_reply_is_upstream_unavailable(tmp_path):
    import functools
    import gc
    import warnings

    import trio

    from vpsrelay.errors import UpstreamUnavailable

    async def garbage(stream: trio.SocketStream) -> None:
        with trio.move_on_after(2):
            await stream.receive_some(4096)
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, garbage, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        settings = load(
            tmp_path, f'url = "http://127.0.0.1:9"\nproxy = "socks5h://127.0.0.1:{port}"\n'
        )
        upstream = Upstream(settings)
        # The proxy connection of a failed handshake is closed (httpcore would leave it
        # to the garbage collector): no unclosed socket is left for a later test to see.
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            with trio.fail_after(10):
                with pytest.raises(UpstreamUnavailable, match="through the relay's proxy"):
                    await upstream.challenge(settings.registry("docker.io"))
                with pytest.raises(UpstreamUnavailable, match="through the relay's proxy"):
                    await upstream.probe("http://127.0.0.1:9/v2/", what="d", registry="docker.io")
            await upstream.aclose()
            gc.collect()
        nursery.cancel_scope.cancel()
