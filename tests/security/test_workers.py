"""Issue 14, the supervisor under attack: the parent of `--workers 2` handles no client
traffic (its only TCP sockets are the listeners it hands on, never an accepted connection),
so no client can reach it; hostile clients restart no worker; a worker that dies, by any
signal, takes neither the parent nor the other worker down; a worker that dies at start
over and over ends the relay with one clear line instead of a restart loop."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import ssl
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token
from tests.infra.workers import (
    TCP_LISTEN,
    accept_queue,
    connection_owner,
    current_pids,
    labels_seen,
    tcp_states_of,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
MiB = 1 << 20
PROBES = 40


def _ports(relay: RelayProcess) -> set[int]:
    return {int(url.rsplit(":", 1)[1]) for url in relay.urls}


def _hostile_connections(port: int) -> list[socket.socket]:
    """Garbage, a TLS hello on the plain port, a trickled head, an oversized head, idle ones:
    each on its own connection, left open."""
    payloads = [
        b"\x00\xff" * 512,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",  # never finished
        b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(200),
        b"",
    ]
    held = []
    for index in range(60):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        payload = payloads[index % len(payloads)]
        if payload:
            with contextlib.suppress(OSError):  # the relay may have refused it already
                sock.sendall(payload)
        held.append(sock)
    return held


def test_the_parent_holds_only_listeners_and_hostile_clients_restart_nothing(
    tmp_path: Path,
) -> None:
    with RelayProcess(tmp_path / "relay", "--workers", "2") as relay:
        pids = current_pids(relay)
        held = _hostile_connections(relay.port)
        try:
            wait_for("the workers to accept them all", lambda: accept_queue(relay.port) == 0, 10)
            parent = tcp_states_of(relay.process.pid)
            # Every TCP socket of the parent listens; none is a client's connection.
            assert parent
            assert {state for _local, _remote, state in parent} == {TCP_LISTEN}
            assert {local for local, _remote, _state in parent} == _ports(relay)
        finally:
            for sock in held:
                sock.close()
        assert labels_seen(relay, PROBES) == {"w1", "w2"}
        assert current_pids(relay) == pids
        assert relay.worker_pids() == sorted(pids.values())
        assert relay.process.poll() is None
    assert "exited with" not in relay.log_text()


def test_a_dying_worker_never_takes_the_parent_or_the_other_worker_down(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    with RelayProcess(
        tmp_path / "relay", "--workers", "2", "--upstream", f"docker.io={clean_hub.registry_url}"
    ) as relay:
        token = pull_token(relay.url, "big")
        pids = current_pids(relay)
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        sha = hashlib.sha256()
        received = 0
        with httpx.stream(
            "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=60
        ) as response:
            assert response.status_code == 200
            port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
            owner = connection_owner(pids, relay.port, port)
            assert owner is not None
            other = "w2" if owner == "w1" else "w1"
            chunks = response.iter_raw(MiB)
            for chunk in chunks:
                sha.update(chunk)
                received += len(chunk)
                if received >= 4 * MiB:
                    break
            # The other worker dies three times, three ways, while this stream waits.
            for signum in (signal.SIGSEGV, signal.SIGABRT, signal.SIGKILL):
                victim = current_pids(relay)[other]
                os.kill(victim, signum)
                wait_for(
                    f"{other} replaced after {signum.name}",
                    lambda victim=victim: current_pids(relay)[other] != victim,  # type: ignore[misc]
                    20,
                )
            for chunk in chunks:
                sha.update(chunk)
                received += len(chunk)
        assert (received, f"sha256:{sha.hexdigest()}") == (layer.size, layer.digest)
        assert current_pids(relay)[owner] == pids[owner]
        assert relay.process.poll() is None
        assert labels_seen(relay, PROBES) == {"w1", "w2"}
    log = relay.log_text()
    for name in ("SIGSEGV", "SIGABRT", "SIGKILL"):
        assert f"exited with signal {name}" in log


def test_a_worker_that_keeps_dying_at_start_ends_the_relay_with_one_line(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay", "--workers", "2")
    try:
        original = set(relay.worker_pids())
        killed: set[int] = set()
        deadline = time.monotonic() + 60
        # Every worker is killed as soon as it exists: the parent must give up, not loop.
        while relay.process.poll() is None and time.monotonic() < deadline:
            for pid in relay.worker_pids():
                if pid not in killed:
                    killed.add(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        assert relay.process.wait(5) == 1
        assert original <= killed
        assert len(killed) <= 2 * 5  # bounded: at most MAX_FAST_EXITS per worker
        assert relay.worker_pids() == []
    finally:
        relay.close()
    log = relay.log_text()
    assert "times in a row within 10s of starting" in log
    assert "giving up" in log


def test_no_client_reaches_the_parent_over_tls(tmp_path: Path) -> None:
    """With TLS, the parent's sockets are still listeners only, after handshakes of all kinds."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_file))
    with RelayProcess(
        tmp_path / "relay", "--workers", "2",
        "--cert", str(cert_file), "--key", str(key_file),
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
    ) as relay:  # fmt: skip
        https = next(int(u.rsplit(":", 1)[1]) for u in relay.urls if u.startswith("https://"))
        held = _hostile_connections(https)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for _ in range(10):
            with (
                socket.create_connection(("127.0.0.1", https), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="relay.test"),
            ):
                pass
        try:
            parent = tcp_states_of(relay.process.pid)
            assert {state for _local, _remote, state in parent} == {TCP_LISTEN}
        finally:
            for sock in held:
                sock.close()
        assert relay.process.poll() is None
    assert "exited with" not in relay.log_text()


def test_workers_do_not_outlive_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL to the parent (an OOM kill): its workers see their settings pipe close,
    drain and exit; none keeps serving the port unsupervised."""
    relay = RelayProcess(tmp_path / "relay", "--workers", "2")
    try:
        pids = relay.worker_pids()
        assert len(pids) == 2
        relay.process.kill()
        relay.process.wait(5)
        wait_for(
            "the orphaned workers to exit",
            lambda: not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids),
            15,
        )
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=2).close()
    finally:
        relay.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
