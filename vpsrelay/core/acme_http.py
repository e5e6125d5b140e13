"""What the plain-HTTP port (80) answers next to a TLS relay.

RFC 8555 §8.3: the CA fetches `http://<domain>/.well-known/acme-challenge/<token>`
and expects the key authorization as the body. Everything else is redirected to
https with 308 (RFC 9110 §15.4.9: like 301, but the method and body are kept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
HTTPS_DEFAULT_PORT = 443

# RFC 9110 §7.2 Host = uri-host [ ":" port ]; uri-host = IP-literal / IPv4address / reg-name.
# Only DNS names, IPv4 and bracketed IPv6 are accepted: the name ends up in a Location header.
_HOST = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
# RFC 8555 §8.3: the token is base64url (RFC 4648 §5) without padding.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class PlainResponse:
    status: int
    headers: Headers
    body: bytes


def _text(status: int, text: str, extra: Headers = ()) -> PlainResponse:
    body = text.encode()
    return PlainResponse(status, (("content-type", "text/plain; charset=utf-8"), *extra), body)


def https_location(host_header: str | None, https_port: int, target: str) -> str | None:
    """The https URL for the same host and target, or None for a missing or odd Host.

    Args:
        host_header: the request's Host (its port, the plain one, is dropped).
        https_port: where TLS is served; 443 is left out of the URL.
        target: the request target, path and query as sent (must start with `/`).
    """
    match = _HOST.fullmatch(host_header or "")
    if match is None or not target.startswith("/") or target.startswith("//"):
        return None
    port = "" if https_port == HTTPS_DEFAULT_PORT else f":{https_port}"
    return f"https://{match['host'].lower()}{port}{target}"


def answer(
    method: str,
    target: str,
    host_header: str | None,
    https_port: int,
    tokens: Mapping[str, str],
) -> PlainResponse:
    """The response of the plain-HTTP port.

    Args:
        method: the request method.
        target: path and query as sent by the client.
        host_header: the Host header, if any.
        https_port: the port TLS is served on.
        tokens: pending HTTP-01 challenges, token -> key authorization.
    """
    path = target.partition("?")[0]
    if path.startswith(CHALLENGE_PREFIX):
        token = path[len(CHALLENGE_PREFIX) :]
        key_authorization = tokens.get(token) if _TOKEN.fullmatch(token) else None
        if key_authorization is None or method not in ("GET", "HEAD"):
            return _text(404, "no such ACME challenge\n")
        return _text(200, key_authorization)
    location = https_location(host_header, https_port, target)
    if location is None:
        return _text(400, "missing or invalid Host header\n")
    return _text(308, f"moved to {location}\n", (("location", location),))
