"""TLS contexts that can change under a running server, and the plain-HTTP port.

Hypercorn builds its `SSLContext` once. vpsrelay gives it a *front* context that
holds no certificate: its SNI callback, which OpenSSL runs for every handshake
(with or without SNI), moves the connection to the context of the moment:

* the current certificate's context, rebuilt whenever the certificate changes, so a
  renewed certificate serves the next handshake while established connections keep
  the context they started with (nothing is dropped);
* for an ACME TLS-ALPN-01 validation (RFC 8737: SNI is the domain, ALPN offers only
  `acme-tls/1`), a context with the challenge certificate and `acme-tls/1` as its
  only protocol. The SNI callback cannot see the client's ALPN list, so the front
  context's message callback reads the ClientHello first (`core.clienthello`).
  Hypercorn treats the `acme-tls/1` connection as HTTP/1.1; the CA closes it after
  the handshake.

Before the first certificate exists every other handshake is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import inspect
import logging
import os
import signal
import ssl
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vpsrelay.core import acme_http, clienthello
from vpsrelay.exchange import serve_lifespan
from vpsrelay.tls import certs, challenge_files

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping
    from pathlib import Path

    from vpsrelay.exchange import Message, Receive, Send
    from vpsrelay.tls.challenge_files import ChallengeFiles

    ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

log = logging.getLogger("vpsrelay.tls")

ALPN = ["h2", "http/1.1"]
# TLS 1.2 suites: forward secrecy and AEAD only (Mozilla's "intermediate" list);
# TLS 1.3 suites are OpenSSL's defaults, all of them modern.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
HSTS_HEADER = ("strict-transport-security", "max-age=31536000")
# RFC 8737 §3: id-pe-acmeIdentifier, a critical extension holding SHA-256(key authorization).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
HANDSHAKE = 22  # TLS ContentType


def client_hello_hook_available() -> bool:
    """CPython's private TLS message hook, `SSLContext._msg_callback` (a property over the C
    context's own since 3.8): the one reach into CPython's internals, gated in
    `vpsrelay.patches` and its source pinned by tests/test_library_patches.py."""
    hook = inspect.getattr_static(ssl.SSLContext, "_msg_callback", None)
    return isinstance(hook, property) and hook.fset is not None


def _base_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def serving_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A context with the relay's certificate, speaking h2 and HTTP/1.1.

    Raises:
        ssl.SSLError, OSError: unreadable files, or a key that does not match.
    """
    context = _base_context()
    context.set_alpn_protocols(ALPN)
    context.load_cert_chain(cert_file, key_file)
    return context


