"""Routes out: a registry's outbound proxy and address family.

Some registries have no IPv6 (or no working IPv4 from a VPS), and some VPS networks
reach a registry only through a tunnel. `registries.<name>.address_family` keeps every
connection to the registry (and to where it redirects) on one family;
`registries.<name>.proxy` sends them all through an HTTP(S) or SOCKS5 proxy, with
httpcore's own proxy pools (httpx's SOCKS support: `socksio`).

Through a proxy the relay cannot check the address the proxy finally connects to, so
`netguard`'s rule is kept one step earlier: the proxy itself is the operator's choice
and trusted (it is the only host a proxied pool connects to), and every other host a
request names (a redirect target, a realm nobody configured) must resolve, *here*, to
allowed addresses only, or the request is refused before it reaches the proxy. With
`socks5://` the relay resolves every name itself (as curl does) and the proxy gets the
checked address (over a connection kept for that one request: the pool would key it by
the address, not the name); with `socks5h://` and HTTP(S) proxies the proxy resolves the
name again, and a name that is public here and private at the proxy is the proxy's
network to police.
The address family applies to the connection to the proxy (and, with `socks5://`, to the
addresses the proxy is given).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING

import httpcore
import httpx
import socksio
import trio

from vpsrelay.errors import UpstreamUnavailable
from vpsrelay.upstream import netguard

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable

    from vpsrelay.registry_config import Proxy, RegistryConfig

log = logging.getLogger("vpsrelay.upstream")

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


def family_of(registry: RegistryConfig | None, prefer_ipv4: bool) -> str | None:
    """ "ipv4", "ipv6" or None (either) for `registry`'s connections."""
    chosen = registry.address_family if registry is not None else None
    if chosen is None:
        return "ipv4" if prefer_ipv4 else None
    return None if chosen == "both" else chosen


def needs_route(registry: RegistryConfig | None) -> bool:
    """Whether `registry`'s pools need a `RoutedTransport` (a proxy or a chosen family)."""
    return registry is not None and (
        registry.proxy is not None or registry.address_family is not None
    )


class FamilyBackend(netguard.TcpOnlyBackend):
    """Connects over one address family only: names resolve to that family's addresses,
    and an address literal of the other family is refused."""

    def __init__(self, family: str, inner: httpcore.AsyncNetworkBackend) -> None:
        super().__init__(inner)
        self.family = family

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        version = 4 if self.family == "ipv4" else 6
        try:
            addresses = await netguard.resolve(host, port, timeout, FAMILIES[self.family])
        except httpcore.ConnectError as exc:
            raise httpcore.ConnectError(f"no IPv{version} address for {host}: {exc}") from exc
        wanted = [a for a in addresses if a.version == version]
        if not wanted:
            raise httpcore.ConnectError(f"{host} has no IPv{version} address")
        return await self.connect_first(host, wanted, port, timeout, local_address, socket_options)


