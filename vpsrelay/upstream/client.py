"""The upstream side of the IO shell: httpx, challenge discovery, error mapping.

Each registry has its own connection pools (`upstream.max_connections` each), so one
registry's slow or stuck transfers cannot starve another's: one for the requests the
relay chooses (the registry's own URLs and the token realm it announced on its own
origin) and one for the hops it is redirected to (a CDN), which may reach only public
addresses whatever realm was announced (see `netguard`). Redirects are never followed
by httpx: `core.flow` decides each hop, and this module performs it. httpx errors
become `RelayError`s here and nowhere else: every response `Upstream.open` hands out
has its body stream wrapped (`_MappedStream`), so reading it (`aiter_raw`, `aread`,
`read_body`) raises only `RelayError`s, and a token service that times out mid-body
is a 504 like one that times out before its head.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import trio

from vpsrelay import __version__
from vpsrelay.core import auth, flow
from vpsrelay.core.redirects import RedirectPolicy, UpstreamRequest
from vpsrelay.errors import (
    RelayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from vpsrelay.upstream import netguard, routes

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from vpsrelay.config import RegistryConfig, Settings

log = logging.getLogger("vpsrelay.upstream")
USER_AGENT = f"vpsrelay/{__version__}"
# How long a discovered challenge (token realm and service) is trusted.
CHALLENGE_TTL = 600.0
# The most a token answer (or a token service's error) may hold; tokens are a few KiB.
MAX_TOKEN_ANSWER_BYTES = 1 << 20
# The most a health probe reads of an answer (a registry's `/v2/` says `{}`).
MAX_PROBE_BYTES = 64 * 1024
# What a kept-alive connection the upstream closed as the relay reused it raises
# ("Server disconnected without sending a response", a reset, a broken pipe).
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})


@contextlib.contextmanager
def map_httpx_errors(what: str, *, quiet: bool = False) -> Iterator[None]:
    """Translate httpx's exceptions into the relay's, without leaking addresses.

    `quiet`: log nothing (a CLI tool prints the error itself, on one line).
    """
    warn = _ignore if quiet else log.warning
    try:
        yield
    except httpx.TimeoutException as exc:
        warn("upstream timeout: %s: %s", what, type(exc).__name__)
        raise UpstreamTimeout(f"{what}: upstream timed out") from exc
    except (httpx.ConnectError, httpx.NetworkError) as exc:
        warn("upstream unreachable: %s: %s", what, exc)
        raise UpstreamUnavailable(f"{what}: upstream unreachable") from exc
    except (httpx.RemoteProtocolError, httpx.DecodingError) as exc:
        warn("upstream protocol error: %s: %s", what, exc)
        raise UpstreamProtocolError(f"{what}: upstream broke the protocol") from exc
    except httpx.HTTPError as exc:
        warn("upstream error: %s: %r", what, exc)
        raise UpstreamError(f"{what}: upstream request failed") from exc
    except (httpx.InvalidURL, UnicodeError) as exc:
        # A Location httpx cannot parse (a backslash in the port, a bad IDNA label):
        # httpx raises these outside its HTTPError tree.
        warn("upstream gave an invalid URL: %s: %s", what, exc)
        raise UpstreamProtocolError(f"{what}: upstream sent a URL the relay cannot use") from exc


def _ignore(*args: object) -> None:
    pass


class _MappedStream(httpx.AsyncByteStream):
    """An upstream body whose httpx errors, while read or closed, are `RelayError`s.

    Iterated by hand, not by an async generator, so that a read stopped early (an
    error, a body over `limit`) leaves no generator for the garbage collector: `aclose`
    closes the one it reads from.
    """

    def __init__(self, stream: httpx.AsyncByteStream, what: str) -> None:
        self._stream = stream
        self._what = what
        self._chunks: AsyncIterator[bytes] | None = None
        self.limit: int | None = None  # set by `read_body`: a small answer's bound
        self._read = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = aiter(self._stream)
        try:
            chunk = await anext(self._chunks)
        except Exception:  # mapped only when raised: nothing to pay per chunk otherwise
            with map_httpx_errors(self._what):
                raise
        self._read += len(chunk)
        if self.limit is not None and self._read > self.limit:
            # Raised from inside the stream, so httpx's own readers end on it too.
            raise UpstreamProtocolError(f"{self._what}: answer over {self.limit} bytes")
        return chunk

    async def aclose(self) -> None:
        chunks, self._chunks = self._chunks, None
        close = getattr(chunks, "aclose", None)
        with map_httpx_errors(self._what):
            try:
                if close is not None:
                    await close()
            finally:
                await self._stream.aclose()


def _map_body_errors(response: httpx.Response, what: str) -> httpx.Response:
    """`response`, its body stream wrapped so that reading it raises only `RelayError`s."""
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _MappedStream(response.stream, what)
    return response


async def read_body(response: httpx.Response, *, what: str, limit: int, raw: bool = False) -> bytes:
    """A small upstream answer's whole body (a token, an error document), at most `limit`
    bytes as sent: decoded per its `Content-Encoding`, or as sent with `raw` (to pass on).

    Raises:
        UpstreamTimeout: the body stalled past `upstream.read_timeout` (504).
        UpstreamError: the connection broke, the encoding was bad, or the body was
            over `limit` (502).
    """
    if isinstance(response.stream, _MappedStream):
        response.stream.limit = limit
    body = bytearray()
    with map_httpx_errors(what):  # the stream is mapped; decoding errors come here
        async for chunk in response.aiter_raw() if raw else response.aiter_bytes():
            body += chunk
            if raw and len(body) > limit:  # a response `open` did not hand out
                raise UpstreamProtocolError(f"{what}: answer over {limit} bytes")
    return bytes(body)


@dataclass(frozen=True, slots=True)
class Discovered:
    """What an upstream's `/v2/` said about authentication."""

    challenge: auth.Challenge | None  # None: the upstream asks for no credentials
    at: float

    @property
    def scheme(self) -> str:
        """`bearer`, `basic` (or another scheme, lower case), or `none`."""
        return self.challenge.scheme.lower() if self.challenge is not None else "none"