def _context_from_pem(cert_pem: bytes, key_pem: bytes, alpn: list[str]) -> ssl.SSLContext:
    # `ssl` loads certificates from files only: a private temporary directory, gone at once.
    context = _base_context()
    context.set_alpn_protocols(alpn)
    with tempfile.TemporaryDirectory(prefix="vpsrelay-tls-") as directory:
        cert_path, key_path = f"{directory}/cert.pem", f"{directory}/key.pem"
        with open(cert_path, "wb") as file:
            file.write(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context


def challenge_context(domain: str, key_authorization: str) -> ssl.SSLContext:
    """RFC 8737 §3: a self-signed certificate for `domain` with the acmeIdentifier
    extension, offered only to `acme-tls/1` handshakes."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        # DER: OCTET STRING (0x04), length 32, the digest.
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    return _context_from_pem(cert_pem, key_pem, [clienthello.ACME_TLS_ALPN])


@dataclass(frozen=True, slots=True)
class Loaded:
    info: certs.CertificateInfo
    cert_file: Path
    key_file: Path


# How long after its last change the challenge directory's mtime is trusted (see
# `TLSState._tls_alpn01_pending`): far more than any filesystem's timestamp tick.
_SETTLED_NS = 2_000_000_000


class TLSState:
    """The certificate being served and the pending ACME challenges (a `certs.ChallengeSink`).

    Challenges are added from the ACME worker thread; the SNI callback and the
    port-80 app read them on the Trio thread. With `shared` (the workers of a supervised
    relay, and their supervisor) they are files every process reads instead.
    """

    def __init__(self, shared: ChallengeFiles | None = None) -> None:
        self.shared = shared
        self._shared_contexts: dict[tuple[str, str], ssl.SSLContext] = {}
        self._alpn01_listing: tuple[int, bool] | None = None  # (directory mtime, pending)
        self._lock = threading.Lock()
        self._current: ssl.SSLContext | None = None
        self.loaded: Loaded | None = None
        self._http01: dict[str, str] = {}
        self._tls_alpn01: dict[str, ssl.SSLContext] = {}
        self._acme_handshakes: weakref.WeakSet[Any] = weakref.WeakSet()
        self.front = self._front_context()
        # Told the certificate's not-after (Unix time) whenever one is put in service.
        self.on_install: Callable[[float], None] | None = None

    def _front_context(self) -> ssl.SSLContext:
        context = _base_context()
        context.set_alpn_protocols(ALPN)
        context.sni_callback = self._on_sni
        # A private hook (see `client_hello_hook_available`): it sees the raw ClientHello
        # before OpenSSL calls the SNI callback. Without it only TLS-ALPN-01 is lost.
        if client_hello_hook_available():
            context._msg_callback = self._on_message  # type: ignore[attr-defined]
        return context

    # --- certificates

    def install(self, cert_file: Path, key_file: Path) -> certs.CertificateInfo:
        """Serve this certificate to every new handshake from now on.

        Raises:
            ssl.SSLError, OSError, ValueError: unreadable files or a key that does not match;
                the certificate served so far stays.
        """
        context = serving_context(cert_file, key_file)
        info = certs.describe(cert_file.read_bytes())
        with self._lock:
            self._current = context
            self.loaded = Loaded(info, cert_file, key_file)
        if self.on_install is not None:
            self.on_install(info.validity.not_after.timestamp())
        log.info(
            "serving certificate serial=%x names=%s issuer=%r not_after=%s",
            info.serial,
            ",".join(info.names),
            info.issuer,
            info.validity.not_after.isoformat(),
        )
        return info

    @property
    def info(self) -> certs.CertificateInfo | None:
        return self.loaded.info if self.loaded else None

    # --- the ChallengeSink protocol (called from the ACME thread)

    def add_http01(self, token: str, key_authorization: str) -> None:
        if self.shared is not None:
            self.shared.put(challenge_files.HTTP01, token, key_authorization)
            return
        with self._lock:
            self._http01[token] = key_authorization

    def remove_http01(self, token: str) -> None:
        if self.shared is not None:
            self.shared.remove(challenge_files.HTTP01, token)
            return
        with self._lock:
            self._http01.pop(token, None)

    def add_tls_alpn01(self, domain: str, key_authorization: str) -> None:
        if self.shared is not None:
            self.shared.put(challenge_files.TLS_ALPN01, domain.lower(), key_authorization)
            return
        context = challenge_context(domain.lower(), key_authorization)
        with self._lock:
            self._tls_alpn01[domain.lower()] = context

    def remove_tls_alpn01(self, domain: str) -> None:
        if self.shared is not None:
            self.shared.remove(challenge_files.TLS_ALPN01, domain.lower())
            return
        with self._lock:
            self._tls_alpn01.pop(domain.lower(), None)

    def http01_tokens(self) -> dict[str, str]:
        if self.shared is not None:
            return self.shared.pending(challenge_files.HTTP01)
        with self._lock:
            return dict(self._http01)

    def _tls_alpn01_pending(self) -> bool:
        """Asked on every ClientHello: with `shared`, a stat of the challenge directory, and
        a listing only when it changed since the last one (an ACME order, a few a year)."""
        if self.shared is None:
            return bool(self._tls_alpn01)
        try:
            changed = os.stat(self.shared.root / challenge_files.TLS_ALPN01).st_mtime_ns
        except FileNotFoundError:
            return False
        if self._alpn01_listing is not None and self._alpn01_listing[0] == changed:
            return self._alpn01_listing[1]
        pending = self.shared.any_pending(challenge_files.TLS_ALPN01)
        # A change within the same mtime tick as this listing would leave the mtime as it
        # is: a listing counts for later handshakes only once the directory has settled.
        settled = time.time_ns() - changed > _SETTLED_NS
        self._alpn01_listing = (changed, pending) if settled else None
        return pending

    def _tls_alpn01_context(self, domain: str) -> ssl.SSLContext | None:
        if self.shared is None:
            return self._tls_alpn01.get(domain)
        key_authorization = self.shared.get(challenge_files.TLS_ALPN01, domain)
        if key_authorization is None:
            return None
        key = (domain, key_authorization)
        if key not in self._shared_contexts:
            self._shared_contexts.clear()  # one order at a time: older ones are done
            self._shared_contexts[key] = challenge_context(domain, key_authorization)
        return self._shared_contexts[key]

    # --- OpenSSL callbacks (Trio thread, inside the handshake)

    def _on_message(
        self,
        connection: Any,
        direction: str,
        _version: object,
        content_type: object,
        _message_type: object,
        data: bytes,
    ) -> None:
        if (
            direction == "read"
            and content_type == HANDSHAKE
            and data[:1] == b"\x01"
            and self._tls_alpn01_pending()
            and clienthello.wants_acme_challenge(data)
        ):
            self._acme_handshakes.add(connection)

    def _on_sni(
        self, connection: Any, server_name: str | None, _context: ssl.SSLContext
    ) -> int | None:
        if connection in self._acme_handshakes and server_name:
            challenge = self._tls_alpn01_context(server_name.lower())
            if challenge is not None:
                log.info("answering a TLS-ALPN-01 validation for %s", server_name)
                connection.context = challenge
                return None
        current = self._current
        if current is None:
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE  # no certificate yet
        connection.context = current
        return None


# --- ASGI: HSTS on TLS responses, and the plain-HTTP port


class HSTS:
    """Adds Strict-Transport-Security to responses sent over TLS (RFC 6797 §7.2: never over
    plain HTTP)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("scheme") != "https":
            await self.app(scope, receive, send)
            return

        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                name, value = HSTS_HEADER
                message["headers"] = [*message.get("headers", []), (name.encode(), value.encode())]
            await send(message)

        await self.app(scope, receive, send_with_hsts)


class PlainPort:
    """Port 80: ACME HTTP-01 answers from the relay's own pending challenges, else a 308
    to https."""

    def __init__(self, state: TLSState, https_port: int) -> None:
        self.state = state
        self.https_port = https_port

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        host = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"), None
        )
        method = scope["method"].upper()
        answer = acme_http.answer(method, target, host, self.https_port, self.state.http01_tokens())
        if answer.status == 200:
            log.info("answered an HTTP-01 validation for %s", host)
        headers = [(k.encode(), v.encode("latin-1")) for k, v in answer.headers]
        headers.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        body = b"" if method == "HEAD" else answer.body
        await send({"type": "http.response.body", "body": body, "more_body": False})


# --- your own certificate files: reload when they change, or on SIGHUP


def _signature(*paths: Path) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in (p.stat() for p in paths))
    except OSError:
        return None


async def watch_files(
    state: TLSState, cert_file: Path, key_file: Path, interval: float = 2.0
) -> None:
    """Reload `cert_file`/`key_file` when they change (polled) or on SIGHUP.

    A half-replaced pair (a new certificate with the old key) fails to load; the
    old certificate is kept and the next poll tries again.
    """
    seen = _signature(cert_file, key_file)
    failed_for: object = None
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        while True:
            hangup = False
            with trio.move_on_after(interval):
                await hangups.__anext__()
                hangup = True
            now = _signature(cert_file, key_file)
            if not hangup and (now == seen or now is None):
                continue
            try:
                state.install(cert_file, key_file)
                seen, failed_for = now, None
            except (ssl.SSLError, OSError, ValueError) as exc:
                if failed_for != now or hangup:
                    log.warning(
                        "cannot load %s / %s, still serving the previous certificate: %s",
                        cert_file,
                        key_file,
                        exc,
                    )
                failed_for = now
