"""Issue 12, findings 1 and 5: the connection layer.

1. Connections cut by the client in any state (mid-headers, mid-body, during a stream
   reset, during the TLS handshake), over HTTP/1.1, h2c and h2+TLS, must not end the
   relay. Two unfinished HTTP/2 streams and an RST made it exit: the stream-reset patch
   flushed while Hypercorn held the send lock.
2. One address must not take every connection slot, and a trickled request head must not
   hold one: a legitimate pull from another address goes on at its usual speed.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import h2.events
import h2.settings
import pytest

from tests.infra.relay import RelayProcess, pull_token
from tests.security.wire import (
    IO_TIMEOUT,
    TRANSPORTS,
    H2Client,
    assert_serving,
    big_layer,
    connect,
    cut,
    drain_some,
    make_pki,
    plain_url,
    port_of,
    pull_alpine,
    secure_url,
    tls_args,
    wait_exit,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

PASS_THROUGH = {"VPSRELAY_CACHE__ENABLED": "false"}  # every blob streams from upstream
REPEATS = 3  # each kill, so a state reached only sometimes is reached


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("conn-pki"))


def _open_relay(workdir: Path, hub: Hub, pki: dict[str, Path], *extra: str) -> RelayProcess:
    return RelayProcess(
        workdir, "--upstream", f"docker.io={hub.registry_url}", *tls_args(pki), *extra,
        env=PASS_THROUGH,
    )  # fmt: skip


def _blob_streams(client: H2Client, relay: RelayProcess, hub: Hub, count: int) -> list[int]:
    bearer = pull_token(plain_url(relay), "big")
    path = f"/v2/big/blobs/{big_layer(hub)}"
    return [client.get(path, (("authorization", f"Bearer {bearer}"),)) for _ in range(count)]


# --- finding 1: the crash -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["h2c", "h2tls"])
@pytest.mark.parametrize("ending", ["rst", "close_unread"])
def test_unfinished_h2_streams_then_a_reset_connection_do_not_end_the_relay(
    clean_hub: Hub, tmp_path: Path, pki: dict[str, Path], transport: str, ending: str
) -> None:
    """Two blob downloads on one HTTP/2 connection, some of their bytes read, then the
    connection cut: before the fix the relay process exited (RuntimeError: the send lock
    taken twice, out of the serving nursery)."""
    with _open_relay(tmp_path / "relay", clean_hub, pki) as relay:
        for _ in range(REPEATS):
            sock = connect(relay, transport, pki)
            client = H2Client(sock, "127.0.0.1")
            _blob_streams(client, relay, clean_hub, 2)
            events = client.read(want_data=64 * 1024, timeout=IO_TIMEOUT)
            assert any(isinstance(e, h2.events.DataReceived) for e in events)
            if ending == "rst":
                cut(sock)
            else:
                sock.close()  # unread bytes in the kernel's buffer: it sends an RST too
            wait_exit(relay, 1.0)
            assert relay.process.poll() is None, relay.log_text()[-3000:]
        assert_serving(relay, pki)
        assert "Traceback" not in relay.log_text()


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conn-users") / "htpasswd"
    subprocess.run(
        [sys.executable, "-m", "vpsrelay", "user", "add", "alice", "--password-stdin",
         "--file", str(path)],
        input="correct horse battery staple\n", text=True, check=True, capture_output=True,
        timeout=60,
    )  # fmt: skip
    return path


def test_wrong_credentials_on_three_token_requests_then_a_reset_do_not_end_the_relay(
    hub: Hub, tmp_path: Path, pki: dict[str, Path], users_file: Path
) -> None:
    """The same on a relay with client auth, reached without valid credentials: three
    `/token` requests with a wrong password on one connection, then an RST."""
    config = tmp_path / "relay.toml"
    config.write_text(f'[auth]\nenabled = true\nusers_file = "{users_file}"\n')
    wrong = base64.b64encode(b"alice:wrong").decode()
    path = "/token?service=registry.docker.io&scope=repository:library/alpine:pull"
    with _open_relay(tmp_path / "relay", hub, pki, "--config", str(config)) as relay:
        for transport in ("h2c", "h2tls"):
            for _ in range(REPEATS):
                sock = connect(relay, transport, pki)
                client = H2Client(sock, "127.0.0.1")
                for _ in range(3):
                    client.get(path, (("authorization", f"Basic {wrong}"),))
                cut(sock)
                wait_exit(relay, 1.0)
                assert relay.process.poll() is None, relay.log_text()[-3000:]
        assert_serving(relay, pki)


# --- finding 1: every state, every transport --------------------------------------------------


@pytest.fixture(scope="module")
def shared_relay(
    hub: Hub, tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]
) -> Iterator[RelayProcess]:
    with _open_relay(tmp_path_factory.mktemp("conn-relay"), hub, pki) as relay:
        yield relay


def _client_hello() -> bytes:
    """The first flight of a TLS client (its ClientHello), from a memory BIO."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _kill_during_tls(relay: RelayProcess, step: int) -> None:
    hello = _client_hello()
    with socket.create_connection(
        ("127.0.0.1", port_of(secure_url(relay))), timeout=IO_TIMEOUT
    ) as sock:
        if step % 3 == 0:
            sock.sendall(hello[: len(hello) // 2])  # half a ClientHello
        elif step % 3 == 1:
            sock.sendall(hello)
            drain_some(sock, 1, timeout=2.0)  # the server's flight has begun
        else:
            sock.sendall(hello)  # and never read what comes back
        cut(sock)


def _kill_http1(relay: RelayProcess, hub: Hub, state: str, pki: dict[str, Path]) -> None:
    bearer = pull_token(plain_url(relay), "big")
    head = (
        f"GET /v2/big/blobs/{big_layer(hub)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {bearer}\r\n\r\n"
    ).encode()
    sock = connect(relay, "http1", pki)
    try:
        if state == "mid-headers":
            sock.sendall(head[: len(head) // 2])
        elif state == "mid-body":
            sock.sendall(head)
            assert drain_some(sock, 256 * 1024, timeout=IO_TIMEOUT).startswith(b"HTTP/1.1 200")
        else:  # "during-reset": cut while the relay starts its answer
            sock.sendall(head)
    finally:
        cut(sock)


def _kill_h2(
    relay: RelayProcess, hub: Hub, transport: str, state: str, pki: dict[str, Path]
) -> None:
    sock = connect(relay, transport, pki)
    try:
        client = H2Client(sock, "127.0.0.1")
        if state == "mid-headers":
            streams = _blob_streams(client, relay, hub, 1)
            assert streams
            # A second request whose HEADERS frame is only half sent.
            client.conn.send_headers(
                client.conn.get_next_available_stream_id(),
                [(":method", "GET"), (":path", "/v2/"), (":scheme", "http"),
                 (":authority", "127.0.0.1"), ("x-pad", "p" * 2000)],
                end_stream=True,
            )  # fmt: skip
            frame = client.conn.data_to_send()
            sock.sendall(frame[: len(frame) // 2])
        elif state == "mid-body":
            _blob_streams(client, relay, hub, 3)
            client.read(want_data=64 * 1024, timeout=IO_TIMEOUT)
        else:  # "during-reset": streams reset by the client, the connection cut at once
            streams = _blob_streams(client, relay, hub, 3)
            client.read(want_data=16 * 1024, timeout=IO_TIMEOUT)
            client.reset(streams[0])
            client.reset(streams[2])
    finally:
        cut(sock)


# Every state on every transport; a TLS handshake only where there is TLS.
KILL_CASES = [
    (transport, state)
    for transport in TRANSPORTS
    for state in ("mid-headers", "mid-body", "during-reset", "during-tls")
    if state != "during-tls" or transport == "h2tls"
]


@pytest.mark.parametrize(("transport", "state"), KILL_CASES)
def test_connections_killed_in_any_state_leave_the_relay_serving(
    shared_relay: RelayProcess, hub: Hub, pki: dict[str, Path], transport: str, state: str
) -> None:
    relay = shared_relay
    assert_serving(relay, pki)
    for step in range(REPEATS):
        if state == "during-tls":
            _kill_during_tls(relay, step)
        elif transport == "http1":
            _kill_http1(relay, hub, state, pki)
        else:
            _kill_h2(relay, hub, transport, state, pki)
        wait_exit(relay, 0.5)
        assert relay.process.poll() is None, f"{transport} {state}: {relay.log_text()[-3000:]}"
    assert_serving(relay, pki)
    assert "Traceback" not in relay.log_text()


# --- finding 5: one address, every slot; a trickled head --------------------------------------

ATTACKER = "127.0.0.66"  # loopback is a /8: the attacker has its own address
ATTACK_SOCKETS = 300
PULLS = 5


class HalfOpenFlood:
    """Keeps up to `count` connections from `source` open, each with a request head that
    never ends (a byte now and then); reconnects the ones the relay closes. Bounded: it
    stops at `stop()` or after `limit` seconds, and reconnects at most every 0.2 s."""

    def __init__(self, port: int, source: str, count: int, limit: float = 300.0) -> None:
        self.port, self.source, self.count, self.limit = port, source, count, limit
        self.sockets: list[socket.socket] = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HalfOpenFlood:
        self._thread.start()
        deadline = time.monotonic() + 30
        while self.opened < self.count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open_one(self) -> None:
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), timeout=2, source_address=(self.source, 0)
            )
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        except OSError:
            return
        self.opened += 1
        self.sockets.append(sock)

    def _run(self) -> None:
        began = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - began < self.limit:
            while len(self.sockets) < self.count and not self._stop.is_set():
                self._open_one()
            alive = []
            for sock in self.sockets:
                try:
                    sock.sendall(b"a")  # one more byte of a header that never ends
                    alive.append(sock)
                except OSError:
                    sock.close()
            self.sockets = alive
            self._stop.wait(0.2)
        for sock in self.sockets:
            sock.close()


def _timed_pulls(workdir: Path, relay: RelayProcess, hub: Hub) -> list[float]:
    return [pull_alpine(workdir / f"pull{index}", relay, hub) for index in range(PULLS)]


def test_one_address_cannot_take_every_connection_slot(hub: Hub, tmp_path: Path) -> None:
    """300 half-open connections from one address against `max_connections = 250`: a
    skopeo pull from another address succeeds, its median time within 3x of unattacked.
    Before the fix every slot was the attacker's and the pull failed."""
    config = tmp_path / "relay.toml"
    config.write_text("[server]\nmax_connections = 250\n")
    with RelayProcess(
        tmp_path / "relay", "--upstream", f"docker.io={hub.registry_url}", "--config", str(config)
    ) as relay:
        _timed_pulls(tmp_path / "warm", relay, hub)  # first-pull costs out of the figures
        calm = _timed_pulls(tmp_path / "calm", relay, hub)
        with HalfOpenFlood(relay.port, ATTACKER, ATTACK_SOCKETS) as flood:
            assert flood.opened >= ATTACK_SOCKETS
            attacked = _timed_pulls(tmp_path / "attacked", relay, hub)
        calm_median, attacked_median = statistics.median(calm), statistics.median(attacked)
        print(f"skopeo pull median: {calm_median:.3f}s calm, {attacked_median:.3f}s attacked")
        assert attacked_median <= 3 * calm_median, (calm, attacked)
        assert "address_connection_cap" in relay.log_text()
        assert relay.process.poll() is None


HEAD_TIMEOUT = 2.0


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the relay closed `sock` (sending `trickle` every 0.25 s), or None."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        try:
            if trickle:
                sock.sendall(trickle)
            sock.settimeout(0.25)
            if sock.recv(65536) == b"":
                return time.monotonic() - began
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - began
    return None


@pytest.mark.parametrize("kind", ["http1-trickle", "h2c-pings", "tls-silent"])
def test_a_trickled_head_does_not_hold_a_slot(
    tmp_path: Path, pki: dict[str, Path], kind: str
) -> None:
    """A request head sent a byte at a time (read_timeout never fires), an HTTP/2 connection
    that only pings, a TLS connection that never says hello: each is closed once
    `server.head_timeout` has passed. Before the fix they were held for the keep-alive
    timeout (75 s) or the TLS handshake timeout (60 s)."""
    config = tmp_path / "relay.toml"
    config.write_text(f"[server]\nhead_timeout = {HEAD_TIMEOUT}\nread_timeout = 30\n")
    with RelayProcess(tmp_path / "relay", *tls_args(pki), "--config", str(config)) as relay:
        margin = 8.0  # a loaded machine
        if kind == "tls-silent":
            sock = socket.create_connection(("127.0.0.1", port_of(secure_url(relay))), timeout=5)
            took = _closed_within(sock, HEAD_TIMEOUT + margin)
        elif kind == "h2c-pings":
            sock = connect(relay, "h2c", pki)
            client = H2Client(sock, "127.0.0.1")
            began = time.monotonic()
            took = None
            while took is None and time.monotonic() - began < HEAD_TIMEOUT + margin:
                with contextlib.suppress(OSError):
                    client.conn.ping(b"12345678")
                    client.flush()
                took = _closed_within(sock, 0.5)
            took = None if took is None else time.monotonic() - began
        else:
            sock = connect(relay, "http1", pki)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            took = _closed_within(sock, HEAD_TIMEOUT + margin, trickle=b"a")
        sock.close()
        assert took is not None, f"{kind}: still open after {HEAD_TIMEOUT + margin}s"
        assert took >= HEAD_TIMEOUT - 0.5
        assert_serving(relay, pki)


STALL_TIMEOUT = 3.0


def _bytes_until_closed(sock: socket.socket, limit: int, seconds: float) -> tuple[int, bool]:
    """Read until the relay closes `sock`, `limit` bytes or `seconds`; (bytes, closed)."""
    received = 0
    deadline = time.monotonic() + seconds
    while received < limit and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1024 * 1024)
        except TimeoutError:
            return received, False
        except OSError:
            return received, True
        if not chunk:
            return received, True
        received += len(chunk)
    return received, False


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_that_stops_reading_does_not_hold_its_connection(
    hub: Hub, tmp_path: Path, pki: dict[str, Path], transport: str
) -> None:
    """A 300 MiB download the client stops reading (HTTP/1.1: it never reads; HTTP/2: it
    never opens its window): after `server.stall_timeout` the relay closes the connection,
    which held its slot and its upstream download for good before (a shielded write, a
    stream waiting for a window)."""
    config = tmp_path / "relay.toml"
    config.write_text(f"[server]\nstall_timeout = {STALL_TIMEOUT}\n")
    with _open_relay(tmp_path / "relay", hub, pki, "--config", str(config)) as relay:
        bearer = pull_token(plain_url(relay), "big")
        path = f"/v2/big/blobs/{big_layer(hub)}"
        sock = connect(relay, transport, pki)
        try:
            if transport == "http1":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {bearer}\r\n\r\n".encode()
                )
            else:
                client = H2Client(sock, "127.0.0.1")
                client.get(path, (("authorization", f"Bearer {bearer}"),))
            time.sleep(STALL_TIMEOUT + 5.0)  # not reading; a loaded machine's margin
            # What was sent before the stall is still buffered (a few MiB at most); a
            # connection still open would go on to the 300 MiB.
            received, closed = _bytes_until_closed(sock, 64 * 1024 * 1024, IO_TIMEOUT)
        finally:
            cut(sock)
        assert closed, f"{transport}: still open after {received} bytes"
        assert received < 64 * 1024 * 1024
        assert "stalled_connection" in relay.log_text()
        assert "Traceback" not in relay.log_text()  # closed by the policy, not by an error
        assert_serving(relay, pki)


# --- follow-up: cheap bytes in, nothing read out ----------------------------------------------
#
# A connection that is sent a trickle of bytes while it reads nothing, or whose request body
# never ends: every byte read counted as progress, so neither the stall timer nor the app's
# send_timeout (the write is shielded) ended it, and its slot, upstream connection and
# buffers were held for good.

SHORT = {"head_timeout": 2.0, "stall_timeout": 3.0, "keep_alive_timeout": 3.0}
ATTACK_SECONDS = 15.0  # how long a test keeps an attack up; held that long: not cut
TRICKLE_EVERY = 0.5


@pytest.fixture(scope="module")
def short_relay(
    hub: Hub, tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]
) -> Iterator[RelayProcess]:
    """Short head, stall and keep-alive timeouts; `send_timeout` shorter than the stall
    timeout, so the app gives up first (and its stream reset waits for the send lock)."""
    workdir = tmp_path_factory.mktemp("conn-short")
    config = workdir / "relay.toml"
    server = "\n".join(f"{key} = {value}" for key, value in SHORT.items())
    config.write_text(f"[server]\n{server}\n[limits]\nsend_timeout = 2.0\n")
    with _open_relay(workdir / "relay", hub, pki, "--config", str(config)) as relay:
        yield relay


def _refusals(relay: RelayProcess, reason: str) -> int:
    return relay.log_text().count(f"reason={reason}")


def _held_while(
    relay: RelayProcess, reasons: tuple[str, ...], step: Callable[[], None]
) -> float | None:
    """Run `step` every `TRICKLE_EVERY` s until the relay logs one more refusal for one of
    `reasons`, for at most `ATTACK_SECONDS`; the seconds it took, or None (still held)."""
    before = {reason: _refusals(relay, reason) for reason in reasons}
    began = time.monotonic()
    while time.monotonic() - began < ATTACK_SECONDS:
        with contextlib.suppress(OSError):  # the relay hung up: the log says why
            step()
        if any(_refusals(relay, reason) > count for reason, count in before.items()):
            return time.monotonic() - began
        time.sleep(TRICKLE_EVERY)
    return None


def _assert_let_go(sock: socket.socket, relay: RelayProcess, took: float | None, what: str) -> None:
    """The relay stopped holding the connection within the stall timeout and a margin,
    and closed it: what was sent before is drained, far short of the 300 MiB blob."""
    print(f"{what}: let go after {took if took is None else round(took, 2)} s")
    assert took is not None, f"{what}: held for {ATTACK_SECONDS} s\n{relay.log_text()[-2000:]}"
    assert took <= SHORT["stall_timeout"] + 8.0  # a loaded machine's margin
    received, closed = _bytes_until_closed(sock, 64 * 1024 * 1024, IO_TIMEOUT)
    assert closed, f"{what}: still open after {received} bytes"
    assert "Traceback" not in relay.log_text()


def test_a_get_with_a_trickled_body_does_not_hold_its_connection(
    short_relay: RelayProcess, hub: Hub, pki: dict[str, Path]
) -> None:
    """HTTP/1.1: a blob GET announcing a 1 MB body, the answer never read, a body byte every
    0.5 s. The relay threw the body away, each byte counted as progress, and the write
    waited for good (held 20 s against a 3 s stall timeout). Now the GET is refused."""
    relay = short_relay
    bearer = pull_token(plain_url(relay), "big")
    sock = connect(relay, "http1", pki)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            f"GET /v2/big/blobs/{big_layer(hub)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {bearer}\r\nContent-Length: 1000000\r\n\r\n".encode()
        )
        took = _held_while(
            relay, ("body_not_allowed", "stalled_connection"), lambda: sock.sendall(b"a")
        )
        _assert_let_go(sock, relay, took, "trickled GET body")
    finally:
        cut(sock)
    assert_serving(relay, pki)


