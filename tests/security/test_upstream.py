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

import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token
from tests.integration.test_registries import assert_pulled

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

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
        # A pull with the placeholder: now the relay fetches its own (operator) token.
        placeholder = {"authorization": f"Bearer {again.json()['token']}"}
        httpx.get(f"{relay.url}/v2/app/manifests/1", headers=placeholder, timeout=REQUEST_TIMEOUT)
        log = relay.log_text()
    assert [s.path for s in internal.seen] == [], "the relay contacted the internal address"
    assert redirected[0] == 403, redirected
    assert SECRET[:16] not in redirected[1]
    assert json.loads(redirected[1])["errors"][0]["code"] == "DENIED"
    assert again.status_code == 200, again.text
    tokens = [s for s in registry.seen if s.path.startswith("/token")]
    # The relay's own (operator) token request, made for the placeholder pull, went to the
    # registry's realm; the clients' /token got placeholders (finding 2) and made no
    # upstream request (follow-up 2), so no operator token reached them either.
    assert len(tokens) == 1, "the operator's token request went to the registry's own realm"
    assert "Traceback" not in log


# --- finding 13: a Location httpx cannot parse -------------------------------------------------

UNPARSABLE_LOCATIONS = (
    "http://[::1]\\evil/",  # httpx: invalid port
    "http://127.0.0.1:1\\evil",  # the reported one
    "http://xn--/blob",  # an IDNA label httpx's idna refuses (UnicodeError)
    "/blob\x7f",  # a control character (h11 refuses the header)
    "http://127.0.0.1\\evil/blob",  # a host no resolver may be asked about
    "http://cdn.test\\@127.0.0.1/blob",  # user information (and a parser differential)
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


# --- finding 4: clients that take nothing hold no upstream connection ----------------------------

MiB = 1024 * 1024
ATTACKER_HOST = "127.0.0.9"  # its own client IP (loopback), so the legitimate puller's is not it
POOL = 48  # upstream.max_connections for these relays, smaller than the default to keep it cheap
ATTACK_STREAMS = 64  # more than the pool
ATTACK_SEND_TIMEOUT = 20.0  # limits.send_timeout: long enough to measure pulls under attack
PULLS = 3  # skopeo pulls per measurement (the median is compared)
PULL_TIMEOUT = 60.0
LATENCY_FACTOR = 3.0


@dataclass
class StreamState:
    status: int | None = None
    reset_after: float | None = None  # seconds after the attack began
    ended: bool = False
    received: int = 0


class ShutWindowAttacker:
    """An h2c client (from ATTACKER_HOST) that opens streams for a big blob and never sends
    a WINDOW_UPDATE; a thread reads the connection (SETTINGS acks only) and records what
    happens to each stream. Bounded: it stops after `limit` seconds."""

    def __init__(self, relay_url: str, path: str, bearer: str, streams: int, limit: float) -> None:
        import h2.config
        import h2.connection

        authority = relay_url.removeprefix("http://")
        host, _, port = authority.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10,
                                             source_address=(ATTACKER_HOST, 0))  # fmt: skip
        self.sock.settimeout(0.5)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.began = time.monotonic()
        self.limit = limit
        self.streams: dict[int, StreamState] = {}
        self.lock = threading.Lock()
        for n in range(streams):
            stream_id = 1 + 2 * n
            self.streams[stream_id] = StreamState()
            self.h2.send_headers(
                stream_id,
                [(":method", "GET"), (":path", path), (":scheme", "http"),
                 (":authority", authority), ("authorization", f"Bearer {bearer}"),
                 ("range", "bytes=0-")],  # a range passes the cache by: an upstream stream
                end_stream=True,
            )  # fmt: skip
        self.sock.sendall(self.h2.data_to_send())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, name="attacker", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        import h2.events

        while not self.stop.is_set() and time.monotonic() - self.began < self.limit:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            now = time.monotonic() - self.began
            with self.lock:
                for event in self.h2.receive_data(data):
                    state = self.streams.get(getattr(event, "stream_id", 0) or 0)
                    if state is None:
                        continue
                    if isinstance(event, h2.events.ResponseReceived):
                        state.status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        state.received += len(event.data)  # never acknowledged
                    elif isinstance(event, h2.events.StreamReset):
                        state.reset_after = now
                    elif isinstance(event, h2.events.StreamEnded):
                        state.ended = True
                pending = self.h2.data_to_send()  # SETTINGS and PING acks, no window
            if pending:
                self.sock.sendall(pending)

    def snapshot(self) -> list[StreamState]:
        with self.lock:
            return [StreamState(**vars(s)) for s in self.streams.values()]

    def wait(self, done: Callable[[list[StreamState]], bool], timeout: float) -> list[StreamState]:
        deadline = time.monotonic() + timeout
        states = self.snapshot()
        while not done(states) and time.monotonic() < deadline:
            time.sleep(0.1)
            states = self.snapshot()
        return states

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def skopeo_pull(tmp_path: Path, host: str, repository: str, image: BuiltImage) -> float:
    """`skopeo copy` of `repository:1` through the relay at `host`; its wall time (it must
    succeed, byte-exact)."""
    source = f"{host}/{repository}:1"
    skopeo = require_binary("skopeo")
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors\n")
    dest = tmp_path / "out"
    shutil.rmtree(dest, ignore_errors=True)
    began = time.monotonic()
    done = subprocess.run(
        [skopeo, "copy", "--src-tls-verify=false", "--preserve-digests",
         f"docker://{source}", f"oci:{dest}:pulled"],
        capture_output=True, text=True, timeout=PULL_TIMEOUT, check=False,
        env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
    )  # fmt: skip
    took = time.monotonic() - began
    assert done.returncode == 0, f"the pull failed after {took:.1f} s: {done.stderr[-2000:]}"
    assert_pulled(tmp_path, image)
    return took


