"""Issue 3: HTTPS with the relay's own ACME certificate, from a real CA (Debian's pebble).

The relay gets `relay.test` from pebble (whose DNS answers 127.0.0.1 for every name) by
HTTP-01 and by TLS-ALPN-01, serves it with h2, renews it under a running pull, keeps
serving through an ACME outage, and reloads certificate files it was given. Clients that
must resolve `relay.test` themselves (skopeo, dockerd) get a private /etc/hosts in a
private mount namespace, so no name ever reaches the off-box resolver.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import httpx
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.infra import require_binary
from tests.infra.clients import DockerDaemon
from tests.infra.oci import BuiltImage
from tests.infra.pebble import Pebble, free_port
from tests.infra.relay import REPO_ROOT, RelayProcess
from vpsrelay import config
from vpsrelay.tls import contexts as tls, serving as tlsserver

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
DOMAIN = "relay.test"
CERT_TIMEOUT = 60.0


# --- helpers


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = CERT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def https_port(relay: RelayProcess) -> int:
    url = next(u for u in relay.urls if u.startswith("https://"))
    return int(url.rsplit(":", 1)[1])


def plain_url(relay: RelayProcess) -> str:
    return next(u for u in relay.urls if u.startswith("http://"))


def handshake(port: int, cafile: Path, host: str = "127.0.0.1") -> tuple[int, str | None]:
    """A fresh verified TLS connection as `relay.test`: the served serial and the ALPN."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=DOMAIN) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number, conn.selected_alpn_protocol()


def certificate_count(relay: RelayProcess) -> int:
    return relay.log_text().count("serving certificate serial=")


def acme_args(pebble: Pebble, data_dir: Path, *, challenge: str = "http-01") -> list[str]:
    return [
        "--domain", DOMAIN, "--acme-directory", pebble.directory_url,
        "--acme-ca-bundle", str(pebble.wfe_ca), "--challenge", challenge,
        "--data-dir", str(data_dir),
    ]  # fmt: skip


