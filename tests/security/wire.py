"""Raw clients for the connection attacks: sockets over HTTP/1.1, h2c and h2+TLS that can
be cut in any state (an RST, or a close with unread data), and a check that the relay
process is alive and still answers."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx
import trustme

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.relay import RelayProcess

TRANSPORTS = ("http1", "h2c", "h2tls")
IO_TIMEOUT = 10.0  # any one socket operation; a hang is a failure


def make_pki(base: Path) -> dict[str, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    files = {"ca": base / "ca.pem", "cert": base / "cert.pem", "key": base / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    return files


def tls_args(pki: dict[str, Path]) -> tuple[str, ...]:
    return (
        "--cert", str(pki["cert"]), "--key", str(pki["key"]),
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
    )  # fmt: skip


def plain_url(relay: RelayProcess) -> str:
    return next(u for u in relay.urls if u.startswith("http://"))


def secure_url(relay: RelayProcess) -> str:
    return next(u for u in relay.urls if u.startswith("https://"))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def big_layer(hub: Hub) -> str:
    """The digest of the hub's 300 MiB layer: a download that is always unfinished."""
    image = hub.images["library/big:latest"]
    return max(image.layers, key=lambda blob: blob.size).digest  # type: ignore[union-attr]


def connect(
    relay: RelayProcess, transport: str, pki: dict[str, Path], *, source: str = "127.0.0.1"
) -> socket.socket:
    """A connected socket (TLS with ALPN h2 for `h2tls`), handshake done."""
    url = secure_url(relay) if transport == "h2tls" else plain_url(relay)
    sock = socket.create_connection(
        ("127.0.0.1", port_of(url)), timeout=IO_TIMEOUT, source_address=(source, 0)
    )
    if transport != "h2tls":
        return sock
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.set_alpn_protocols(["h2"])
    try:
        wrapped = context.wrap_socket(sock, server_hostname="127.0.0.1")
    except OSError:
        sock.close()
        raise
    assert wrapped.selected_alpn_protocol() == "h2"
    return wrapped


def cut(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): what a killed client's kernel sends."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def drain_some(sock: socket.socket, limit: int, timeout: float = 2.0) -> bytes:
    """Up to `limit` bytes, whatever arrives within `timeout` seconds."""
    data = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while len(data) < limit and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    sock.settimeout(IO_TIMEOUT)
    return data


class H2Client:
    """An h2 client connection on a socket; streams are opened and never read to the end."""

    def __init__(self, sock: socket.socket, authority: str) -> None:
        self.sock = sock
        self.authority = authority
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def get(self, path: str, headers: tuple[tuple[str, str], ...] = ()) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream_id,
            [(":method", "GET"), (":path", path), (":scheme", "http"),
             (":authority", self.authority), *headers],
            end_stream=True,
        )  # fmt: skip
        self.flush()
        return stream_id

    def reset(self, stream_id: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream_id)
        self.flush()

    def read(self, timeout: float = 2.0, want_data: int = 1) -> list[h2.events.Event]:
        """Events until `want_data` DATA bytes arrived (not acknowledged), or `timeout`."""
        events: list[h2.events.Event] = []
        received = 0
        deadline = time.monotonic() + timeout
        while received < want_data and (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                break
            if not data:
                break
            for event in self.conn.receive_data(data):
                events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    received += len(event.data)
            with contextlib.suppress(OSError):
                self.flush()  # SETTINGS and PING acks
        self.sock.settimeout(IO_TIMEOUT)
        return events


def assert_serving(relay: RelayProcess, pki: dict[str, Path] | None = None) -> None:
    """The relay process is alive and answers /healthz (over HTTPS too, if it serves it)."""
    assert relay.process.poll() is None, f"the relay exited:\n{relay.log_text()[-3000:]}"
    answer = httpx.get(f"{plain_url(relay)}/healthz", timeout=IO_TIMEOUT)
    assert answer.status_code == 200
    if pki is not None:
        context = ssl.create_default_context(cafile=str(pki["ca"]))
        with httpx.Client(http2=True, verify=context, timeout=IO_TIMEOUT) as client:
            answer = client.get(f"{secure_url(relay)}/healthz")
        assert answer.status_code == 200
        assert answer.http_version == "HTTP/2"


def wait_exit(relay: RelayProcess, seconds: float) -> None:
    """Give a dying relay time to die before the test looks."""
    deadline = time.monotonic() + seconds
    while relay.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def pull_alpine(workdir: Path, relay: RelayProcess, hub: Hub) -> float:
    """`skopeo copy` of alpine through the relay's plain port, checked; the seconds it took."""
    from tests.integration.test_registries import assert_pulled, skopeo_copy

    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    skopeo_copy(workdir, f"{plain_url(relay).removeprefix('http://')}/alpine:latest")
    took = time.monotonic() - began
    assert_pulled(workdir, hub.images["library/alpine:latest"])  # type: ignore[arg-type]
    return took
