"""Issue 16, part C, end to end: routes out (a registry reached only through a SOCKS5
proxy; IPv4-only and IPv6-only registries), an upstream that drops kept-alive connections
as they are reused, against real `vpsrelay serve` processes and real skopeo pulls."""

from __future__ import annotations

import json
import socket
import threading
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.clients import DeadPort
from tests.infra.front import HubFront
from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess
from tests.infra.socks import SocksProxy
from tests.integration.test_registries import assert_pulled, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
# A name only the proxy knows: the relay cannot resolve it, so it reaches the registry
# through the proxy or not at all.
PROXY_ONLY_NAME = "hub.behind-proxy.test"
PASS_THROUGH = {"VPSRELAY_CACHE__ENABLED": "false"}


def relay_with(tmp_path: Path, lines: list[str], *, env: dict[str, str] | None = None,
               prefix: tuple[str, ...] = ()) -> RelayProcess:  # fmt: skip
    config = tmp_path / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    return RelayProcess(tmp_path / "relay", "--config", str(config), env=env, prefix=prefix)


def alpine(hub: Hub) -> BuiltImage:
    image = hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    return image


# --- a registry reached only through a SOCKS5 proxy ----------------------------------------


@pytest.mark.parametrize(
    ("scheme", "host", "cache"),
    [
        # socks5h: the proxy resolves; the relay could not (a name only the proxy knows).
        ("socks5h", PROXY_ONLY_NAME, False),
        # socks5: the relay resolves (over IPv4 here) and hands the proxy addresses only.
        ("socks5", "localhost", True),
    ],
)
def test_a_registry_behind_a_socks5_proxy_pulls_byte_exact(
    hub: Hub, tmp_path: Path, scheme: str, host: str, cache: bool
) -> None:
    front_port = int(hub.registry_url.rsplit(":", 1)[1])
    with SocksProxy(username="relay", password="proxy-pass-1", names={PROXY_ONLY_NAME}) as proxy:
        lines = [
            '[registries."docker.io"]',
            f'url = "http://{host}:{front_port}"',
            f'proxy = "{proxy.url(scheme)}"',
            'address_family = "ipv4"',
        ]
        with relay_with(tmp_path, lines, env=None if cache else PASS_THROUGH) as relay:
            hub.clear()
            skopeo_copy(tmp_path, f"{relay.url.removeprefix('http://')}/alpine:latest")
            assert_pulled(tmp_path, alpine(hub))
        # The registry, its token service and the CDN it redirected to: all through the proxy.
        asked = {port for _, port in proxy.targets}
        assert (host if scheme == "socks5h" else "127.0.0.1", front_port) in proxy.targets
        assert int(hub.token_url.split(":")[2].split("/")[0]) in asked
        assert int(hub.cdn_url.rsplit(":", 1)[1]) in asked
        assert proxy.auth_failures == 0
        if scheme == "socks5":
            assert {name for name, _ in proxy.targets} == {"127.0.0.1"}


def test_readyz_probes_a_registry_through_its_proxy(hub: Hub, tmp_path: Path) -> None:
    """A fresh relay asks each registry's `/v2/` for /readyz: over the registry's route, so
    a registry only its proxy reaches is ready, and the VPS never talks to it directly."""
    front_port = int(hub.registry_url.rsplit(":", 1)[1])
    with SocksProxy(names={PROXY_ONLY_NAME}) as proxy:
        lines = [
            '[registries."docker.io"]',
            f'url = "http://{PROXY_ONLY_NAME}:{front_port}"',
            f'proxy = "{proxy.url("socks5h")}"',
        ]
        with relay_with(tmp_path, lines, env=PASS_THROUGH) as relay:
            response = httpx.get(f"{relay.url}/readyz", timeout=30)
            assert response.status_code == 200, response.text
            assert response.json()["checks"]["upstream"] == "ok"
        assert (PROXY_ONLY_NAME, front_port) in proxy.targets


