"""Debian's `pebble` ACME test CA on loopback, with `pebble-challtestsrv` as its DNS.

Debian ships no certificate for pebble's own HTTPS endpoint (the WFE), so one is made
here with `cryptography`. Every name resolves to 127.0.0.1 through challtestsrv, so the
relay under test can get a certificate for `relay.test` without touching /etc/hosts or
the off-box resolver. pebble's VA connects to `http_port` (HTTP-01) and `tls_port`
(TLS-ALPN-01) on 127.0.0.1: the relay under test must listen there.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from typing import IO, TYPE_CHECKING

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.infra.binaries import require_binary

if TYPE_CHECKING:
    from pathlib import Path

START_TIMEOUT = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (pebble and the VA ports need fixed numbers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write_wfe_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost; returns (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vpsrelay test pebble WFE CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "wfe-ca.pem",
        directory / "wfe.pem",
        directory / "wfe.key",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


class Pebble:
    """pebble + pebble-challtestsrv; `close()` (or `with`) stops both.

    Attributes:
        directory_url: the ACME directory, `https://127.0.0.1:P/dir`.
        wfe_ca: PEM file to trust for the ACME API (`REQUESTS_CA_BUNDLE`, `acme_ca_root`).
        http_port, tls_port: where pebble's VA connects for HTTP-01 / TLS-ALPN-01.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        http_port: int | None = None,
        tls_port: int | None = None,
        always_valid: bool = False,
        eab_keys: dict[str, str] | None = None,
    ) -> None:
        self.pebble_binary = require_binary("pebble")
        self.challtestsrv_binary = require_binary("pebble-challtestsrv")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port or free_port()
        self.tls_port = tls_port or free_port()
        self.always_valid = always_valid
        self.wfe_ca, cert, key = _write_wfe_certificate(workdir)
        self.dns_port = free_port()
        self.port = free_port()
        self.management_port = free_port()
        config: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(eab_keys),
        }
        if eab_keys:
            config["externalAccountMACKeys"] = eab_keys
        self.config_path = workdir / "pebble-config.json"
        self.config_path.write_text(json.dumps({"pebble": config}))
        self.log_path = workdir / "pebble.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self.dns: subprocess.Popen[bytes] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.directory_url = f"https://127.0.0.1:{self.port}/dir"
        try:
            self._start_dns()
            self.start()
        except BaseException:
            self.close()
            raise

    def _start_dns(self) -> None:
        # Every A query answers 127.0.0.1, no AAAA; its own challenge servers are off.
        self.dns = subprocess.Popen(
            [
                self.challtestsrv_binary, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
                "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def start(self) -> None:
        """Start pebble (again, after `stop()`); waits until its directory answers."""
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        if self.always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        self.process = subprocess.Popen(
            [self.pebble_binary, "-config", str(self.config_path),
             "-dnsserver", f"127.0.0.1:{self.dns_port}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pebble exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                httpx.get(
                    self.directory_url, verify=self.wfe_context(), timeout=2
                ).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"pebble did not answer within {START_TIMEOUT}s")

    def wfe_context(self) -> ssl.SSLContext:
        """A TLS context that trusts pebble's ACME API (not the certificates it issues)."""
        return ssl.create_default_context(cafile=str(self.wfe_ca))

    def root_pem(self) -> bytes:
        """The issuing root; pebble makes a new one at every start."""
        response = httpx.get(
            f"https://127.0.0.1:{self.management_port}/roots/0",
            verify=self.wfe_context(),
            timeout=5,
        )
        response.raise_for_status()
        return response.content

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root_pem())
        return path

    def stop(self) -> None:
        """Stop pebble only (an ACME outage); `start()` brings it back with a new root."""
        _terminate(self.process)
        self.process = None

    def close(self) -> None:
        _terminate(self.process)
        _terminate(self.dns)
        self.process = self.dns = None
        self._log.close()

    def __enter__(self) -> Pebble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