@pytest.fixture(scope="module")
def legit_images(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> list[BuiltImage]:
    """Small images nobody pulled yet: the legitimate puller's (uncached on each relay)."""
    from tests.integration.test_cache import push_unique

    base = tmp_path_factory.mktemp("legit")
    return [push_unique(hub, base, f"someuser/legit{n}", 2 * MiB) for n in range(2 * PULLS)]


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "pass-through"])
def test_shut_windows_cannot_starve_other_clients_of_the_upstream(
    clean_hub: Hub, legit_images: list[BuiltImage], tmp_path: Path, cache: bool
) -> None:
    """A client opens more streams for a 300 MiB layer than the upstream pool holds, and
    never opens its HTTP/2 window. Before the fix each stream held an upstream connection
    for good: every other client's cache miss then waited for the pool and failed (504).
    Now the client holds at most `upstream_streams_per_ip` (the default, 32) upstream
    streams, each until `send_timeout`; another client's pull meanwhile takes no more than
    3x its usual time."""
    big = clean_hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    layer = max(big.layers, key=lambda blob: blob.size)
    env = {
        "VPSRELAY_CACHE__ENABLED": "true" if cache else "false",
        "VPSRELAY_UPSTREAM__MAX_CONNECTIONS": str(POOL),
        "VPSRELAY_LIMITS__SEND_TIMEOUT": str(ATTACK_SEND_TIMEOUT),
    }
    with RelayProcess(tmp_path / "relay", "--upstream", f"docker.io={clean_hub.registry_url}",
                      env=env) as relay:  # fmt: skip
        host = relay.url.removeprefix("http://")
        calm = [
            skopeo_pull(tmp_path, host, f"someuser/legit{n}", legit_images[n]) for n in range(PULLS)
        ]
        bearer = pull_token(relay.url, "library/big")
        attacker = ShutWindowAttacker(
            relay.url, f"/v2/library/big/blobs/{layer.digest}", bearer, ATTACK_STREAMS,
            limit=ATTACK_SEND_TIMEOUT + 60,
        )  # fmt: skip
        try:
            # Every stream answered (a 206 that then stalls, or a refusal) or 30 s passed.
            answered = attacker.wait(
                lambda states: all(s.status is not None or s.reset_after for s in states), 30
            )
            held = [s for s in answered if s.status == 206 and s.reset_after is None]
            attacked = [
                skopeo_pull(tmp_path, host, f"someuser/legit{n}", legit_images[n])
                for n in range(PULLS, 2 * PULLS)
            ]
            still_held = [s for s in attacker.snapshot() if s.status == 206 and not s.reset_after]
            final = attacker.wait(
                lambda states: all(s.reset_after or s.status != 206 for s in states),
                ATTACK_SEND_TIMEOUT + 30,
            )
        finally:
            attacker.close()
        log = relay.log_text()
    calm_median, attacked_median = statistics.median(calm), statistics.median(attacked)
    print(
        f"cache={cache}: pulls {calm} s calm, {attacked} s attacked; "
        f"{len(held)} streams held, {len(still_held)} still held after the pulls; "
        f"statuses {collections.Counter(s.status for s in answered)}; "
        f"resets at {sorted(s.reset_after for s in final if s.reset_after)[:1]}.."
        f"{sorted(s.reset_after for s in final if s.reset_after)[-1:]} s"
    )
    assert attacked_median <= LATENCY_FACTOR * calm_median, (calm, attacked)
    assert 0 < len(held) <= 32, "at most upstream_streams_per_ip streams reach the upstream"
    assert still_held, "the attack was still on while the pulls ran"
    refused = [s for s in answered if s.status == 429]
    assert len(refused) == ATTACK_STREAMS - len(held)
    resets = [s.reset_after for s in final if s.status == 206]
    assert all(r is not None for r in resets), "every stalled stream is reset"
    assert all(ATTACK_SEND_TIMEOUT * 0.8 <= r <= ATTACK_SEND_TIMEOUT + 30 for r in resets if r)
    assert "Traceback" not in log