def test_with_its_proxy_down_a_registry_answers_a_clear_502(hub: Hub, tmp_path: Path) -> None:
    front_port = int(hub.registry_url.rsplit(":", 1)[1])
    with DeadPort() as dead:
        lines = [
            '[registries."docker.io"]',
            f'url = "http://{PROXY_ONLY_NAME}:{front_port}"',
            f'proxy = "socks5h://{dead.address}"',
        ]
        with relay_with(tmp_path, lines, env=PASS_THROUGH) as relay:
            for path in ("/v2/", "/v2/library/alpine/manifests/latest", "/token?scope=x"):
                response = httpx.get(f"{relay.url}{path}", timeout=30)
                assert response.status_code == 502, (path, response.text)
                error = response.json()["errors"][0]
                assert error["code"] == "UNAVAILABLE"
                assert "proxy" in error["message"]
            assert httpx.get(f"{relay.url}/healthz").status_code == 200
            assert "unreachable through the proxy socks5h://" in relay.log_text()


# --- stale pooled connections ---------------------------------------------------------------


@pytest.fixture
def dropping_front(hub: Hub) -> Iterator[HubFront]:
    """The hub behind a front that closes each kept-alive connection as it is reused, for
    the registry and (relative redirects through the front) for the CDN hops alike."""
    front = HubFront(hub.hub_registry.port, cdn_url=hub.cdn_url)
    front.one_response_per_connection = True
    yield front
    front.close()


@pytest.mark.parametrize("cache", [False, True])
def test_an_upstream_dropping_kept_alive_connections_causes_no_502(
    hub: Hub, dropping_front: HubFront, tmp_path: Path, cache: bool
) -> None:
    lines = ['[registries."docker.io"]', f'url = "{dropping_front.url}"']
    with relay_with(tmp_path, lines, env=None if cache else PASS_THROUGH) as relay:
        host = relay.url.removeprefix("http://")
        for ref, image in (("alpine:latest", alpine(hub)), ("alpine:latest", alpine(hub))):
            skopeo_copy(tmp_path, f"{host}/{ref}")
            assert_pulled(tmp_path, image)
        for _ in range(3):  # a client of its own: every request reuses the relay's pool
            token = httpx.get(
                f"{relay.url}/token", params={"scope": "repository:library/alpine:pull"}
            ).json()["token"]
            response = httpx.get(
                f"{relay.url}/v2/library/alpine/manifests/latest",
                headers={
                    "authorization": f"Bearer {token}",
                    "accept": "application/vnd.oci.image.manifest.v1+json",
                },
            )
            assert response.status_code == 200
        log = relay.log_text()
    assert dropping_front.dropped >= 2, "the front never dropped a reused connection"
    assert "status=200" in log
    assert "status=502" not in log
    assert "once more on a fresh connection" in log


# --- address family -----------------------------------------------------------------------

DUAL_NAME = "dual.relay-upstream.test"


class DualStackServer(QuietThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


@pytest.fixture
def dual_registry() -> Iterator[tuple[str, list[str]]]:
    """An anonymous registry on [::] (IPv4 and IPv6), recording each peer's address."""
    peers: list[str] = []
    lock = threading.Lock()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "x", "layers": []}).encode()

    class Registry(BaseHandler):
        def do_GET(self) -> None:
            with lock:
                peers.append(self.client_address[0])
            body = b"{}" if self.path == "/v2/" else manifest
            self.send_response(200 if self.path.startswith("/v2/") else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = DualStackServer(("::", 0), Registry)
    thread = serve_in_thread(server, "dual-registry")
    try:
        yield f"http://{DUAL_NAME}:{server.server_address[1]}", peers
    finally:
        stop_server(server, thread)


def hosts_namespace(tmp_path: Path) -> tuple[str, ...]:
    """A prefix that runs the relay with its own /etc/hosts naming DUAL_NAME twice."""
    unshare = require_binary("unshare")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {DUAL_NAME}\n::1 {DUAL_NAME}\n")
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return (unshare, "--mount", "--propagation", "private", "sh", "-c", script, str(hosts))


@pytest.mark.parametrize(("family", "seen"), [("ipv4", "::ffff:127.0.0.1"), ("ipv6", "::1")])
def test_an_address_family_setting_is_honoured(
    dual_registry: tuple[str, list[str]], tmp_path: Path, family: str, seen: str
) -> None:
    url, peers = dual_registry
    lines = ['[registries."docker.io"]', f'url = "{url}"', f'address_family = "{family}"']
    with relay_with(tmp_path, lines, env=PASS_THROUGH, prefix=hosts_namespace(tmp_path)) as relay:
        for _ in range(3):
            response = httpx.get(f"{relay.url}/v2/library/x/manifests/latest", timeout=30)
            assert response.status_code == 200, response.text
    assert peers, "the registry was never asked"
    assert set(peers) == {seen}