def _window_update(increment: int) -> bytes:
    """A connection-level WINDOW_UPDATE frame (13 bytes; RFC 9113 6.9)."""
    return struct.pack(">HBBBLL", 0, 4, 0x8, 0, 0, increment)


@pytest.mark.parametrize("transport", ["h2c", "h2tls"])
def test_window_updates_do_not_keep_an_unread_h2_connection(
    short_relay: RelayProcess, hub: Hub, pki: dict[str, Path], transport: str
) -> None:
    """HTTP/2: wide windows, a blob GET, nothing read from TCP, a 13-byte connection-level
    WINDOW_UPDATE every 0.5 s. Those need no answer, so the relay read them as progress
    while its write waited; send_timeout ended the stream, whose reset then waited for
    the send lock: held 15 s against a 3 s stall and a 3 s keep-alive timeout."""
    relay = short_relay
    bearer = pull_token(plain_url(relay), "big")
    sock = connect(relay, transport, pki)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client = H2Client(sock, "127.0.0.1")
        wide = 2**30  # leaves room below 2**31 - 1 for the increments that follow
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: wide})
        client.conn.increment_flow_control_window(wide - 65535)
        client.get(f"/v2/big/blobs/{big_layer(hub)}", (("authorization", f"Bearer {bearer}"),))
        took = _held_while(relay, ("stalled_connection",), lambda: sock.sendall(_window_update(1)))
        _assert_let_go(sock, relay, took, f"{transport} WINDOW_UPDATEs")
    finally:
        cut(sock)
    assert_serving(relay, pki)


