"""Issue 14, the supervisor: `--workers 2` is a parent and two workers serving the same
listeners; the parent replaces a dead worker, drains both on SIGTERM, forwards SIGHUP, and
alone orders and renews ACME certificates that both workers serve."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trustme

from tests.infra.oci import BuiltImage
from tests.infra.pebble import Pebble
from tests.infra.relay import REPO_ROOT, RelayProcess, pull_token
from tests.infra.workers import (
    connection_owner,
    current_pids,
    labels_seen,
    serials_by_worker,
    wait_for,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
MiB = 1 << 20
DOMAIN = "relay.test"
PROBES = 40  # new connections before both workers must have answered one


def two_workers(workdir: Path, hub: Hub, *args: str) -> RelayProcess:
    return RelayProcess(
        workdir, "--workers", "2", "--upstream", f"docker.io={hub.registry_url}", *args
    )


def big_layer(hub: Hub) -> tuple[str, int]:
    image = hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    return layer.digest, layer.size


def test_both_workers_serve_and_skopeo_pulls_byte_exact(clean_hub: Hub, tmp_path: Path) -> None:
    from tests.integration.test_pull import assert_blobs_pulled, pulled_manifest_digest, skopeo_copy

    with two_workers(tmp_path / "relay", clean_hub) as relay:
        assert set(current_pids(relay)) == {"w1", "w2"}
        assert sorted(relay.worker_pids()) == sorted(current_pids(relay).values())
        assert labels_seen(relay, PROBES) == {"w1", "w2"}
        skopeo_copy(tmp_path, f"{relay.url.removeprefix('http://')}/library/alpine:latest")
        image = clean_hub.images["library/alpine:latest"]
        assert isinstance(image, BuiltImage)
        assert pulled_manifest_digest(tmp_path) == image.manifest_digest
        assert_blobs_pulled(tmp_path, image)
    log = relay.log_text()
    # The parent says "listening" once, after both workers serve; the workers say which
    # address they serve, and every line names its process.
    assert log.count("listening on http://") == 1
    assert log.index("worker w1 started") < log.index("listening on")
    assert log.index("worker w2 started") < log.index("listening on")
    assert "received SIGTERM, stopping every worker" in log
    assert 'worker=w1 client=127.0.0.1 method=GET path="/v2/library/alpine/' in log or (
        'worker=w2 client=127.0.0.1 method=GET path="/v2/library/alpine/' in log
    )


def test_a_killed_worker_is_replaced_and_its_stream_is_never_completed(
    clean_hub: Hub, tmp_path: Path
) -> None:
    digest, size = big_layer(clean_hub)
    with two_workers(tmp_path / "relay", clean_hub) as relay, contextlib.ExitStack() as stack:
        token = pull_token(relay.url, "big")
        before = current_pids(relay)
        url = f"{relay.url}/v2/big/blobs/{digest}"
        headers = {"authorization": f"Bearer {token}"}
        sha = hashlib.sha256()
        progress = {"received": 0, "killed": 0}
        response = stack.enter_context(httpx.stream("GET", url, headers=headers, timeout=30))
        assert response.status_code == 200
        client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
        owner = connection_owner(before, relay.port, client_port)
        assert owner is not None

        def read_and_kill_its_worker() -> None:
            for chunk in response.iter_raw(MiB):
                sha.update(chunk)
                progress["received"] += len(chunk)
                if progress["received"] >= 4 * MiB and not progress["killed"]:
                    progress["killed"] = before[owner]
                    os.kill(before[owner], signal.SIGKILL)  # mid-stream

        with pytest.raises(httpx.TransportError):  # the client sees the stream break
            read_and_kill_its_worker()
        stack.close()
        killed = progress["killed"]
        # Never a complete body.
        assert progress["received"] < size
        assert f"sha256:{sha.hexdigest()}" != digest
        wait_for("the replacement worker", lambda: current_pids(relay)[owner] != killed, 20)
        after = current_pids(relay)
        assert set(after) == {"w1", "w2"}
        assert sorted(relay.worker_pids()) == sorted(after.values())
        assert relay.process.poll() is None
        # A new pull of the same blob succeeds byte-exact, whichever worker serves it.
        pulled = hashlib.sha256()
        with httpx.stream("GET", url, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            length = 0
            for chunk in response.iter_raw(MiB):
                pulled.update(chunk)
                length += len(chunk)
        assert (length, f"sha256:{pulled.hexdigest()}") == (size, digest)
        assert labels_seen(relay, PROBES) == {"w1", "w2"}
    log = relay.log_text()
    assert f"worker {owner} (pid" in log
    assert "exited with signal SIGKILL" in log


@dataclass
class Stream:
    client: httpx.Client
    response: httpx.Response
    chunks: Iterator[bytes]
    sha: Any
    received: int


def test_sigterm_drains_pulls_in_flight_on_both_workers(clean_hub: Hub, tmp_path: Path) -> None:
    digest, size = big_layer(clean_hub)
    with two_workers(tmp_path / "relay", clean_hub, "--config", str(_grace(tmp_path, 20))) as relay:
        token = pull_token(relay.url, "big")
        pids = current_pids(relay)
        url = f"{relay.url}/v2/big/blobs/{digest}"
        streams: list[Stream] = []
        owners: set[str] = set()
        try:
            for _ in range(6):  # new connections until each worker holds a pull
                client = httpx.Client(timeout=60)
                request = client.build_request(
                    "GET", url, headers={"authorization": f"Bearer {token}"}
                )
                response = client.send(request, stream=True)
                assert response.status_code == 200
                port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
                owner = connection_owner(pids, relay.port, port)
                assert owner is not None
                owners.add(owner)
                sha = hashlib.sha256()
                chunks = response.iter_raw(MiB)
                first = next(chunks)
                sha.update(first)
                streams.append(Stream(client, response, chunks, sha, len(first)))
                if owners == {"w1", "w2"}:
                    break
            assert owners == {"w1", "w2"}
            stopped_at = time.monotonic()
            relay.process.send_signal(signal.SIGTERM)
            # Nobody accepts any more (the parent closed its copies of the listeners, the
            # workers theirs), while the pulls still run ...
            wait_for("new connections refused", lambda: _refused(relay.port), 5)
            assert relay.process.poll() is None
            for stream in streams:
                for chunk in stream.chunks:
                    stream.sha.update(chunk)
                    stream.received += len(chunk)
                assert (stream.received, f"sha256:{stream.sha.hexdigest()}") == (size, digest)
        finally:
            for stream in streams:
                stream.response.close()
                stream.client.close()
        assert relay.process.wait(30) == 0
        assert time.monotonic() - stopped_at < 20 + 5
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its parent"
    log = relay.log_text()
    assert "received SIGTERM, stopping every worker" in log
    assert log.count(f"status=200 bytes={size}") == len(streams)


def _refused(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _grace(tmp_path: Path, seconds: int) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\ngraceful_timeout = {seconds}\n")
    return path


# --- certificates: own files with SIGHUP, ACME with pebble


def _write_pair(ca: trustme.CA, cert_file: Path, key_file: Path) -> int:
    from cryptography import x509

    leaf = ca.issue_cert(DOMAIN)
    key_tmp, cert_tmp = key_file.with_suffix(".tmp-key"), cert_file.with_suffix(".tmp-cert")
    leaf.private_key_pem.write_to_path(str(key_tmp))
    cert_tmp.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    os.replace(key_tmp, key_file)
    os.replace(cert_tmp, cert_file)
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def _https_port(relay: RelayProcess) -> int:
    return int(next(u for u in relay.urls if u.startswith("https://")).rsplit(":", 1)[1])


def test_sighup_reloads_own_certificate_files_in_every_worker(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    first = _write_pair(ca, cert_file, key_file)
    with RelayProcess(
        tmp_path / "relay", "--workers", "2",
        "--cert", str(cert_file), "--key", str(key_file),
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
    ) as relay:  # fmt: skip
        port = _https_port(relay)
        pids = current_pids(relay)
        assert serials_by_worker(relay, port, ca_file, DOMAIN, PROBES) == {
            "w1": {first},
            "w2": {first},
        }
        second = _write_pair(ca, cert_file, key_file)
        relay.process.send_signal(signal.SIGHUP)
        wait_for(
            "both workers' reload",
            lambda: relay.log_text().count(f"serving certificate serial={second:x}") == 2,
            15,
        )
        assert serials_by_worker(relay, port, ca_file, DOMAIN, PROBES) == {
            "w1": {second},
            "w2": {second},
        }
        # Nobody restarted: the same processes serve the new certificate.
        assert current_pids(relay) == pids
        assert sorted(relay.worker_pids()) == sorted(pids.values())
    assert "received SIGHUP, forwarding it to every worker" in relay.log_text()


def _vpsrelay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A data dir with a short path: the control socket lives there (107-byte limit)."""
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="vr-w-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_acme_http01_issued_and_renewed_once_and_served_by_every_worker(
    tmp_path: Path, short_dir: Path
) -> None:
    with Pebble(tmp_path / "pebble") as pebble:
        acme = [
            "--domain", DOMAIN, "--acme-directory", pebble.directory_url,
            "--acme-ca-bundle", str(pebble.wfe_ca), "--challenge", "http-01",
            "--data-dir", str(short_dir),
            "--http-listen", f"127.0.0.1:{pebble.http_port}",
        ]  # fmt: skip
        with RelayProcess(
            tmp_path / "relay", "--workers", "2", *acme, "--https-listen", "127.0.0.1:0"
        ) as relay:
            # Issued once, by the supervisor; the workers answered the CA's HTTP-01 checks
            # from the shared challenge files and then loaded the stored certificate.
            wait_for(
                "both workers serving the first certificate",
                lambda: relay.log_text().count("serving certificate serial=") >= 3,
                90,
            )
            root = pebble.write_root(tmp_path / "root.pem")
            port = _https_port(relay)
            log = relay.log_text()
            assert log.count("requesting a certificate for") == 1
            assert 'logger=vpsrelay.tls worker=main msg="requesting a certificate' in log
            answered = [line for line in log.splitlines() if "answered an HTTP-01" in line]
            assert answered
            assert all(" worker=w1 " in line or " worker=w2 " in line for line in answered)
            first = serials_by_worker(relay, port, root, DOMAIN, PROBES)
            assert set(first) == {"w1", "w2"}
            (old_serial,) = set().union(*first.values())

            renewed = _vpsrelay_cli("cert", "renew", "--force", *acme)
            assert renewed.returncode == 0, renewed.stderr
            assert renewed.stdout.startswith("renewed: serial ")
            new_serial = int(renewed.stdout.split()[2].rstrip(","), 16)
            assert new_serial != old_serial
            wait_for(
                "both workers serving the renewed certificate",
                lambda: relay.log_text().count(f"serving certificate serial={new_serial:x}") >= 3,
                20,
            )
            assert serials_by_worker(relay, port, root, DOMAIN, PROBES) == {
                "w1": {new_serial},
                "w2": {new_serial},
            }
            assert relay.log_text().count("requesting a certificate for") == 2


