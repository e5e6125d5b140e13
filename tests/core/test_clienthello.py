from __future__ import annotations

import ssl
import struct

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core.clienthello import (
    ClientHelloError,
    offered_alpn,
    wants_acme_challenge,
)


def _vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def client_hello(alpn: list[bytes] | None, *, extra_extensions: bytes = b"") -> bytes:
    """A minimal ClientHello handshake message (RFC 8446 §4.1.2) with an ALPN extension."""
    extensions = extra_extensions
    if alpn is not None:
        names = b"".join(_vector(1, name) for name in alpn)
        extensions += struct.pack("!H", 16) + _vector(2, _vector(2, names))
    body = (
        b"\x03\x03" + b"\x00" * 32 + _vector(1, b"") + _vector(2, b"\x13\x01") + _vector(1, b"\x00")
    )
    if alpn is not None or extra_extensions:
        body += _vector(2, extensions)
    return b"\x01" + _vector(3, body)


def real_client_hello(alpn: list[str]) -> bytes:
    """The ClientHello OpenSSL itself writes, taken from a memory BIO."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="relay.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    assert record[0] == 22  # handshake record; the message follows the 5-byte header
    return record[5 : 5 + int.from_bytes(record[3:5], "big")]


def test_real_openssl_client_hellos() -> None:
    assert offered_alpn(real_client_hello(["h2", "http/1.1"])) == ("h2", "http/1.1")
    assert offered_alpn(real_client_hello(["acme-tls/1"])) == ("acme-tls/1",)
    assert wants_acme_challenge(real_client_hello(["acme-tls/1"]))
    assert not wants_acme_challenge(real_client_hello(["h2"]))


def test_no_alpn_and_no_extensions() -> None:
    assert offered_alpn(client_hello(None)) == ()
    assert offered_alpn(client_hello(None, extra_extensions=b"\x00\x17\x00\x00")) == ()


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x02\x00\x00\x00",  # ServerHello
        client_hello([b"h2"])[:-1],
        client_hello([b""]),
        b"\x01" + _vector(3, b"\x03\x03" + b"\x00" * 10),
    ],
)
def test_malformed_is_an_error_and_never_a_challenge(message: bytes) -> None:
    with pytest.raises(ClientHelloError):
        offered_alpn(message)
    assert not wants_acme_challenge(message)


def test_trailing_bytes_in_the_alpn_extension_are_malformed() -> None:
    names = _vector(1, b"h2")
    broken = struct.pack("!H", 16) + _vector(2, _vector(2, names) + b"x")
    with pytest.raises(ClientHelloError, match="trailing"):
        offered_alpn(client_hello(None, extra_extensions=broken))


@given(st.lists(st.binary(min_size=1, max_size=20), max_size=6))
def test_round_trip(names: list[bytes]) -> None:
    assert offered_alpn(client_hello(names)) == tuple(n.decode("latin-1") for n in names)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_client_hello_error(data: bytes) -> None:
    try:
        result = offered_alpn(data)
    except ClientHelloError:
        return
    assert isinstance(result, tuple)