def vpsrelay_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def with_private_hosts(hosts: Path, argv: list[str]) -> list[str]:
    """Run argv with `hosts` bind-mounted over /etc/hosts in a private mount namespace."""
    require_binary("unshare")
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv,
    ]  # fmt: skip


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A data dir with a short path: the control socket lives there (107-byte limit)."""
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="vr-tls-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class AcmeRelay:
    def __init__(self, pebble: Pebble, relay: RelayProcess, data_dir: Path, root: Path) -> None:
        self.pebble, self.relay, self.data_dir, self.root = pebble, relay, data_dir, root
        self.port = https_port(relay)

    def cli_args(self) -> list[str]:
        listen = ["--http-listen", f"127.0.0.1:{self.pebble.http_port}"]
        return [*acme_args(self.pebble, self.data_dir), *listen]


@pytest.fixture(scope="module")
def acme_relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeRelay]:
    """pebble + a relay that got its certificate by HTTP-01 (HTTPS on a port-0 listener)."""
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("acme")
    data_dir = Path(tempfile.mkdtemp(prefix="vr-tls-", dir="/tmp"))
    pebble = Pebble(workdir / "pebble")
    try:
        relay = RelayProcess(
            workdir / "relay",
            *acme_args(pebble, data_dir),
            "--http-listen", f"127.0.0.1:{pebble.http_port}",
            "--https-listen", "127.0.0.1:0",
            "--upstream", f"docker.io={hub.registry_url}",
        )  # fmt: skip
        try:
            wait_for("the first certificate", lambda: certificate_count(relay) >= 1)
            yield AcmeRelay(pebble, relay, data_dir, pebble.write_root(workdir / "root.pem"))
        finally:
            relay.close()
    finally:
        pebble.close()
        shutil.rmtree(data_dir, ignore_errors=True)


# --- HTTP-01, h2, files, skopeo


def test_http01_certificate_is_served_with_h2_and_stored_like_certbot(
    acme_relay: AcmeRelay,
) -> None:
    serial, alpn = handshake(acme_relay.port, acme_relay.root)
    assert alpn == "h2"
    assert "answered an HTTP-01 validation" in acme_relay.relay.log_text()
    live = acme_relay.data_dir / "live" / DOMAIN
    leaf = x509.load_pem_x509_certificates((live / "fullchain.pem").read_bytes())[0]
    assert leaf.serial_number == serial
    assert (live / "cert.pem").read_bytes() in (live / "fullchain.pem").read_bytes()
    assert (live / "privkey.pem").stat().st_mode & 0o777 == 0o600
    (account_key,) = (acme_relay.data_dir / "acme" / "accounts").glob("*/private_key.json")
    assert account_key.stat().st_mode & 0o777 == 0o600

    # curl over h2, trusting only pebble's root: HSTS on TLS responses.
    port = acme_relay.port
    result = subprocess.run(
        ["curl", "-sS", "-i", "--http2", "--cacert", str(acme_relay.root),
         "--resolve", f"{DOMAIN}:{port}:127.0.0.1", f"https://{DOMAIN}:{port}/healthz"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert result.stdout.startswith("HTTP/2 200")
    assert "strict-transport-security: max-age=31536000" in result.stdout.lower()

    # The plain port: challenges only, everything else 308 to https; no HSTS there.
    plain = httpx.get(
        f"http://127.0.0.1:{acme_relay.pebble.http_port}/v2/alpine/tags/list?n=1",
        headers={"host": f"{DOMAIN}:{acme_relay.pebble.http_port}"},
    )
    assert plain.status_code == 308
    assert plain.headers["location"] == f"https://{DOMAIN}:{port}/v2/alpine/tags/list?n=1"
    assert "strict-transport-security" not in plain.headers
    missing = httpx.get(
        f"http://127.0.0.1:{acme_relay.pebble.http_port}/.well-known/acme-challenge/nope"
    )
    assert missing.status_code == 404

    # Readiness and metrics see the certificate in service.
    context = ssl.create_default_context(cafile=str(acme_relay.root))
    with httpx.Client(verify=context) as client:
        base = f"https://127.0.0.1:{port}"
        ready = client.get(
            f"{base}/readyz", headers={"host": DOMAIN}, extensions={"sni_hostname": DOMAIN}
        )
        assert ready.json()["checks"]["tls"] == "ok"
        metrics = client.get(
            f"{base}/metrics", headers={"host": DOMAIN}, extensions={"sni_hostname": DOMAIN}
        )
    expiry = [
        line for line in metrics.text.splitlines()
        if line.startswith("vpsrelay_certificate_expiry_timestamp_seconds")
    ]  # fmt: skip
    assert expiry, metrics.text[:500]
    assert abs(float(expiry[0].split()[-1]) - leaf.not_valid_after_utc.timestamp()) < 1

    status = vpsrelay_cli("cert", "status", *acme_relay.cli_args())
    assert status.returncode == 0, status.stderr
    assert "Pebble Intermediate CA" in status.stdout
    assert f"names:      {DOMAIN}" in status.stdout
    assert f"serial:     {serial:x}" in status.stdout


def test_skopeo_pulls_over_verified_https(
    acme_relay: AcmeRelay, clean_hub: Hub, tmp_path: Path
) -> None:
    require_binary("skopeo")
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    certs_dir = tmp_path / "certs"
    certs_dir.mkdir()
    shutil.copyfile(acme_relay.root, certs_dir / "ca.crt")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {DOMAIN}\n")
    registries = tmp_path / "registries.conf"
    registries.write_text("# no mirrors\n")

    def copy(cert_dir: Path) -> subprocess.CompletedProcess[str]:
        argv = [
            "skopeo", "copy", "--src-cert-dir", str(cert_dir), "--preserve-digests",
            f"docker://{DOMAIN}:{acme_relay.port}/library/alpine:latest",
            f"oci:{tmp_path / 'out'}:pulled",
        ]  # fmt: skip
        return subprocess.run(
            with_private_hosts(hosts, argv),
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(registries)},
        )  # fmt: skip

    # Verification is real: with only another CA to trust, the pull fails.
    other = tmp_path / "other"
    other.mkdir()
    trustme.CA().cert_pem.write_to_path(str(other / "ca.crt"))
    refused = copy(other)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr

    pulled = copy(certs_dir)
    assert pulled.returncode == 0, pulled.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for layer in image.layers:
        blob = tmp_path / "out" / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == layer.digest.split(":")[1]


# --- renewal under load, and an ACME outage


def test_forced_renewal_while_a_large_blob_streams(acme_relay: AcmeRelay, clean_hub: Hub) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    old_serial, _ = handshake(acme_relay.port, acme_relay.root)
    token = httpx.get(
        f"{plain_url(acme_relay.relay)}/token",
        params={"service": "registry.docker.io", "scope": "repository:library/big:pull"},
    ).json()["token"]
    context = ssl.create_default_context(cafile=str(acme_relay.root))
    sha = hashlib.sha256()
    received = 0
    with (
        httpx.Client(verify=context, http2=True, timeout=60) as client,
        client.stream(
            "GET",
            f"https://127.0.0.1:{acme_relay.port}/v2/big/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}", "host": f"{DOMAIN}:{acme_relay.port}"},
            extensions={"sni_hostname": DOMAIN},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        chunks = response.iter_raw(1 << 20)
        for _ in range(8):  # 8 MiB in, then renew while the rest waits
            chunk = next(chunks)
            sha.update(chunk)
            received += len(chunk)
        renewed = vpsrelay_cli("cert", "renew", "--force", *acme_relay.cli_args())
        assert renewed.returncode == 0, renewed.stderr
        assert renewed.stdout.startswith("renewed: serial ")
        new_serial, alpn = handshake(acme_relay.port, acme_relay.root)
        assert new_serial != old_serial
        assert f"serial {new_serial:x}" in renewed.stdout
        assert alpn == "h2"
        for chunk in chunks:
            sha.update(chunk)
            received += len(chunk)
    assert received == layer.size
    assert f"sha256:{sha.hexdigest()}" == layer.digest
    stored = (acme_relay.data_dir / "live" / DOMAIN / "cert.pem").read_bytes()
    assert x509.load_pem_x509_certificate(stored).serial_number == new_serial


def test_acme_outage_keeps_the_old_certificate(acme_relay: AcmeRelay) -> None:
    serial, _ = handshake(acme_relay.port, acme_relay.root)
    acme_relay.pebble.stop()
    try:
        failed = vpsrelay_cli("cert", "renew", "--force", *acme_relay.cli_args())
        assert failed.returncode == 1
        assert "renewal failed: cannot reach the ACME server" in failed.stderr
        assert handshake(acme_relay.port, acme_relay.root) == (serial, "h2")
        assert httpx.get(f"{plain_url(acme_relay.relay)}/healthz").status_code == 200
    finally:
        # A new pebble root; the certificate served still chains to `acme_relay.root`.
        acme_relay.pebble.start()


def _due_certificate(live: Path) -> int:
    """A stored certificate for relay.test with 1 of its 90 days left: renewal is due."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=89))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    live.mkdir(parents=True)
    (live / "fullchain.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (live / "privkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert.serial_number


async def test_renewal_backs_off_while_the_ca_is_down(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """pebble stopped: attempts at 0, 60, 180, 420 s of the (mock) clock; the certificate
    being served stays."""
    # Jump only when everything has been idle for a moment of real time, so the ACME
    # attempt running in a worker thread is never skipped over.
    mock_clock.autojump_threshold = 0.2
    pebble = Pebble(tmp_path / "pebble")
    try:
        pebble.stop()
        settings = config.load(
            None,
            {},
            {
                "data_dir": str(tmp_path / "data"),
                "tls.domains": [DOMAIN],
                "tls.acme_directory": pebble.directory_url,
                "tls.acme_ca_bundle": str(pebble.wfe_ca),
            },
        )
        serial = _due_certificate(tmp_path / "data" / "live" / DOMAIN)
        state = tls.TLSState()
        renewer = tlsserver.Renewer(settings, state)
        assert renewer.load_existing() is not None
        started = trio.current_time()
        with trio.move_on_after(60 + 120 + 240 + 30):
            await renewer.run()
        assert [round(t - started, 3) for t in renewer.attempts] == [0, 60, 180, 420]
        assert renewer.failures == 4
        assert state.info is not None
        assert state.info.serial == serial
    finally:
        pebble.close()


# --- TLS-ALPN-01


def test_tls_alpn01_certificate_on_the_tls_port(tmp_path: Path, short_dir: Path) -> None:
    tls_port = free_port()
    # Nothing listens on pebble's HTTP-01 port: only TLS-ALPN-01 can succeed.
    with (
        Pebble(tmp_path / "pebble", tls_port=tls_port) as pebble,
        RelayProcess(
            tmp_path / "relay",
            *acme_args(pebble, short_dir, challenge="tls-alpn-01"),
            "--https-listen", f"127.0.0.1:{tls_port}",
            "--http-listen", "127.0.0.1:0",
        ) as relay,
    ):  # fmt: skip
        wait_for("the certificate", lambda: certificate_count(relay) >= 1)
        root = pebble.write_root(tmp_path / "root.pem")
        serial, alpn = handshake(tls_port, root)
        assert alpn == "h2"
        assert "answering a TLS-ALPN-01 validation for relay.test" in relay.log_text()
        assert "HTTP-01" not in relay.log_text().replace("ACME HTTP-01 answers", "")
        leaf = (short_dir / "live" / DOMAIN / "cert.pem").read_bytes()
        assert x509.load_pem_x509_certificate(leaf).serial_number == serial
        # A client offering only acme-tls/1 with no challenge pending gets the real
        # certificate (verified against pebble's root) and no application protocol.
        context = ssl.create_default_context(cafile=str(root))
        context.set_alpn_protocols(["acme-tls/1"])
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=DOMAIN) as conn,
        ):
            assert conn.selected_alpn_protocol() is None
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            assert x509.load_der_x509_certificate(der).serial_number == serial


