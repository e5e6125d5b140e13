"""The upstream side of the IO shell: httpx, challenge discovery, error mapping.

One `httpx.AsyncClient` serves every upstream origin (its pool keys by origin).
Redirects are never followed by httpx: `core.flow` decides each hop, and this
module performs it. httpx errors become `RelayError`s here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import trio

from vpsrelay import __version__, netguard
from vpsrelay.core import auth, flow
from vpsrelay.core.redirects import RedirectPolicy, UpstreamRequest
from vpsrelay.errors import (
    RelayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from vpsrelay.config import RegistryConfig, Settings

log = logging.getLogger("vpsrelay.upstream")
USER_AGENT = f"vpsrelay/{__version__}"
# How long a discovered challenge (token realm and service) is trusted.
CHALLENGE_TTL = 600.0


@contextlib.contextmanager
def map_httpx_errors(what: str) -> Iterator[None]:
    """Translate httpx's exceptions into the relay's, without leaking addresses."""
    try:
        yield
    except httpx.TimeoutException as exc:
        log.warning("upstream timeout: %s: %s", what, type(exc).__name__)
        raise UpstreamTimeout(f"{what}: upstream timed out") from exc
    except (httpx.ConnectError, httpx.NetworkError) as exc:
        log.warning("upstream unreachable: %s: %s", what, exc)
        raise UpstreamUnavailable(f"{what}: upstream unreachable") from exc
    except (httpx.RemoteProtocolError, httpx.DecodingError) as exc:
        log.warning("upstream protocol error: %s: %s", what, exc)
        raise UpstreamProtocolError(f"{what}: upstream broke the protocol") from exc
    except httpx.HTTPError as exc:
        log.warning("upstream error: %s: %r", what, exc)
        raise UpstreamError(f"{what}: upstream request failed") from exc


@dataclass(frozen=True, slots=True)
class Discovered:
    """What an upstream's `/v2/` said about authentication."""

    challenge: auth.Challenge | None  # None: the upstream asks for no credentials
    at: float

    @property
    def scheme(self) -> str:
        """`bearer`, `basic` (or another scheme, lower case), or `none`."""
        return self.challenge.scheme.lower() if self.challenge is not None else "none"


class Upstream:
    """Talks to the configured registries and wherever they redirect."""

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        cfg = settings.upstream
        verify: ssl.SSLContext | bool = True
        if cfg.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=str(cfg.ca_bundle))
        self.settings = settings
        self.policy = RedirectPolicy(max_hops=cfg.max_redirects)
        limits = httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=32)
        # Binding the local side to 0.0.0.0 makes every upstream connection IPv4.
        local_address = "0.0.0.0" if cfg.prefer_ipv4 else None
        # Redirect targets may reach only public addresses (issue 5); see `netguard`.
        self.targets = netguard.Targets(
            [u for r in settings.registries for u in (r.url, r.search_url) if u],
            settings.access.redirect_allow,
        )
        if transport is None and not settings.access.allow_private_redirects:
            backend = netguard.GuardedBackend(self.targets)
            transport = netguard.GuardedTransport(
                backend, verify=verify, limits=limits, local_address=local_address
            )
        elif transport is None and local_address is not None:
            transport = httpx.AsyncHTTPTransport(
                verify=verify, limits=limits, local_address=local_address, trust_env=False
            )
        self.client = httpx.AsyncClient(
            # No total deadline: a 10 GiB layer on a slow link must finish; `read` is idle time.
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout,
                read=cfg.read_timeout,
                write=cfg.read_timeout,
                pool=cfg.pool_timeout,
            ),
            limits=limits,
            follow_redirects=False,
            verify=verify,
            trust_env=False,
            transport=transport,
        )
        self._discovered: dict[str, Discovered] = {}
        self._discovery_locks: dict[str, trio.Lock] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def remember_challenge(self, registry: str, challenge: auth.Challenge | None) -> None:
        if challenge is not None and challenge.realm:
            self.targets.trust(challenge.realm)  # the upstream's own token service
        self._discovered[registry] = Discovered(challenge, trio.current_time())

    def known_scheme(self, registry: str) -> str | None:
        """The auth scheme last seen for `registry` (`bearer`, `basic`, `none`), if any."""
        known = self._discovered.get(registry)
        return known.scheme if known is not None else None

    async def challenge(self, registry: RegistryConfig) -> auth.Challenge | None:
        """The upstream's Bearer challenge, discovered from its `/v2/` and cached.

        Returns:
            The Bearer challenge, or None when the upstream wants no token (it answers
            anonymously, or asks for Basic credentials directly: see `known_scheme`).

        Raises:
            UpstreamError: the upstream could not be asked or answered nonsense.
        """
        known = self._discovered.get(registry.name)
        if known is not None and trio.current_time() - known.at < CHALLENGE_TTL:
            return known.challenge if known.scheme == "bearer" else None
        lock = self._discovery_locks.setdefault(registry.name, trio.Lock())
        async with lock:  # one discovery at a time per registry
            known = self._discovered.get(registry.name)
            if known is not None and trio.current_time() - known.at < CHALLENGE_TTL:
                return known.challenge if known.scheme == "bearer" else None
            with map_httpx_errors(registry.name):
                response = await self.client.get(
                    f"{registry.url}/v2/", headers={"user-agent": USER_AGENT}
                )
            challenge = None
            if response.status_code == 401:
                headers = response.headers.get_list("www-authenticate")
                if not headers:
                    raise UpstreamProtocolError(f"{registry.name}: 401 without a challenge")
                parsed = [auth.parse_challenge(header) for header in headers]
                challenge = next((c for c in parsed if c.is_bearer), parsed[0])
            elif response.status_code >= 400:
                raise UpstreamError(f"{registry.name}: /v2/ answered {response.status_code}")
            self.remember_challenge(registry.name, challenge)
            return challenge if challenge is not None and challenge.is_bearer else None

    @contextlib.asynccontextmanager
    async def open(
        self,
        request: UpstreamRequest,
        *,
        what: str,
        follow: bool = True,
        content: bytes | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send `request`, following redirects per the policy; yield the final response.

        The body is not read: the caller streams it. Leaving the context closes the
        response, which closes its connection if the body was not read to the end.

        Raises:
            RelayError: the upstream could not be reached, or redirected badly.
        """
        conversation = flow.pull_flow(request, self.policy, follow=follow)
        hop = next(conversation)
        while True:
            outgoing = self.client.build_request(
                hop.method, hop.url, headers=list(hop.headers), content=content
            )
            with map_httpx_errors(what):
                response = await self.client.send(outgoing, stream=True)
            try:
                head = flow.UpstreamHead(
                    response.status_code,
                    tuple((k.lower(), v) for k, v in response.headers.multi_items()),
                    str(response.url),
                )
                hop = conversation.send(head)
            except StopIteration:
                break
            except BaseException:
                await response.aclose()
                raise
            await response.aclose()
            content = None
        try:
            yield response
        finally:
            await response.aclose()


__all__ = ["USER_AGENT", "RelayError", "Upstream", "map_httpx_errors"]
