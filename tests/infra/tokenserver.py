"""A Docker-Hub-like token server (auth.docker.io stand-in) in a background thread.

``GET /token?service=..&scope=..&scope=..[&account=..][&offline_token=true]`` with optional
Basic credentials, and ``POST /token`` (OAuth2 form: ``grant_type=password|refresh_token``),
answer RS256 JWTs that Distribution 2.8 accepts: the signing certificate travels in the JWT
``x5c`` header and the same certificate is Distribution's ``auth.token.rootcertbundle``.

Policy (Docker Hub-like): anonymous -> ``pull`` on every repository not under ``private/``;
``alice``/``wonderland`` -> ``pull`` everywhere; users in ``push_users`` also get ``push`` and
``delete`` (as an account owner does on Docker Hub).  Other requested actions are dropped;
denied resources stay in ``access`` with an empty ``actions`` list, as Docker Hub does.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import secrets
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.infra._http import (
    BaseHandler,
    LoggedRequest,
    QuietThreadingHTTPServer,
    RequestLog,
    serve_in_thread,
    stop_server,
)

if TYPE_CHECKING:
    from pathlib import Path

ALICE_USER = "alice"
ALICE_PASSWORD = "wonderland"
ALICE = (ALICE_USER, ALICE_PASSWORD)
SERVICE = "registry.docker.io"
ISSUER = "auth.docker.io"
PRIVATE_PREFIXES = ("private/",)


def _make_signer() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vpsrelay test token signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/alpine:pull,push`` -> (type, name, actions); names may hold ':'."""
    rtype, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not rtype or not name:
        return None
    return rtype, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Threaded token server on 127.0.0.1:<ephemeral>. Use ``close()`` (or ``with``)."""

    def __init__(
        self,
        cert_dir: Path,
        *,
        users: dict[str, str] | None = None,
        issuer: str = ISSUER,
        expires_in: int = 300,
        realm_query: str = "",
    ) -> None:
        self.issuer = issuer
        # A query the realm carries (``account=x``): every token request must bring it back.
        self.realm_query = realm_query
        self.expires_in = expires_in
        # Distribution accepts a token until 60 s past its `exp` (its clock-skew leeway);
        # `leeway = 60` makes `expires_in` the lifetime the registry really grants.
        self.leeway = 0
        self.users: dict[str, str] = dict(
            users if users is not None else {ALICE_USER: ALICE_PASSWORD}
        )
        self.private_prefixes: tuple[str, ...] = PRIVATE_PREFIXES
        self.push_users: set[str] = set()  # granted push and delete too (tests that need it)
        self.log = RequestLog()
        self._lock = threading.Lock()
        self._refresh_tokens: dict[str, str] = {}
        self._failures: list[int] = []
        self.issued: list[dict[str, Any]] = []  # decoded claims of every JWT handed out

        self._key, self.cert = _make_signer()
        cert_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = cert_dir / "token-signer.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]

        owner = self

        class Handler(BaseHandler):
            def do_GET(self) -> None:
                owner._handle(self, "GET")

            def do_POST(self) -> None:
                owner._handle(self, "POST")

        self._server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.realm = f"{self.url}/token" + (f"?{realm_query}" if realm_query else "")
        self._thread = serve_in_thread(self._server, "tokenserver")

    # -- public helpers -------------------------------------------------------------------

    def requests(self) -> list[LoggedRequest]:
        return self.log.snapshot()

    def clear(self) -> None:
        self.log.clear()
        with self._lock:
            self.issued.clear()

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        """Answer the next ``count`` token requests with ``status`` (for error-path tests)."""
        with self._lock:
            self._failures.extend([status] * count)

    def issue(self, subject: str, service: str, scopes: list[str]) -> tuple[str, dict[str, Any]]:
        """Mint a token as the endpoint would for ``subject`` ("" = anonymous)."""
        now = int(time.time())
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, actions = parsed
            access.append(
                {"type": rtype, "name": name, "actions": self._grant(subject, rtype, name, actions)}
            )
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": service,
            "exp": now + self.expires_in - self.leeway,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"x5c": self._x5c})
        with self._lock:
            self.issued.append(claims)
        return token, claims

    def close(self) -> None:
        stop_server(self._server, self._thread)

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _grant(self, subject: str, rtype: str, name: str, actions: list[str]) -> list[str]:
        if rtype != "repository":
            return []
        allowed = {"pull"}
        if subject and subject in self.push_users:
            allowed |= {"push", "delete"}
        if not subject and name.startswith(self.private_prefixes):
            allowed = set()
        return [a for a in actions if a in allowed]

    def _check_user(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected, password)

    def _handle(self, h: BaseHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length > 0 else b""
        self.log.append(
            LoggedRequest(
                method=method,
                path=h.path,
                headers=h.headers_dict(),
                body=body,
                client=(h.client_address[0], h.client_address[1]),
            )
        )
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            _send_json(h, failure, {"details": "injected failure"})
            return
        url = urllib.parse.urlsplit(h.path)
        if url.path != "/token":
            _send_json(h, 404, {"details": "not found"})
            return
        sent = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        for pair in urllib.parse.parse_qsl(self.realm_query, keep_blank_values=True):
            if pair not in sent:  # the realm's own query was dropped or mangled
                _send_json(h, 400, {"details": f"realm query parameter missing: {pair[0]}"})
                return
        if method == "GET":
            self._handle_get(h, urllib.parse.parse_qs(url.query))
        else:
            form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
            self._handle_post(h, form)

    def _handle_get(self, h: BaseHandler, q: dict[str, list[str]]) -> None:
        subject = ""
        auth = h.headers.get("Authorization")
        if auth:
            creds = _parse_basic(auth)
            if creds is None or not self._check_user(*creds):
                _send_json(h, 401, {"details": "incorrect username or password"})
                return
            subject = creds[0]
        service = q.get("service", [SERVICE])[0]
        scopes = _split_scopes(q.get("scope", []))
        token, claims = self.issue(subject, service, scopes)
        reply = self._reply(token, claims)
        if subject and q.get("offline_token", ["false"])[0].lower() == "true":
            reply["refresh_token"] = self._new_refresh(subject)
        _send_json(h, 200, reply)

    def _handle_post(self, h: BaseHandler, form: dict[str, list[str]]) -> None:
        def field(name: str) -> str:
            return form.get(name, [""])[0]

        grant = field("grant_type")
        if grant == "password":
            subject = field("username")
            if not self._check_user(subject, field("password")):
                _send_json(
                    h, 401, {"error": "invalid_grant", "details": "incorrect username or password"}
                )
                return
            refresh = self._new_refresh(subject) if field("access_type") == "offline" else None
        elif grant == "refresh_token":
            refresh = field("refresh_token")
            with self._lock:
                known = self._refresh_tokens.get(refresh)
            if known is None:
                _send_json(h, 401, {"error": "invalid_grant", "details": "unknown refresh token"})
                return
            subject = known
        else:
            _send_json(h, 400, {"error": "unsupported_grant_type"})
            return
        scopes = _split_scopes(form.get("scope", []))
        token, claims = self.issue(subject, field("service") or SERVICE, scopes)
        reply = self._reply(token, claims)
        reply["scope"] = " ".join(scopes)
        if refresh is not None:
            reply["refresh_token"] = refresh
        _send_json(h, 200, reply)

    def _reply(self, token: str, claims: dict[str, Any]) -> dict[str, Any]:
        issued = dt.datetime.fromtimestamp(claims["iat"], dt.UTC)
        return {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued.isoformat().replace("+00:00", "Z"),
        }

    def _new_refresh(self, subject: str) -> str:
        tok = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[tok] = subject
        return tok


def _split_scopes(values: list[str]) -> list[str]:
    return [s for v in values for s in v.split(" ") if s]


def _parse_basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def _send_json(h: BaseHandler, status: int, obj: object) -> None:
    data = json.dumps(obj).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    if status == 401:
        h.send_header("WWW-Authenticate", 'Basic realm="vpsrelay test token server"')
    h.end_headers()
    h.wfile.write(data)
