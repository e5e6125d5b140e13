"""Looking into a supervised relay (`--workers N`) from outside: which worker served what.

Every access-log line names its worker (`worker=w1`); a probe request carries a unique
query so its line can be found. Which worker holds an open connection is read from /proc:
the kernel's TCP table gives the relay-side socket's inode, the workers' descriptors say
who has it.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from cryptography import x509

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.infra.relay import RelayProcess

_STARTED = re.compile(r"worker (w\d+) started, pid (\d+)")
_counter = itertools.count()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def started_workers(relay: RelayProcess) -> list[tuple[str, int]]:
    """(label, pid) of every worker start the supervisor logged, in order."""
    return [(label, int(pid)) for label, pid in _STARTED.findall(relay.log_text())]


def current_pids(relay: RelayProcess) -> dict[str, int]:
    """Label -> pid of the latest start of each worker."""
    return dict(started_workers(relay))


def label_of(relay: RelayProcess, marker: str, timeout: float = 10.0) -> str:
    """The worker whose access-log line carries `probe=<marker>`."""
    pattern = re.compile(rf"worker=(\S+) .*probe={re.escape(marker)}\b")
    found: list[str] = []

    def logged() -> bool:
        found[:] = pattern.findall(relay.log_text())
        return bool(found)

    wait_for(f"the access-log line of probe {marker}", logged, timeout)
    return found[0]


def new_marker() -> str:
    """A unique `probe=` value: put it in a request's query to find its access-log line."""
    return f"p{next(_counter)}x{time.monotonic_ns()}"


def probe(relay: RelayProcess, base_url: str | None = None) -> str:
    """One request on a new connection; the label of the worker that answered it."""
    marker = new_marker()
    response = httpx.get(f"{base_url or relay.url}/healthz", params={"probe": marker}, timeout=10)
    assert response.status_code == 200, response.text
    return label_of(relay, marker)


def labels_seen(relay: RelayProcess, attempts: int, base_url: str | None = None) -> set[str]:
    """Labels of the workers that answered up to `attempts` new connections (stops early
    once every worker answered)."""
    count = len(current_pids(relay))
    seen: set[str] = set()
    for _ in range(attempts):
        seen.add(probe(relay, base_url))
        if len(seen) == count:
            break
    return seen


@contextlib.contextmanager
def clients_by_worker(
    relay: RelayProcess, per_worker: int, attempts: int, timeout: float = 30.0
) -> Iterator[dict[str, list[httpx.Client]]]:
    """Keep-alive clients, each holding one connection that a known worker accepted: new
    connections (a /healthz probe on each) until every worker holds `per_worker` of them,
    at most `attempts`. A test still checks its own requests' labels: a connection the
    server closed meanwhile is silently replaced by httpx."""
    count = len(current_pids(relay))
    found: dict[str, list[httpx.Client]] = {}
    with contextlib.ExitStack() as stack:
        for _ in range(attempts):
            client = stack.enter_context(httpx.Client(timeout=timeout))
            marker = new_marker()
            answer = client.get(f"{relay.url}/healthz", params={"probe": marker})
            assert answer.status_code == 200, answer.text
            found.setdefault(label_of(relay, marker), []).append(client)
            if len(found) == count and all(len(c) >= per_worker for c in found.values()):
                break
        else:
            raise AssertionError(f"{attempts} connections did not reach every worker: {found}")
        yield {label: clients[:per_worker] for label, clients in found.items()}


def tls_probe(relay: RelayProcess, port: int, cafile: Path, server_name: str) -> tuple[str, int]:
    """A new verified TLS connection: (the label of the worker that served it, the serial)."""
    marker = f"t{next(_counter)}x{time.monotonic_ns()}"
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        serial = x509.load_der_x509_certificate(der).serial_number
        request = (
            f"GET /healthz?probe={marker} HTTP/1.1\r\nHost: {server_name}:{port}\r\n"
            "Connection: close\r\n\r\n"
        )
        conn.sendall(request.encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return label_of(relay, marker), serial


def serials_by_worker(
    relay: RelayProcess, port: int, cafile: Path, server_name: str, attempts: int
) -> dict[str, set[int]]:
    """Serials seen on new TLS connections, by the worker that served each; stops once
    every worker served at least one."""
    count = len(current_pids(relay))
    seen: dict[str, set[int]] = {}
    for _ in range(attempts):
        label, serial = tls_probe(relay, port, cafile, server_name)
        seen.setdefault(label, set()).add(serial)
        if len(seen) == count:
            break
    return seen


# --- which process holds a connection


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:
        return inodes
    for fd in descriptors:
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_sockets() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state hex) of every TCP socket on the machine."""
    table: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
            table[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    return table


TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"


def connection_owner(pids: dict[str, int], relay_port: int, client_port: int) -> str | None:
    """The label of the worker holding the relay's side of the connection from `client_port`."""
    table = tcp_sockets()
    wanted = {
        inode
        for inode, (local, remote, _state) in table.items()
        if local == relay_port and remote == client_port
    }
    for label, pid in pids.items():
        if _socket_inodes(pid) & wanted:
            return label
    return None


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the socket listening on `port` (a
    listening socket's rx_queue in the kernel's TCP table)."""
    waiting = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == TCP_LISTEN:
                waiting += int(parts[4].split(":")[1], 16)
    return waiting


def tcp_states_of(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of the TCP sockets process `pid` holds."""
    table = tcp_sockets()
    return [table[inode] for inode in _socket_inodes(pid) if inode in table]


def unix_sockets_of(pid: int) -> int:
    """How many of `pid`'s sockets are not TCP (unix sockets, socketpairs)."""
    table = tcp_sockets()
    return sum(1 for inode in _socket_inodes(pid) if inode not in table)
