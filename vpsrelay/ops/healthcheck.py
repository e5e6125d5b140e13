"""`vpsrelay healthcheck`: ask the local relay's `/healthz`; for Docker's HEALTHCHECK and probes.

It reads the same configuration as `vpsrelay serve` (file, `VPSRELAY_*`), so the probe follows
`server.listen` wherever the operator moves it: a wildcard address (`0.0.0.0`, `::`) is probed
on the matching loopback address.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import httpx

from vpsrelay.config import parse_listen

if TYPE_CHECKING:
    from vpsrelay.config import Settings

HEALTHZ = "/healthz"


def local_url(settings: Settings) -> str:
    """The `/healthz` URL of the first plain-HTTP listener, as seen from the same host."""
    host, port = parse_listen(settings.server.listen[0])
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        host = "127.0.0.1" if address.version == 4 else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{HEALTHZ}"


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """GET `url`; healthy means 200. Returns (healthy, one line to print)."""
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=False, trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"{url}: {type(exc).__name__}: {exc}"
    body = response.text.strip().replace("\n", " ")[:300]
    return response.status_code == 200, f"{url}: {response.status_code} {body}"