# --- your own files


def _write_pair(ca: trustme.CA, cert_file: Path, key_file: Path) -> int:
    leaf = ca.issue_cert(DOMAIN)
    key_tmp, cert_tmp = key_file.with_suffix(".tmp-key"), cert_file.with_suffix(".tmp-cert")
    leaf.private_key_pem.write_to_path(str(key_tmp))
    cert_tmp.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    os.replace(key_tmp, key_file)
    os.replace(cert_tmp, cert_file)
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def test_own_certificate_files_switch_without_restart(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    first = _write_pair(ca, cert_file, key_file)
    with RelayProcess(
        tmp_path / "relay",
        "--cert", str(cert_file), "--key", str(key_file),
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
    ) as relay:  # fmt: skip
        port = https_port(relay)
        assert handshake(port, ca_file) == (first, "h2")
        pid = relay.process.pid

        second = _write_pair(ca, cert_file, key_file)  # picked up by the file watch
        wait_for("the replaced files", lambda: handshake(port, ca_file)[0] == second, 15)

        third = _write_pair(ca, cert_file, key_file)
        relay.process.send_signal(signal.SIGHUP)  # at once, without waiting for the poll
        wait_for("the SIGHUP reload", lambda: handshake(port, ca_file)[0] == third, 15)
        assert relay.process.pid == pid
        assert relay.process.poll() is None

        status = vpsrelay_cli("cert", "status", "--cert", str(cert_file), "--key", str(key_file))
        assert status.returncode == 0, status.stderr
        assert f"serial:     {third:x}" in status.stdout


def test_own_certificate_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert_file, key_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    _write_pair(ca, cert_file, key_file)
    key_file.write_bytes(ca.issue_cert("other.test").private_key_pem.bytes())
    result = vpsrelay_cli(
        "serve", "--cert", str(cert_file), "--key", str(key_file), "--listen", "127.0.0.1:0",
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
        "--data-dir", str(tmp_path / "data"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("vpsrelay: cannot load ")
    assert "Traceback" not in result.stderr


# --- dockerd, verified TLS over ::1


@pytest.mark.clients
def test_dockerd_pulls_through_the_relay_over_verified_tls(
    acme_relay: AcmeRelay, clean_hub: Hub, tmp_path: Path
) -> None:
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    port = acme_relay.port
    mirror = f"https://{DOMAIN}:{port}"
    # relay.test is ::1 inside dockerd's namespaces: 127.0.0.0/8 would be an "insecure
    # registry" to dockerd, which then skips certificate verification.
    with DockerDaemon(
        tmp_path / "dockerd", forward_ports=[], mirrors=[mirror], hosts={DOMAIN: "::1"}
    ) as dockerd:
        dockerd.forward(port, ipv6=True)
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        dockerd.add_registry_ca(f"{DOMAIN}:{port}", other)
        mark = len(acme_relay.relay.log_text())
        refused = dockerd.docker("pull", "alpine", check=False)
        assert refused.returncode != 0
        log = dockerd.log_path.read_text(errors="replace")
        assert "x509: certificate signed by unknown authority" in log, log[-3000:]
        assert "/v2/library/alpine/manifests" not in acme_relay.relay.log_text()[mark:]

        dockerd.add_registry_ca(f"{DOMAIN}:{port}", acme_relay.root)
        dockerd.docker("pull", "alpine")
        image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", "alpine").stdout
        assert image_id.strip() == image.config.digest
        lines = acme_relay.relay.log_text()[mark:]
        assert 'path="/v2/library/alpine/manifests/latest"' in lines


async def test_a_certificate_from_another_ca_is_replaced_at_once(tmp_path: Path) -> None:
    """Moving from staging to production: the stored certificate is not due, but came from
    another directory, so a new one is ordered; once it is from this CA, nothing happens."""
    with Pebble(tmp_path / "pebble", always_valid=True) as pebble:
        settings = config.load(
            None,
            {},
            {
                "data_dir": str(tmp_path / "data"),
                "tls.domains": [DOMAIN],
                "tls.acme_directory": pebble.directory_url,
                "tls.acme_ca_bundle": str(pebble.wfe_ca),
            },
        )
        live = tmp_path / "data" / "live" / DOMAIN
        _due_certificate(live)
        (live / "acme-directory").write_text(config.ACME_DIRECTORY_ALIASES["staging"] + "\n")
        state = tls.TLSState()
        renewer = tlsserver.Renewer(
            settings, state, now=lambda: datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
        )
        assert renewer.load_existing() is not None
        # Not due by its dates (the injected clock is long before notAfter)...
        renewed = await renewer.check()
        # ...but it came from staging.
        assert renewed is not None
        assert "Pebble Intermediate CA" in renewed.issuer
        assert (live / "acme-directory").read_text().strip() == pebble.directory_url
        assert await renewer.check() is None
        assert len(renewer.attempts) == 1


def test_external_account_binding(tmp_path: Path, short_dir: Path) -> None:
    """A CA that requires EAB (pebble with externalAccountBindingRequired): refused without
    the binding, with the CA's own error in the log; issued with it."""
    hmac_key = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    http_port = free_port()
    with Pebble(tmp_path / "pebble", http_port=http_port, eab_keys={"kid-1": hmac_key}) as pebble:
        common = (
            *acme_args(pebble, short_dir), "--http-listen", f"127.0.0.1:{http_port}",
            "--https-listen", "127.0.0.1:0",
        )  # fmt: skip
        with RelayProcess(tmp_path / "without", *common) as relay:
            wait_for("the CA's refusal", lambda: "externalAccount" in relay.log_text())
            assert certificate_count(relay) == 0
        env = {"VPSRELAY_TLS__EAB_KID": "kid-1", "VPSRELAY_TLS__EAB_HMAC_KEY": hmac_key}
        with RelayProcess(tmp_path / "with", *common, env=env) as relay:
            wait_for("the certificate", lambda: certificate_count(relay) >= 1)
            root = pebble.write_root(tmp_path / "root.pem")
            serial, _ = handshake(https_port(relay), root)
            leaf = (short_dir / "live" / DOMAIN / "cert.pem").read_bytes()
            assert x509.load_pem_x509_certificate(leaf).serial_number == serial
            assert hmac_key not in relay.log_text()
