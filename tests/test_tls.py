"""TLS contexts that switch per handshake: real OpenSSL handshakes over memory BIOs."""

from __future__ import annotations

import hashlib
import ssl
from typing import TYPE_CHECKING, Any

import pytest
import trustme
from cryptography import x509

from vpsrelay.tls import contexts as tls

if TYPE_CHECKING:
    from pathlib import Path


def handshake(
    state: tls.TLSState, alpn: list[str], server_name: str | None, ca: trustme.CA | None = None
) -> ssl.SSLObject:
    """Client and server SSLObjects talking through memory BIOs until the handshake ends."""
    client_context = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(client_context)
    else:
        client_context.check_hostname = False
        client_context.verify_mode = ssl.CERT_NONE
    client_context.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = state.front.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def install(state: tls.TLSState, ca: trustme.CA, tmp_path: Path, name: str = "relay.test") -> int:
    leaf = ca.issue_cert(name)
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return state.install(cert, key).serial


def peer(client: ssl.SSLObject) -> x509.Certificate:
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_private_message_callback_exists() -> None:
    # TLS-ALPN-01 reads the ClientHello through it; a Python without it must fail loudly.
    assert hasattr(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "_msg_callback")


def test_no_certificate_yet_refuses_the_handshake() -> None:
    with pytest.raises(ssl.SSLError, match=r"CALLBACK_FAILED|HANDSHAKE_FAILURE"):
        handshake(tls.TLSState(), ["h2"], "relay.test")


def test_the_current_certificate_serves_new_handshakes(ca: trustme.CA, tmp_path: Path) -> None:
    state = tls.TLSState()
    first = install(state, ca, tmp_path)
    old = handshake(state, ["h2", "http/1.1"], "relay.test", ca)
    assert old.selected_alpn_protocol() == "h2"
    assert peer(old).serial_number == first
    assert old.version() in ("TLSv1.2", "TLSv1.3")
    second = install(state, ca, tmp_path)
    assert peer(handshake(state, ["http/1.1"], "relay.test", ca)).serial_number == second
    assert peer(handshake(state, ["h2"], None)).serial_number == second  # no SNI at all
    assert peer(old).serial_number == first  # an established connection keeps its own


def test_tls12_is_the_floor(ca: trustme.CA, tmp_path: Path) -> None:
    state = tls.TLSState()
    install(state, ca, tmp_path)
    assert state.front.minimum_version == ssl.TLSVersion.TLSv1_2
    assert "ECDHE" in tls.CIPHERS
    assert "CBC" not in tls.CIPHERS


def test_tls_alpn01_validation_gets_the_challenge_certificate(
    ca: trustme.CA, tmp_path: Path
) -> None:
    state = tls.TLSState()
    real = install(state, ca, tmp_path)
    state.add_tls_alpn01("Relay.Test", "token.thumbprint")
    validation = handshake(state, ["acme-tls/1"], "relay.test")
    assert validation.selected_alpn_protocol() == "acme-tls/1"
    certificate = peer(validation)
    extension = certificate.extensions.get_extension_for_oid(tls.ACME_IDENTIFIER_OID)
    assert extension.critical
    assert isinstance(extension.value, x509.UnrecognizedExtension)
    digest = hashlib.sha256(b"token.thumbprint").digest()
    assert extension.value.value == b"\x04\x20" + digest
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["relay.test"]

    # Ordinary clients of the same name, meanwhile, get the real certificate.
    assert peer(handshake(state, ["h2", "http/1.1"], "relay.test", ca)).serial_number == real
    # Another name asking for acme-tls/1 gets no challenge certificate.
    other = handshake(state, ["acme-tls/1"], "other.test")
    assert peer(other).serial_number == real
    state.remove_tls_alpn01("relay.test")
    assert peer(handshake(state, ["acme-tls/1"], "relay.test")).serial_number == real


def test_http01_tokens_are_a_snapshot() -> None:
    state = tls.TLSState()
    state.add_http01("t", "t.k")
    tokens = state.http01_tokens()
    state.remove_http01("t")
    assert tokens == {"t": "t.k"}
    assert state.http01_tokens() == {}


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _scope(scheme: str, path: str, host: str = "relay.test") -> dict[str, Any]:
    return {
        "type": "http",
        "scheme": scheme,
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", host.encode())],
    }


async def test_hsts_only_over_tls() -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = tls.HSTS(inner)
    secure = await _call(app, _scope("https", "/v2/"))
    assert (b"strict-transport-security", b"max-age=31536000") in secure[0]["headers"]
    plain = await _call(app, _scope("http", "/v2/"))
    assert plain[0]["headers"] == []


async def test_plain_port_answers_challenges_and_redirects() -> None:
    state = tls.TLSState()
    state.add_http01("abc", "abc.thumb")
    app = tls.PlainPort(state, 8443)
    answered = await _call(app, _scope("http", "/.well-known/acme-challenge/abc"))
    assert answered[0]["status"] == 200
    assert answered[1]["body"] == b"abc.thumb"
    redirected = await _call(app, _scope("http", "/v2/", host="relay.test:80"))
    assert redirected[0]["status"] == 308
    assert (b"location", b"https://relay.test:8443/v2/") in redirected[0]["headers"]
