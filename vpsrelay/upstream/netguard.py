"""Where the relay may connect: redirect targets must be public addresses.

An upstream's blob redirect names a host the relay then connects to. If that host
were loopback, link-local (169.254.169.254, the cloud metadata service) or private,
whoever controls the redirect could make the relay fetch from the relay's own
network. So every connection the relay opens passes this network backend (httpcore's
seam under httpx): a configured upstream's own origin (its URL, search URL) is the
operator's choice and trusted, and so is the token realm a registry announced on its own
origin, but only for the requests the relay itself sends there (each registry has its own
`Targets`, and the pool for redirect hops never trusts a realm); any other host is resolved
here, *every* address is checked (`core.access.address_refusal`), and the connection
goes to a checked address, so a name cannot resolve differently between check and
connect. TLS still verifies the certificate for the name (httpcore passes it as SNI).
"""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from vpsrelay.core.access import Address, Network, address_refusal
from vpsrelay.errors import Denied

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger("vpsrelay.netguard")

# `GuardedTransport` replaces httpx's private `_pool`: pinned exactly (pyproject.toml), gated
# in `vpsrelay.patches`, its httpx methods pinned by tests/test_netguard_pins.py.
PINNED = {"httpx": "0.29.0"}

_DEFAULT_PORTS = {"http": 80, "https": 443}


class RedirectTargetDenied(Denied):
    """An upstream redirected the relay to an address it must not reach."""


def origin_key(url: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) URL, host lower case without brackets; None if none."""
    try:
        parts = urlsplit(url)  # ValueError for a broken IPv6 literal (`http://[::1`)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            return None
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        return None
    return parts.hostname.lower(), port


class Targets:
    """The trusted origins and allowed networks, and the one announced token realm."""

    def __init__(self, trusted_urls: Iterable[str], allowed: Iterable[str]) -> None:
        self.trusted: set[tuple[str, int]] = set()
        self.announced: tuple[str, int] | None = None
        self.networks: list[Network] = []
        for url in trusted_urls:
            self.trust(url)
        for entry in allowed:
            if "://" in entry:
                self.trust(entry)
            else:
                self.networks.append(ipaddress.ip_network(entry, strict=False))

    def trust(self, url: str) -> None:
        key = origin_key(url)
        if key is not None:
            self.trusted.add(key)

    def announce(self, realm: str | None) -> None:
        """Trust the token realm a registry named on its own origin (replacing the last)."""
        self.announced = origin_key(realm) if realm else None

    def announces(self, key: tuple[str, int]) -> bool:
        return self.announced is not None and key == self.announced

    def is_trusted(self, host: str, port: int) -> bool:
        key = (host.strip("[]").lower(), port)
        return key in self.trusted or self.announces(key)


class TcpOnlyBackend(httpcore.AsyncNetworkBackend):
    """A backend in front of another (httpcore's trio one) that connects to addresses it
    chose itself; no unix sockets."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.inner = inner or httpcore.TrioBackend()

    async def connect_first(
        self,
        host: str,
        addresses: list[Address],
        port: int,
        timeout: float | None,  # noqa: ASYNC109
        local_address: str | None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None,
    ) -> httpcore.AsyncNetworkStream:
        """A connection to the first of `addresses` that takes one (`host` names them)."""
        last: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address,
                    socket_options=socket_options,
                )  # fmt: skip
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address for {host}")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("the relay does not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedBackend(TcpOnlyBackend):
    """httpcore's trio backend, with the address check in front of every TCP connect."""

    def __init__(
        self, targets: Targets, *, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        super().__init__(inner)
        self.targets = targets

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.targets.is_trusted(host, port):
            return await self.inner.connect_tcp(
                host, port, timeout=timeout, local_address=local_address,
                socket_options=socket_options,
            )  # fmt: skip
        addresses = await checked_addresses(self.targets, host, port, timeout)
        return await self.connect_first(
            host, addresses, port, timeout, local_address, socket_options
        )


async def checked_addresses(
    targets: Targets,
    host: str,
    port: int,
    timeout: float | None,  # noqa: ASYNC109
) -> list[Address]:
    """`host`'s addresses, every one of them allowed by `targets`' networks.

    Raises:
        RedirectTargetDenied: one of them is loopback, private, link-local, ...
        httpcore.ConnectError: `host` does not resolve.
    """
    addresses = await resolve(host, port, timeout)
    for address in addresses:
        reason = address_refusal(address, targets.networks)
        if reason is not None:
            log.warning("refused to connect to %s:%s: %s (%s)", host, port, reason, address)
            raise RedirectTargetDenied(
                f"the upstream redirected to a {reason} address; the relay does not go there",
                reason="redirect_target",
            )
    return addresses


async def resolve(
    host: str,
    port: int,
    timeout: float | None,  # noqa: ASYNC109
    family: int = 0,
) -> list[Address]:
    """`host`'s addresses (itself, for an IP literal), of `family` (0: any), in order."""
    literal = host.strip("[]")
    try:
        return [ipaddress.ip_address(literal)]
    except ValueError:
        pass
    try:
        with trio.fail_after(timeout if timeout is not None else float("inf")):
            infos = await trio.socket.getaddrinfo(
                literal, port, family=family, type=trio.socket.SOCK_STREAM
            )
    except (OSError, trio.TooSlowError) as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if address not in found:
            found.append(address)
    if not found:
        raise httpcore.ConnectError(f"no address for {host}")
    return found


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport on a `GuardedBackend` (httpx has no parameter for the backend).

    The one reach into httpx: its own pool, `_pool`, which every request of the transport
    goes through, is replaced by one on the guarded backend. Another httpx may not use
    `_pool` so: the guard would be silently gone, so the relay starts only on the pinned
    version unless told to run degraded (`vpsrelay.patches`).
    """

    def __init__(
        self,
        backend: httpcore.AsyncNetworkBackend,
        *,
        verify: object,
        limits: httpx.Limits,
        local_address: str | None = None,
    ) -> None:
        super().__init__(limits=limits, trust_env=False)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)  # type: ignore[arg-type]
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            local_address=local_address,
            network_backend=backend,
        )


def pinned_functions() -> dict[str, object]:
    """httpx's code that creates, uses and closes `_pool`, for the test that pins it."""
    transport = httpx.AsyncHTTPTransport
    return {
        "AsyncHTTPTransport.__init__": transport.__init__,
        "AsyncHTTPTransport.handle_async_request": transport.handle_async_request,
        "AsyncHTTPTransport.aclose": transport.aclose,
        "AsyncHTTPTransport.__aenter__": transport.__aenter__,
        "AsyncHTTPTransport.__aexit__": transport.__aexit__,
    }
