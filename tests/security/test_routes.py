"""Attacks on the routes out (issue 16, part C).

* The operator's proxy credentials (`registries.<name>.proxy = "socks5://user:pass@..."`)
  never show: not in the log (at debug level, where httpcore traces its proxy handshake),
  not in /metrics, /readyz, `vpsrelay check`, `vpsrelay config show`, nor in the 502 a
  client gets when the proxy refuses them.
* A registry that closes every connection before answering gets each GET or HEAD at most
  twice (the first try and one retry on a fresh connection), never a retry storm; every
  client gets an OCI 502 and the relay stays up.
* Through a proxy the relay cannot check where the proxy connects, so a redirect to an
  internal address is refused before the proxy is asked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.socks import SocksProxy
from tests.security.test_upstream import INTERNAL_HOST, Reply, Scripted, assert_oci_error

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

PROXY_USER = "proxy-user-5e1f"
PROXY_PASSWORD = "proxy-pass-9c2d7a"
PASS_THROUGH = {"VPSRELAY_CACHE__ENABLED": "false"}
TIMEOUT = 20.0


def relay_with(tmp_path: Path, lines: list[str], env: dict[str, str]) -> RelayProcess:
    config = tmp_path / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    return RelayProcess(tmp_path / "relay", "--config", str(config), env=env)


def vpsrelay(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")},
    )  # fmt: skip
    return done.stdout + done.stderr


def assert_secret_absent(where: str, text: str) -> None:
    for secret in (PROXY_PASSWORD, PROXY_USER):
        assert secret not in text, f"{secret!r} in {where}"


@pytest.mark.parametrize("password_right", [True, False])
def test_proxy_credentials_never_show(hub: Hub, tmp_path: Path, password_right: bool) -> None:
    with SocksProxy(username=PROXY_USER, password=PROXY_PASSWORD) as proxy:
        password = PROXY_PASSWORD if password_right else PROXY_PASSWORD[::-1]
        url = proxy.url().replace(PROXY_PASSWORD, password)
        lines = ['[registries."docker.io"]', f'url = "{hub.registry_url}"', f'proxy = "{url}"']
        env = {**PASS_THROUGH, "VPSRELAY_LOG__LEVEL": "debug"}
        with relay_with(tmp_path, lines, env) as relay:
            token = httpx.get(
                f"{relay.url}/token",
                params={"scope": "repository:library/alpine:pull"},
                timeout=TIMEOUT,
            )
            headers = {}
            if password_right:
                assert token.status_code == 200, token.text
                headers = {"authorization": f"Bearer {token.json()['token']}"}
            else:
                assert_oci_error(token, 502)
                assert_secret_absent("a /token answer", token.text)
            manifest = httpx.get(
                f"{relay.url}/v2/library/alpine/manifests/latest",
                headers={**headers, "accept": "application/vnd.oci.image.manifest.v1+json"},
                timeout=TIMEOUT,
            )
            if password_right:
                assert manifest.status_code == 200
                layer = manifest.json()["layers"][0]["digest"]
                blob = httpx.get(
                    f"{relay.url}/v2/library/alpine/blobs/{layer}",
                    headers=headers,
                    timeout=TIMEOUT,
                )
                assert blob.status_code == 200  # through the redirect to the CDN
            else:
                assert_oci_error(manifest, 502)
                assert "proxy" in manifest.json()["errors"][0]["message"]
                assert proxy.auth_failures >= 1
            assert_secret_absent("a manifest answer", manifest.text)
            shown = {
                "/metrics": httpx.get(f"{relay.url}/metrics").text,
                "/readyz": httpx.get(f"{relay.url}/readyz").text,
                "/": httpx.get(f"{relay.url}/").text,
                "check": vpsrelay("check", "--url", relay.url, "--json"),
                "config show": vpsrelay("config", "show", "--config", str(tmp_path / "relay.toml")),
            }
            log = relay.log_text()
        assert proxy.targets if password_right else proxy.auth_failures, "the proxy was not used"
    assert "level=debug" in log  # the level where httpcore traces its proxy handshakes
    assert "socks5://127.0.0.1:" in shown["config show"]
    for where, text in {**shown, "the log": log}.items():
        assert_secret_absent(where, text)


# --- a registry that closes every connection -------------------------------------------------


class Closing:
    """Reads each request head and closes the connection without an answer."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="closing", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                head = b""
                try:
                    while b"\r\n\r\n" not in head and len(head) < 65536:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                except OSError:
                    continue
                if head:
                    with self._lock:
                        self.requests.append(head.split(b"\r\n", 1)[0].decode())

    def count(self, needle: str) -> int:
        with self._lock:
            return sum(needle in line for line in self.requests)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def closing() -> Iterator[Closing]:
    server = Closing()
    yield server
    server.close()


