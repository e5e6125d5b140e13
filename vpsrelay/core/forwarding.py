"""Who the client is and which URL it used, behind trusted proxies or not.

`X-Forwarded-*` headers are believed only from a configured trusted proxy; from
anyone else they are ignored, so a client cannot spoof its address or make the
relay advertise a realm on a host of the client's choosing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.core import headers as header_policy

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClientView:
    """The client's real address, the Host it asked for, and the relay's base URL for it."""

    client_ip: str
    base_url: str
    host: str = ""


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_view(
    *,
    peer: str,
    scheme: str,
    headers: Iterable[tuple[str, str]],
    server_host: str,
    trusted_proxies: Sequence[Network],
    public_url: str | None,
) -> ClientView:
    """Work out the client's address and the relay's base URL for this request.

    Args:
        peer: the socket peer address.
        scheme: `http` or `https`, as the connection was made.
        headers: request headers (lower-case names).
        server_host: `host:port` the socket was accepted on, if no Host header came.
        trusted_proxies: networks whose `X-Forwarded-*` headers are believed.
        public_url: an explicit base URL from the config; wins over everything.

    Returns:
        The view; `base_url` has no trailing slash.
    """
    headers = tuple(headers)
    host = header_policy.get(headers, "host") or server_host
    client_ip = peer
    if _is_trusted(peer, trusted_proxies):
        # The rightmost untrusted address in X-Forwarded-For is the client.
        forwarded_for = ",".join(header_policy.get_all(headers, "x-forwarded-for"))
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            client_ip = hop
            if not _is_trusted(hop, trusted_proxies):
                break
        scheme = (header_policy.get(headers, "x-forwarded-proto") or scheme).split(",")[0].strip()
        host = (header_policy.get(headers, "x-forwarded-host") or host).split(",")[0].strip()
    base = public_url.rstrip("/") if public_url else f"{scheme}://{host}"
    return ClientView(client_ip, base, host)