class HandshakeStreams(httpcore.AsyncNetworkBackend):
    """Remembers the connections to the proxy each task opened, so that those of a failed
    proxy handshake can be closed: httpcore leaves them to the garbage collector."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self.inner = inner
        self.opened: dict[object, list[httpcore.AsyncNetworkStream]] = {}

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self.inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )  # fmt: skip
        self.opened.setdefault(trio.lowlevel.current_task(), []).append(stream)
        return stream

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)

    async def close_failed(self, task: object) -> None:
        """Close what `task` opened while its request failed to reach the upstream."""
        for stream in self.opened.pop(task, []):
            with contextlib.suppress(Exception):
                await stream.aclose()


class RoutedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a registry's route: its proxy, its address family, and the
    address guard (`targets`; None when private redirects are allowed).

    The same reach into httpx as `netguard.GuardedTransport` (its `_pool`, gated by the
    same pin): httpx takes neither a network backend nor a proxy with one.
    """

    def __init__(
        self,
        *,
        registry: str,
        proxy: Proxy | None,
        family: str | None,
        targets: netguard.Targets | None,
        verify: ssl.SSLContext,
        limits: httpx.Limits,
    ) -> None:
        # `verify`: else httpx loads certifi's CA bundle again for each transport.
        super().__init__(verify=verify, limits=limits, trust_env=False)
        self.registry = registry
        self.proxy = proxy
        self.family = family
        self._targets = targets
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        backend: httpcore.AsyncNetworkBackend = httpcore.TrioBackend()
        if family is not None:
            backend = FamilyBackend(family, backend)
        pool = {
            "ssl_context": ssl_context,
            "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry,
        }
        if proxy is None:
            if targets is not None:
                backend = netguard.GuardedBackend(targets, inner=backend)
            self._pool = httpcore.AsyncConnectionPool(**pool, network_backend=backend)  # type: ignore[arg-type]
            return
        auth = _proxy_auth(proxy)
        self._streams = backend = HandshakeStreams(backend)
        if proxy.scheme in ("http", "https"):
            self._pool = httpcore.AsyncHTTPProxy(
                proxy_url=proxy.url,
                proxy_auth=auth,
                # httpcore refuses a TLS context for a plain-HTTP proxy.
                proxy_ssl_context=ssl_context if proxy.scheme == "https" else None,
                network_backend=backend,
                **pool,  # type: ignore[arg-type]
            )
        else:  # socks5h: the name goes to the proxy; socks5: `_through_proxy` resolved it
            self._pool = httpcore.AsyncSOCKSProxy(
                proxy_url=proxy.url,
                proxy_auth=auth,
                network_backend=backend,
                **pool,  # type: ignore[arg-type]
            )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.proxy is None:
            return await super().handle_async_request(request)
        try:
            request = await self._through_proxy(request)
        except httpcore.ConnectError as exc:  # a name that does not resolve here
            raise httpx.ConnectError(str(exc), request=request) from exc
        task = trio.lowlevel.current_task()
        try:
            return await super().handle_async_request(request)
        # A proxy that answers garbage to the SOCKS handshake raises socksio's own
        # error, outside httpx's and httpcore's trees: it is as dead as a refusing one.
        except (httpx.ConnectError, httpx.ProxyError, socksio.ProtocolError) as exc:
            await self._streams.close_failed(task)
            # Never the proxy's credentials: `proxy.url` has none, httpcore's text neither.
            log.warning(
                "upstream unreachable through the proxy %s: %s: %s", self.proxy.url,
                self.registry, exc,
            )  # fmt: skip
            raise UpstreamUnavailable(
                f"{self.registry}: upstream unreachable through the relay's proxy"
            ) from exc
        finally:
            self._streams.opened.pop(task, None)

    async def _through_proxy(self, request: httpx.Request) -> httpx.Request:
        """`request` as the proxy gets it, once its host passed the address check.

        A host nobody configured must resolve here to allowed addresses only. With
        `socks5://` (not `socks5h://`) the relay resolves every name itself, as curl
        does, and the proxy gets the address (of the chosen family): the one that was
        checked. TLS still verifies the name (`sni_hostname`); `Host` is unchanged, and
        the caller's request (and so `response.request`) keeps its URL.
        """
        host, port = request.url.host, request.url.port or _PORTS[request.url.scheme]
        timeout = request.extensions.get("timeout", {}).get("connect")
        addresses = None
        if self._targets is not None and not self._targets.is_trusted(host, port):
            addresses = await netguard.checked_addresses(self._targets, host, port, timeout)
        if self.proxy is None or self.proxy.scheme != "socks5" or _is_literal(host):
            return request
        if addresses is None:
            family = FAMILIES.get(self.family or "", 0)
            addresses = await netguard.resolve(host, port, timeout, family)
        version = {"ipv4": 4, "ipv6": 6}.get(self.family or "")
        wanted = [a for a in addresses if version is None or a.version == version]
        if not wanted:
            raise httpcore.ConnectError(f"{host} has no address of the registry's family")
        # httpcore keys its pooled connections by the URL's host, here the address: a
        # connection whose TLS named one host must not carry another name's request
        # (an anycast CDN address serves many), so a rewritten request keeps none alive.
        headers = request.headers.copy()
        headers["connection"] = "close"
        return httpx.Request(
            request.method,
            request.url.copy_with(host=str(wanted[0])),
            headers=headers,
            stream=request.stream,
            extensions={**request.extensions, "sni_hostname": host},
        )


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


_PORTS = {"http": 80, "https": 443}


def _proxy_auth(proxy: Proxy) -> tuple[bytes, bytes] | None:
    if proxy.username is None:
        return None
    password = proxy.password.reveal() if proxy.password is not None else ""
    return proxy.username.reveal().encode(), password.encode()