def test_a_registry_that_always_closes_is_tried_at_most_twice_a_request(
    closing: Closing, tmp_path: Path
) -> None:
    lines = ['[registries."docker.io"]', f'url = "{closing.url}"']
    rounds = 6
    with relay_with(tmp_path, lines, PASS_THROUGH) as relay:
        for n in range(rounds):
            method = "GET" if n % 2 == 0 else "HEAD"
            response = httpx.request(
                method, f"{relay.url}/v2/library/x/manifests/t{n}", timeout=TIMEOUT
            )
            assert response.status_code == 502
            if method == "GET":
                assert_oci_error(response, 502)
            # Each request: its first try, then one more on a fresh connection; no more.
            assert closing.count(f"/v2/library/x/manifests/t{n} ") == 2
        assert httpx.get(f"{relay.url}/healthz").status_code == 200
        assert relay.process.poll() is None


# --- redirects through a proxy ------------------------------------------------------------


Answer = Callable[[str, str, dict[str, str]], Reply]


@pytest.fixture
def scripted() -> Iterator[Callable[[str, Answer], Scripted]]:
    started: list[Scripted] = []

    def start(host: str, answer: Answer) -> Scripted:
        started.append(Scripted(host, answer))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_through_a_proxy_a_redirect_to_an_internal_address_is_refused_before_the_proxy(
    scripted: Callable[[str, Answer], Scripted], tmp_path: Path, scheme: str
) -> None:
    internal = scripted(INTERNAL_HOST, lambda method, path, headers: (200, [], b"secret"))
    blob = "sha256:" + "0" * 64

    def registry(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path.endswith(f"/blobs/{blob}"):
            return 307, [("Location", f"{internal.url}/blob")], b""
        return 200, [], b"{}"

    upstream = scripted("127.0.0.1", registry)
    with SocksProxy() as proxy:
        lines = [
            '[registries."docker.io"]',
            f'url = "{upstream.url}"',
            f'proxy = "{proxy.url(scheme)}"',
        ]
        with relay_with(tmp_path, lines, PASS_THROUGH) as relay:
            response = httpx.get(f"{relay.url}/v2/library/x/blobs/{blob}", timeout=TIMEOUT)
            assert_oci_error(response, 403)
            assert httpx.get(f"{relay.url}/healthz").status_code == 200
        # The registry was reached through the proxy; the internal address never was.
        assert (INTERNAL_HOST, internal.port) not in proxy.targets
        assert ("127.0.0.1", upstream.port) in proxy.targets
    assert internal.seen == []
    assert json.dumps(response.json()).count("redirect") >= 1


# --- a proxy that answers garbage ---------------------------------------------------------


class Garbage:
    """A 'SOCKS5 proxy' on loopback that answers every handshake with an HTTP error."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_a_proxy_answering_garbage_is_a_502_like_a_dead_one(tmp_path: Path, scheme: str) -> None:
    garbage = Garbage()
    try:
        lines = [
            '[registries."docker.io"]',
            'url = "http://127.0.0.1:9"',  # never reached: every connection is the proxy's
            f'proxy = "{scheme}://127.0.0.1:{garbage.port}"',
        ]
        with relay_with(tmp_path, lines, PASS_THROUGH) as relay:
            for path in ("/v2/", "/v2/library/x/manifests/latest", "/token?scope=x"):
                response = httpx.get(f"{relay.url}{path}", timeout=TIMEOUT)
                assert_oci_error(response, 502)
                error = response.json()["errors"][0]
                assert error["code"] == "UNAVAILABLE", (path, error)
                assert "proxy" in error["message"]
            assert httpx.get(f"{relay.url}/readyz", timeout=TIMEOUT).status_code == 503
            assert httpx.get(f"{relay.url}/healthz").status_code == 200
            assert relay.process.poll() is None
            log = relay.log_text()
            assert "bug while serving" not in log
            assert "unreachable through the proxy" in log
        assert 0 < garbage.connections <= 12  # no retry storm: a try or two per request
    finally:
        garbage.close()