@dataclass(slots=True)
class RegistryLink:
    """One registry's connections: its own origins, and where it redirects to."""

    name: str
    origins: frozenset[tuple[str, int]]  # its configured URLs (registry and search)
    # Trusts its configured origins and the token realm it announced on its own origin.
    targets: netguard.Targets
    client: httpx.AsyncClient  # the requests the relay chooses: its API, its token realm
    redirected: httpx.AsyncClient  # redirect hops: never trusts an announced realm
    # Health probes, over the registry's route but never its busy pools: downloads that
    # hold every connection of `client` must not make the relay seem unready.
    probes: httpx.AsyncClient

    def serves(self, url: str) -> bool:
        """Whether `url` is on one of this registry's configured origins."""
        return netguard.origin_key(url) in self.origins


class Upstream:
    """Talks to the configured registries and wherever they redirect."""

    def __init__(
        self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        cfg = settings.upstream
        # One TLS context for every pool (each would otherwise load the CA bundle again).
        if cfg.ca_bundle is not None:
            self._verify = ssl.create_default_context(cafile=str(cfg.ca_bundle))
        else:
            self._verify = httpx.create_ssl_context(trust_env=False)
        self.settings = settings
        self.policy = RedirectPolicy(max_hops=cfg.max_redirects)
        self._transport = transport
        configured = [u for r in settings.registries for u in (r.url, r.search_url) if u]
        # Requests for an origin no registry claims: every configured registry URL is
        # trusted, nothing any registry announced.
        # Each client's targets and registry, to open its fresh-connection twin with.
        self._made: dict[httpx.AsyncClient, tuple[netguard.Targets, RegistryConfig | None]] = {}
        self._fresh: dict[httpx.AsyncClient, httpx.AsyncClient] = {}
        self.client = self._client(netguard.Targets(configured, settings.access.redirect_allow))
        self.links: dict[str, RegistryLink] = {}
        for registry in settings.registries:
            own = [u for u in (registry.url, registry.search_url) if u]
            allowed = settings.access.redirect_allow
            targets = netguard.Targets(own, allowed)
            redirect_targets = netguard.Targets(own, allowed)
            self.links[registry.name] = RegistryLink(
                name=registry.name,
                origins=frozenset(k for k in map(netguard.origin_key, own) if k is not None),
                targets=targets,
                client=self._client(targets, registry),
                redirected=self._client(redirect_targets, registry),
                probes=self._client(netguard.Targets(own, allowed), registry),
            )
        self._discovered: dict[str, Discovered] = {}
        self._discovery_locks: dict[str, trio.Lock] = {}
        self.stale_retries = 0  # requests sent again after a stale pooled connection
        self.on_stale_retry: Callable[[], None] | None = None  # the app's metrics

    def _client(
        self,
        targets: netguard.Targets,
        registry: RegistryConfig | None = None,
        *,
        fresh: bool = False,
    ) -> httpx.AsyncClient:
        """A client with its own pool, connecting only where `targets` allows, over
        `registry`'s route (its proxy, its address family).

        `fresh`: a pool that keeps no connection alive, so each request it sends goes
        over a new connection (the one retry after a stale pooled connection).
        """
        cfg = self.settings.upstream
        limits = httpx.Limits(
            max_connections=cfg.max_connections, max_keepalive_connections=0 if fresh else 32
        )
        # Binding the local side to 0.0.0.0 makes every upstream connection IPv4.
        local_address = "0.0.0.0" if cfg.prefer_ipv4 else None
        transport = self._transport
        if transport is None and registry is not None and routes.needs_route(registry):
            guarded = not self.settings.access.allow_private_redirects
            transport = routes.RoutedTransport(
                registry=registry.name,
                proxy=registry.proxy,
                family=routes.family_of(registry, cfg.prefer_ipv4),
                targets=targets if guarded else None,
                verify=self._verify,
                limits=limits,
            )
        if transport is None and not self.settings.access.allow_private_redirects:
            # Redirect targets may reach only public addresses (issue 5); see `netguard`.
            transport = netguard.GuardedTransport(
                netguard.GuardedBackend(targets),
                verify=self._verify,
                limits=limits,
                local_address=local_address,
            )
        elif transport is None:
            transport = httpx.AsyncHTTPTransport(
                verify=self._verify, limits=limits, local_address=local_address, trust_env=False
            )
        client = httpx.AsyncClient(
            # No total deadline: a 10 GiB layer on a slow link must finish; `read` is idle time.
            timeout=httpx.Timeout(
                connect=cfg.connect_timeout,
                read=cfg.read_timeout,
                write=cfg.read_timeout,
                pool=cfg.pool_timeout,
            ),
            limits=limits,
            follow_redirects=False,
            verify=self._verify,
            trust_env=False,
            transport=transport,
        )
        self._made[client] = (targets, registry)
        return client

    def _fresh_twin(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """`client`'s twin that keeps no connection alive, made on first use."""
        twin = self._fresh.get(client)
        if twin is None:
            targets, registry = self._made[client]
            twin = self._fresh[client] = self._client(targets, registry, fresh=True)
        return twin

    async def _send(
        self, client: httpx.AsyncClient, outgoing: httpx.Request, what: str
    ) -> httpx.Response:
        """`client.send`, streaming; a GET or HEAD that met a stale pooled connection
        (the upstream closed it as the relay reused it, before any answer) is sent once
        more, over a fresh connection, as Go's and curl's clients do. Only the head is
        awaited here, so no byte of an answer has reached a client when it is retried.
        """
        with map_httpx_errors(what):
            try:
                return await client.send(outgoing, stream=True)
            except STALE_CONNECTION_ERRORS as exc:
                if outgoing.method not in IDEMPOTENT_METHODS:
                    raise
                log.info("upstream closed a connection before answering: %s: %s; "
                         "once more on a fresh connection", what, exc)  # fmt: skip
                self.stale_retries += 1
                if self.on_stale_retry is not None:
                    self.on_stale_retry()
            return await self._fresh_twin(client).send(outgoing, stream=True)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.client.aclose()
            for link in self.links.values():
                await link.client.aclose()
                await link.redirected.aclose()
                await link.probes.aclose()
            for twin in self._fresh.values():
                await twin.aclose()

    async def probe(
        self, url: str, *, what: str, registry: str | None = None
    ) -> tuple[int, str | None]:
        """GET `url` without redirects over `registry`'s probe pool (its route, its proxy
        and address family, never its busy pools, which its downloads may hold): the
        status and `Date`. The body is read (at most `MAX_PROBE_BYTES`), so the
        connection stays reusable.

        Raises:
            RelayError: the upstream could not be reached or broke off.
        """
        link = self.links.get(registry) if registry is not None else None
        client = link.probes if link is not None else self.client
        with map_httpx_errors(what):
            outgoing = client.build_request("GET", url, headers={"user-agent": USER_AGENT})
            response = _map_body_errors(await client.send(outgoing, stream=True), what)
        try:
            await read_body(response, what=what, limit=MAX_PROBE_BYTES)
        finally:
            await response.aclose()
        return response.status_code, response.headers.get("date")

    def is_own_origin(self, registry: str, url: str) -> bool:
        """Whether `url` is on `registry`'s configured origins (an answer it gave itself)."""
        link = self.links.get(registry)
        return link is not None and link.serves(url)

    def remember_challenge(self, registry: str, challenge: auth.Challenge | None) -> None:
        """Keep what `registry` said about authentication, on its own origin.

        The callers pass only challenges from answers on the registry's own origin: a
        redirect target (a CDN) has no say in where the operator's credentials go.
        """
        link = self.links.get(registry)
        if link is not None:
            # The token service it names now, and only that one, is trusted for it.
            link.targets.announce(challenge.realm if challenge is not None else None)
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
            client = self.links[registry.name].client
            with map_httpx_errors(registry.name):
                probe = client.build_request(
                    "GET", f"{registry.url}/v2/", headers={"user-agent": USER_AGENT}
                )
            response = _map_body_errors(
                await self._send(client, probe, registry.name), registry.name
            )
            try:
                await read_body(response, what=registry.name, limit=MAX_TOKEN_ANSWER_BYTES)
            finally:
                await response.aclose()
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

    def _clients_for(
        self, url: str, registry: str | None
    ) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
        """(first hop, redirect hops) clients for a request to `url` for `registry`.

        Callers that do not name the registry are matched by the URL's origin: a
        registry's configured URL, then the realm a registry announced.
        """
        link = self.links.get(registry) if registry is not None else None
        if link is None:
            key = netguard.origin_key(url)
            link = next((k for k in self.links.values() if key in k.origins), None)
            if link is None and key is not None:
                link = next((k for k in self.links.values() if k.targets.announces(key)), None)
        if link is None:
            return self.client, self.client
        return link.client, link.redirected

    @contextlib.asynccontextmanager
    async def open(
        self,
        request: UpstreamRequest,
        *,
        what: str,
        follow: bool = True,
        content: bytes | None = None,
        registry: str | None = None,
        redirected: bool = False,
    ) -> AsyncIterator[httpx.Response]:
        """Send `request`, following redirects per the policy; yield the final response.

        The first hop goes over `registry`'s own pool (found by the URL's origin when
        not named); redirect hops over its redirect pool, which reaches only public
        addresses (and the operator's `redirect_allow`), whatever realm was announced.
        The body is not read: the caller streams it (`aiter_raw`) or reads it
        (`read_body`), and either raises only `RelayError`s. Leaving the context closes
        the response, which closes its connection if the body was not read to the end.

        `redirected`: the first hop is itself a redirect target `registry` named before
        (a body resumed at its CDN URL), sent over the redirect pool.

        Raises:
            RelayError: the upstream could not be reached, or redirected badly.
        """
        client, hops = self._clients_for(request.url, registry)
        if redirected:
            client = hops
        conversation = flow.pull_flow(request, self.policy, follow=follow)
        hop = next(conversation)
        while True:
            with map_httpx_errors(what):
                outgoing = client.build_request(
                    hop.method, hop.url, headers=list(hop.headers), content=content
                )
            response = _map_body_errors(await self._send(client, outgoing, what), what)
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
            client = hops
        try:
            yield response
        finally:
            await response.aclose()


__all__ = [
    "MAX_TOKEN_ANSWER_BYTES",
    "USER_AGENT",
    "RelayError",
    "Upstream",
    "map_httpx_errors",
    "read_body",
]
