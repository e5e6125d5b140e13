"""Attacks from the upstream side, and from clients that hold upstream resources.

* A redirect target (a CDN) answering 401 with a realm on an internal address must not
  make that address trusted: no redirect may reach it afterwards, and the operator's
  credentials never go there (issue 12, finding 3).
* A `Location` httpx cannot parse is a 502 with an OCI body, never a 500 with a
  traceback (finding 13).
* HTTP/2 streams that never open their window, and HTTP/1.1 clients that stop reading,
  lose their streams after `limits.send_timeout` and cannot take more than
  `limits.upstream_streams_per_ip` upstream-backed streams; meanwhile another client's
  pull runs at its usual speed (finding 4).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

# The "internal" address: loopback, but outside the 127.0.0.1/32 that RelayProcess lets
# redirects reach, so it stands for the relay's own network.
INTERNAL_HOST = "127.0.0.5"
SECRET = b"internal secret: the relay must never fetch this"
OPERATOR = ("operator", "operator-password")
REQUEST_TIMEOUT = 20.0

Reply = tuple[int, list[tuple[str, str]], bytes]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Scripted:
    """An HTTP/1.1 server whose answers a function decides; it records every request."""

    host: str
    answer: Callable[[str, str, dict[str, str]], Reply]
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        owner = self
        lock = threading.Lock()

        class Handler(BaseHandler):
            def _any(self) -> None:
                headers = self.headers_dict()
                with lock:
                    owner.seen.append(Seen(self.command, self.path, headers))
                status, extra, body = owner.answer(self.command, self.path, headers)
                self.send_response(status)
                for name, value in extra:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _any

        self.server = QuietThreadingHTTPServer((self.host, 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = serve_in_thread(self.server, f"scripted-{self.host}")

    def close(self) -> None:
        stop_server(self.server, self.thread)


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(host: str, answer: Callable[[str, str, dict[str, str]], Reply]) -> Scripted:
        server = Scripted(host, answer)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def bearer_challenge(realm: str) -> tuple[str, str]:
    return ("Www-Authenticate", f'Bearer realm="{realm}",service="fake.test"')


def digest(n: int) -> str:
    return "sha256:" + f"{n:x}".rjust(64, "0")


def relay_for(tmp_path: Path, registry_url: str, *extra: str, env: dict[str, str] | None = None,
              credentials: bool = False) -> RelayProcess:  # fmt: skip
    lines = ['[registries."docker.io"]', f'url = "{registry_url}"']
    if credentials:
        lines += [f'username = "{OPERATOR[0]}"', f'password = "{OPERATOR[1]}"']
    config = tmp_path / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    return RelayProcess(tmp_path / "relay", "--config", str(config), *extra, env=env)


def fetch(url: str) -> tuple[int, bytes]:
    """GET `url`: the status and what body arrived (a relay that aborts mid-body cuts it)."""
    body = b""
    with httpx.stream("GET", url, timeout=REQUEST_TIMEOUT) as response:
        try:
            for chunk in response.iter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            pass
    return response.status_code, body


def assert_oci_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["errors"][0]["code"]


# --- finding 3: realm poisoning --------------------------------------------------------------


def test_a_cdn_challenge_neither_trusts_its_realm_nor_redirects_there(
    scripted: Callable[..., Scripted], tmp_path: Path
) -> None:
    """The registry redirects a blob to a CDN that answers 401 with a realm on an internal
    address; then the registry redirects another blob straight to that address. Before the
    fix, the first answer made the address trusted for good: the relay followed the second
    redirect (serving the internal content) and sent the operator's credentials there
    when a client asked the relay's /token."""
    internal = scripted(INTERNAL_HOST, lambda m, p, h: (200, [], SECRET))
    poisoned_realm = f"{internal.url}/token"
    cdn = scripted("127.0.0.1", lambda m, p, h: (401, [bearer_challenge(poisoned_realm)], b""))
    registry_url = ""

    def registry_answer(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/v2/":
            return 401, [bearer_challenge(f"{registry_url}/token")], b"{}"
        if path.startswith("/token"):
            return 200, [("Content-Type", "application/json")], b'{"token": "registry-token"}'
        if path.endswith(f"/blobs/{digest(1)}"):
            return 307, [("Location", f"{cdn.url}/blob")], b""
        if path.endswith(f"/blobs/{digest(2)}"):
            return 307, [("Location", f"{internal.url}/blob")], b""
        return 404, [], b""

    registry = scripted("127.0.0.1", registry_answer)
    registry_url = registry.url
    with relay_for(tmp_path, registry.url, credentials=True) as relay:
        token_query = {"service": "fake.test", "scope": "repository:library/app:pull"}
        first = httpx.get(f"{relay.url}/token", params=token_query, timeout=REQUEST_TIMEOUT)
        assert first.status_code == 200, first.text
        # The poison: the CDN's 401 with the internal realm reaches the relay.
        poisoned = httpx.get(f"{relay.url}/v2/app/blobs/{digest(1)}", timeout=REQUEST_TIMEOUT)
        assert poisoned.status_code == 401
        assert any(s.path == "/blob" for s in cdn.seen)
        # Afterwards: a redirect to the internal address, and a token request.
        redirected = fetch(f"{relay.url}/v2/app/blobs/{digest(2)}")
        again = httpx.get(f"{relay.url}/token", params=token_query, timeout=REQUEST_TIMEOUT)
        log = relay.log_text()
    assert [s.path for s in internal.seen] == [], "the relay contacted the internal address"
    assert redirected[0] == 403, redirected
    assert SECRET[:16] not in redirected[1]
    assert json.loads(redirected[1])["errors"][0]["code"] == "DENIED"
    assert again.status_code == 200, again.text
    tokens = [s for s in registry.seen if s.path.startswith("/token")]
    assert len(tokens) == 2, "both token requests went to the registry's own realm"
    assert "Traceback" not in log


# --- finding 13: a Location httpx cannot parse -------------------------------------------------

UNPARSABLE_LOCATIONS = (
    "http://[::1]\\evil/",  # httpx: invalid port
    "http://127.0.0.1:1\\evil",  # the reported one
    "http://xn--/blob",  # an IDNA label httpx's idna refuses (UnicodeError)
    "/blob\x7f",  # a control character (h11 refuses the header)
)


def test_an_unparsable_location_is_a_502_with_an_oci_body(
    scripted: Callable[..., Scripted], tmp_path: Path
) -> None:
    """Before the fix, `http://[::1]\\evil/` raised httpx.InvalidURL out of the relay's
    upstream code: a 500 and a traceback in the log."""

    def registry_answer(method: str, path: str, headers: dict[str, str]) -> Reply:
        if path == "/v2/":
            return 200, [], b"{}"
        for n, location in enumerate(UNPARSABLE_LOCATIONS):
            if path.endswith(f"/blobs/{digest(n + 1)}"):
                return 307, [("Location", location)], b""
        return 404, [], b""

    registry = scripted("127.0.0.1", registry_answer)
    with relay_for(tmp_path, registry.url) as relay:
        answers = [
            httpx.get(f"{relay.url}/v2/app/blobs/{digest(n + 1)}", timeout=REQUEST_TIMEOUT)
            for n in range(len(UNPARSABLE_LOCATIONS))
        ]
        alive = httpx.get(f"{relay.url}/healthz", timeout=REQUEST_TIMEOUT)
        log = relay.log_text()
    statuses = [
        (location, a.status_code) for location, a in zip(UNPARSABLE_LOCATIONS, answers, strict=True)
    ]
    assert statuses == [(location, 502) for location in UNPARSABLE_LOCATIONS]
    for answer in answers:
        assert_oci_error(answer, 502)
    assert alive.status_code == 200
    assert "Traceback" not in log, log[-3000:]
    assert "bug while serving" not in log
