"""Read the ALPN protocols a TLS ClientHello offers.

TLS-ALPN-01 (RFC 8737 §3) asks the server to answer a handshake that offers the
single protocol `acme-tls/1` with a self-signed challenge certificate, and every
other handshake with the real one. Python's `ssl` picks the certificate (via the
SNI callback) before it reveals the client's ALPN list, so the shell hands the raw
ClientHello here first.

Wire format (RFC 8446 §4.1.2, RFC 7301 §3.1), all lengths big-endian:

    Handshake { msg_type(1) = 1, length(3), body }
    ClientHello body { legacy_version(2), random(32), session_id<0..32>(1),
                       cipher_suites<2..2^16-2>(2), compression_methods<1..2^8-1>(1),
                       extensions<8..2^16-1>(2) }
    Extension { extension_type(2), extension_data<0..2^16-1>(2) }
    application_layer_protocol_negotiation (16):
        ProtocolNameList { ProtocolName protocol_name_list<2..2^16-1>(2) }
        ProtocolName <1..2^8-1>(1)
"""

from __future__ import annotations

from vpsrelay.errors import RelayError

CLIENT_HELLO = 1
ALPN_EXTENSION = 16
ACME_TLS_ALPN = "acme-tls/1"


class ClientHelloError(RelayError):
    """Not a well-formed ClientHello."""

    status = 400
    code = "TLS"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise ClientHelloError("truncated ClientHello")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    def done(self) -> bool:
        return self.pos == len(self.data)


def offered_alpn(message: bytes) -> tuple[str, ...]:
    """The ALPN protocol names of a ClientHello handshake message, in the client's order.

    Args:
        message: the handshake message, header included (what OpenSSL's message
            callback passes).

    Returns:
        The protocol names; empty when the client sent no ALPN extension.

    Raises:
        ClientHelloError: not a ClientHello, or malformed.
    """
    outer = _Reader(message)
    if outer.number(1) != CLIENT_HELLO:
        raise ClientHelloError("not a ClientHello")
    body = _Reader(outer.vector(3))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # session id
    body.vector(2)  # cipher suites
    body.vector(1)  # compression methods
    if body.done():
        return ()  # TLS 1.2 allows a ClientHello without extensions
    extensions = _Reader(body.vector(2))
    protocols: tuple[str, ...] = ()
    while not extensions.done():
        kind = extensions.number(2)
        data = extensions.vector(2)
        if kind == ALPN_EXTENSION:
            protocols = _protocol_names(data)
    return protocols


def _protocol_names(data: bytes) -> tuple[str, ...]:
    outer = _Reader(data)
    names = _Reader(outer.vector(2))
    if not outer.done():
        raise ClientHelloError("trailing bytes after the ALPN list")
    result = []
    while not names.done():
        name = names.vector(1)
        if not name:
            raise ClientHelloError("empty ALPN protocol name")
        result.append(name.decode("latin-1"))
    return tuple(result)


def wants_acme_challenge(message: bytes) -> bool:
    """Whether the handshake is an ACME TLS-ALPN-01 validation (offers `acme-tls/1`).

    A malformed message is not a validation: OpenSSL rejects it on its own.
    """
    try:
        return ACME_TLS_ALPN in offered_alpn(message)
    except ClientHelloError:
        return False