def _status_within(read: Callable[[], bytes | None], seconds: float) -> tuple[bytes, float]:
    """`read()` until it returns a status line or code (None: nothing yet), for at most
    `seconds`; (what it returned or b"", seconds taken)."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        status = read()
        if status:
            return status, time.monotonic() - began
    return b"", time.monotonic() - began


@pytest.mark.parametrize("transport", ["http1", "h2c"])
def test_an_unfinished_token_form_does_not_hold_its_stream(
    short_relay: RelayProcess, pki: dict[str, Path], transport: str
) -> None:
    """`POST /token` whose form never ends: over HTTP/1.1 a byte of it every 0.5 s, over
    HTTP/2 the HEADERS without END_STREAM and then only PINGs. The form had no deadline:
    held 21 s. Now it gets `server.head_timeout` and a 408 (OCI JSON) after it."""
    relay = short_relay
    head_timeout = SHORT["head_timeout"]
    form_head = (("content-type", "application/x-www-form-urlencoded"),)
    sock = connect(relay, transport, pki)
    try:
        if transport == "http1":
            sock.sendall(
                b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\ngrant_type="
            )

            def read() -> bytes | None:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
                answer = drain_some(sock, 4096, timeout=TRICKLE_EVERY)
                return answer.split(b"\r\n", 1)[0] if answer else None

        else:
            client = H2Client(sock, "127.0.0.1")
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(
                stream_id,
                [(":method", "POST"), (":path", "/token"), (":scheme", "http"),
                 (":authority", "127.0.0.1"), *form_head],
            )  # fmt: skip
            client.flush()

            def read() -> bytes | None:
                with contextlib.suppress(OSError):
                    client.conn.ping(b"12345678")
                    client.flush()
                for event in client.read(timeout=TRICKLE_EVERY):
                    if isinstance(event, h2.events.ResponseReceived):
                        return dict(event.headers)[b":status"]
                return None

        status, took = _status_within(read, ATTACK_SECONDS)
        print(f"{transport} unfinished /token form: {status!r} after {took:.2f} s")
        assert status, f"{transport}: no answer in {ATTACK_SECONDS} s"
        assert b"408" in status
        assert head_timeout - 0.5 <= took <= head_timeout + 8.0
    finally:
        cut(sock)
    assert "reason=body_timeout" in relay.log_text()
    assert "Traceback" not in relay.log_text()
    assert_serving(relay, pki)