SLOW_SEND_TIMEOUT = 5.0
SLOW_READERS = 4


def test_http11_clients_that_stop_reading_lose_their_streams(
    clean_hub: Hub, tmp_path: Path
) -> None:
    """HTTP/1.1 clients ask for a 300 MiB layer (a range: pass-through even with the cache)
    and read nothing. The relay must close each after `server.stall_timeout` once the
    socket buffers are full, freeing its upstream connection; before the fix Hypercorn's
    (shielded) socket write waited for them for good."""
    big = clean_hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    layer = max(big.layers, key=lambda blob: blob.size)
    env = {"VPSRELAY_SERVER__STALL_TIMEOUT": str(SLOW_SEND_TIMEOUT)}
    with RelayProcess(tmp_path / "relay", "--upstream", f"docker.io={clean_hub.registry_url}",
                      env=env) as relay:  # fmt: skip
        bearer = pull_token(relay.url, "library/big")
        request = (
            f"GET /v2/library/big/blobs/{layer.digest} HTTP/1.1\r\n"
            f"Host: {relay.url.removeprefix('http://')}\r\n"
            f"Authorization: Bearer {bearer}\r\nRange: bytes=0-\r\n\r\n"
        ).encode()
        readers = []
        for _ in range(SLOW_READERS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind((ATTACKER_HOST, 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", relay.port))
            sock.sendall(request)
            readers.append(sock)
        try:
            time.sleep(SLOW_SEND_TIMEOUT + 10)  # the socket buffers fill, then the deadline
            received = [_drain(sock, limit=30.0) for sock in readers]
        finally:
            for sock in readers:
                sock.close()
        alive = httpx.get(f"{relay.url}/healthz", timeout=REQUEST_TIMEOUT)
        log = relay.log_text()
    print(f"slow HTTP/1.1 readers got {received} of {layer.size} bytes before the relay closed")
    assert all(0 < got < layer.size for got in received), received
    assert alive.status_code == 200
    assert log.count("reason=stalled_connection") >= SLOW_READERS
    assert "Traceback" not in log


def _drain(sock: socket.socket, limit: float) -> int:
    """Read until the relay closes the connection (or `limit` seconds pass); bytes read."""
    got = 0
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            break
        if not data:
            break
        got += len(data)
    return got