def test_acme_tls_alpn01_answered_by_the_workers(tmp_path: Path, short_dir: Path) -> None:
    from tests.infra.pebble import free_port

    tls_port = free_port()
    # Nothing listens on pebble's HTTP-01 port: only TLS-ALPN-01, answered by a worker from
    # the supervisor's challenge files, can succeed.
    with Pebble(tmp_path / "pebble", tls_port=tls_port) as pebble:
        acme = [
            "--domain", DOMAIN, "--acme-directory", pebble.directory_url,
            "--acme-ca-bundle", str(pebble.wfe_ca), "--challenge", "tls-alpn-01",
            "--data-dir", str(short_dir),
        ]  # fmt: skip
        with RelayProcess(
            tmp_path / "relay", "--workers", "2", *acme,
            "--https-listen", f"127.0.0.1:{tls_port}", "--http-listen", "127.0.0.1:0",
        ) as relay:  # fmt: skip
            wait_for(
                "both workers serving the certificate",
                lambda: relay.log_text().count("serving certificate serial=") >= 3,
                90,
            )
            root = pebble.write_root(tmp_path / "root.pem")
            served = serials_by_worker(relay, tls_port, root, DOMAIN, PROBES)
            assert set(served) == {"w1", "w2"}
            assert len(set().union(*served.values())) == 1
    log = relay.log_text()
    assert log.count("requesting a certificate for") == 1
    answered = [line for line in log.splitlines() if "answering a TLS-ALPN-01" in line]
    assert answered
    assert all(" worker=w1 " in line or " worker=w2 " in line for line in answered)
    # The pending challenge files are gone once the order is done.
    assert not any((short_dir / "run" / "acme" / "tls-alpn-01").iterdir())


def test_a_taken_port_is_one_error_before_any_worker_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="relay exited with 1") as failed:
            RelayProcess(tmp_path / "relay", "--workers", "2", "--listen", f"127.0.0.1:{port}")
    message = str(failed.value)
    assert "vpsrelay: cannot serve: [Errno 98] Address already in use" in message
    assert "worker w" not in message
