"""Relaying one request to its registry and streaming the answer back.

`Forwarder.relay` is the pass-through: the client's request goes upstream with the
right credentials (`upstream_headers`), the answer's headers are rewritten for the
client (realm, links), and its body streams as it arrives: `send` waits for the
client (backpressure), and a client that disconnects cancels the upstream request.
The cache front calls it with a hook that sees the answer before the client does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio

from vpsrelay.core import auth, headers as header_policy, placeholders, resume, routing
from vpsrelay.core.digest import Verifier, held_back
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import NotFound, RelayError
from vpsrelay.exchange import API_VERSION_HEADER, Exchange, content_length, watch_disconnect
from vpsrelay.upstream import USER_AGENT
from vpsrelay.upstream.parallel import ParallelStream, fetch_piece
from vpsrelay.upstream.resume import Ask, ResumingStream, headers_of
from vpsrelay.upstream.tokens import basic

if TYPE_CHECKING:
    import httpx

    from vpsrelay.access.clientauth import ClientAuth
    from vpsrelay.access.guard import Guard
    from vpsrelay.config import RegistryConfig, Settings
    from vpsrelay.ops.metrics import Metrics
    from vpsrelay.ops.observe import Observer
    from vpsrelay.upstream import Upstream
    from vpsrelay.upstream.tokens import TokenClient

log = logging.getLogger("vpsrelay.forward")

# Sees the upstream's answer (and the headers the client would get) before the client
# does; True: it answered the client itself.
RelayHook = Callable[["httpx.Response", header_policy.Headers], Awaitable[bool]]


class Forwarder:
    """Sends a client's request to its registry and streams the answer to the client."""

    def __init__(
        self,
        settings: Settings,
        upstream: Upstream,
        tokens: TokenClient,
        clientauth: ClientAuth,
        guard: Guard,
        observer: Observer,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.tokens = tokens
        self.clientauth = clientauth
        self.guard = guard
        self.observer = observer
        self.metrics = metrics
        self.registries = {registry.name: registry for registry in settings.registries}
        self.parallel_fetches = 0  # running now, at most `upstream.parallel_max_fetches`

    async def upstream_headers(
        self, exchange: Exchange, registry: RegistryConfig, route: routing.Route
    ) -> header_policy.Headers:
        """The client's headers for the registry; its credentials win over the operator's.

        With client authentication on, the client holds a relay token, and the upstream
        gets the upstream token the relay keeps for it. Otherwise a client that brought
        no credentials of its own holds a placeholder from the relay's `/token`: the
        relay swaps it for its own pull token (or the operator's Basic credentials, for
        a registry that asks for them directly), which never reach the client.
        """
        headers, _ = await self.upstream_headers_as(exchange, registry, route)
        return headers

    async def upstream_headers_as(
        self,
        exchange: Exchange,
        registry: RegistryConfig,
        route: routing.Route,
        avoid: Sequence[str] = (),
    ) -> tuple[header_policy.Headers, str | None]:
        """`upstream_headers`, and the operator credential (username) they carry, if
        any: from the pool, not one of `avoid` (those this request already tried)."""
        if self.clientauth.enabled:
            headers = await self.clientauth.upstream_headers(
                exchange.headers, registry, route.upstream_name, avoid
            )
            return headers, self.tokens.holder(
                registry, header_policy.get(headers, "authorization")
            )
        headers = header_policy.upstream_request_headers(exchange.headers, USER_AGENT)
        client_auth = header_policy.get(headers, "authorization")
        if client_auth is not None and placeholders.is_placeholder(client_auth):
            headers = tuple((k, v) for k, v in headers if k != "authorization")
            if registry.has_credentials:
                username = self.tokens.choose_credential(registry, avoid)
                own = await self._operator_credentials(registry, route, username)
                return (*headers, *own), username if own else None
            return headers, None
        if client_auth is None and registry.has_credentials:
            await self.upstream.challenge(registry)  # learn (or recall) its scheme
            if self.upstream.known_scheme(registry.name) == "basic":
                username = self.tokens.choose_credential(registry, avoid)
                return (*headers, ("authorization", basic(registry, username))), username
        elif client_auth is not None and self.upstream.known_scheme(registry.name) == "none":
            return tuple((k, v) for k, v in headers if k != "authorization"), None
        return headers, None

    async def _operator_credentials(
        self, registry: RegistryConfig, route: routing.Route, username: str
    ) -> header_policy.Headers:
        """The relay's own authorization for `route`, earned with the operator's
        credential `username`: a pull token for the route's repository (kept
        server-side), or Basic credentials."""
        challenge = await self.upstream.challenge(registry)
        if challenge is not None:
            if route.upstream_name or route.kind is routing.Kind.BASE:
                names = [route.upstream_name] if route.upstream_name else []
                token = await self.tokens.pull_token(
                    registry, names, operator=True, username=username
                )
                if token:
                    return (("authorization", f"Bearer {token}"),)
            return ()
        if self.upstream.known_scheme(registry.name) == "basic":
            return (("authorization", basic(registry, username)),)
        return ()

    @contextlib.asynccontextmanager
    async def open_upstream(
        self,
        exchange: Exchange,
        route: routing.Route,
        method: str,
        url: str,
        *,
        follow: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """Send the client's request upstream with `upstream_headers`; yield the answer.

        What the relay can heal, it heals here, each at most once per credential: an
        upstream token of the relay's own that the registry refuses (401) is dropped
        and fetched again, and the request retried once; an operator credential that
        answered 429 rests (`core.credpool`) and the request is retried with another
        that is not resting. A client's own credentials are never retried, nor
        swapped for the operator's.

        Raises:
            RelayError: the upstream could not be reached, or redirected badly.
        """
        registry = self.registries[route.registry]
        tried: list[str] = []
        refreshed = False
        attempts = len(registry.credentials) + 2  # each credential, and one refresh
        for attempt in range(attempts):
            final = attempt == attempts - 1  # its answer is the client's, whatever it is
            headers, username = await self.upstream_headers_as(exchange, registry, route, tried)
            request = UpstreamRequest(method, url, headers)
            async with self.upstream.open(
                request, what=registry.name, follow=follow, registry=registry.name
            ) as response:
                status = response.status_code
                # A redirect target's (a CDN's) 429 is about this VPS, not the account:
                # only the registry's own answers rest a credential or ask for another.
                if username is not None and self.upstream.is_own_origin(
                    registry.name, str(response.url)
                ):
                    self._credential_answered(registry, username, response)
                    if status == 429 and not final:
                        tried.append(username)
                        if self.tokens.may_retry_elsewhere(registry, tried):
                            log.info(
                                "%s: %s answered 429: another credential", registry.name, username
                            )
                            continue
                sent = header_policy.get(headers, "authorization") or ""
                if (
                    status == 401
                    and not final
                    and not refreshed
                    and sent.lower().startswith("bearer ")
                    and self._sent_own_token(exchange, registry)
                    and auth.fresh_token_may_help(response.headers.get_list("www-authenticate"))
                ):
                    # The registry refused a token of the relay's own (revoked, expired
                    # early): a fresh one, once; a second 401 is the client's answer.
                    refreshed = True
                    self.tokens.forget(registry.name, [route.upstream_name])
                    log.info(
                        "%s: the relay's token was refused (401): fetching a new one", registry.name
                    )
                    continue
                yield response
                return

    def _credential_answered(
        self, registry: RegistryConfig, username: str, response: httpx.Response
    ) -> None:
        state = self.tokens.credential_answered(registry, username, response)
        if state is not None:
            self.observer.credential_state(registry.name, state)

    def _sent_own_token(self, exchange: Exchange, registry: RegistryConfig) -> bool:
        """Whether the upstream request carried a token of the relay's own (not the
        client's): always with client authentication, else for a placeholder."""
        if self.clientauth.enabled:
            return True
        client_auth = header_policy.get(exchange.headers, "authorization")
        return (
            registry.has_credentials
            and client_auth is not None
            and placeholders.is_placeholder(client_auth)
        )

    async def relay(
        self,
        exchange: Exchange,
        route: routing.Route,
        path: str | None = None,
        hook: RelayHook | None = None,
        refused: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Relay `exchange` to `route`'s registry (at `path`, by default the route's).

        `refused` is asked when the upstream answers 429 (every operator credential
        spent): True, it answered the client itself (a cached copy); else the 429 and
        its `Retry-After` go to the client.

        Raises:
            RelayError: the upstream failed; the exchange may have begun its answer.
        """
        # Each holds an upstream connection while its client reads: capped per client IP.
        with self.guard.upstream_stream(exchange.view.client_ip):
            if self.settings.upstream.parallel_connections == 1:
                await self._relay(exchange, route, path or route.upstream_path, hook, refused)
                return
            # A nursery for the piece fetchers of a parallel ranged fetch (`_resumable`).
            failure: RelayError | None = None
            async with trio.open_nursery() as helpers:
                try:
                    await self._relay(
                        exchange, route, path or route.upstream_path, hook, refused, helpers
                    )
                except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
                    failure = exc
            if failure is not None:
                raise failure

    async def _relay(
        self,
        exchange: Exchange,
        route: routing.Route,
        path: str,
        hook: RelayHook | None,
        refused: Callable[[], Awaitable[bool]] | None = None,
        helpers: trio.Nursery | None = None,
    ) -> None:
        registry = self.registries[route.registry]
        query = routing.upstream_query(exchange.query, route.kind)
        base = registry.search_url if route.kind is routing.Kind.SEARCH else registry.url
        if base is None:
            raise NotFound(f"{registry.name} has no search endpoint configured")
        url = f"{base}{path}{'?' + query if query else ''}"
        began = time.monotonic()
        async with self.open_upstream(exchange, route, exchange.method, url) as response:
            exchange.upstream_seconds = time.monotonic() - began
            self.observer.upstream_answered(exchange, response)
            if response.status_code == 429:
                if refused is not None and await refused():
                    return
                await self.observer.too_many_requests(exchange, response)
                return
            self._resumable(exchange, route, registry, url, response, helpers)
            if exchange.meter is not None and 200 <= response.status_code < 300:
                # Admitted before the hook, where a cache fill would begin for a download
                # the budget then refused.
                exchange.meter.admit(content_length(response.headers.get("content-length")))
            headers = self._client_headers(exchange, registry, route, response)
            checked, verifier = header_policy.checked_digest(
                route, exchange.method, response.status_code, tuple(headers)
            )
            if hook is not None and await hook(response, checked):
                return
            await self._stream(exchange, response, checked, verifier)

    def _resumable(
        self,
        exchange: Exchange,
        route: routing.Route,
        registry: RegistryConfig,
        url: str,
        response: httpx.Response,
        helpers: trio.Nursery | None = None,
    ) -> None:
        """Make a blob's body resume itself when it breaks off (`upstream/resume.py`):
        the pass-through and a cache fill read the same response, so both heal. A big
        whole body from a CDN is fetched over several connections when that is on
        (`upstream/parallel.py`)."""
        cfg = self.settings.upstream
        if route.kind is not routing.Kind.BLOB or exchange.method != "GET":
            return
        window = resume.window_of(response.status_code, headers_of(response))
        if window is None:
            return
        reopen = partial(self._reopen, exchange, route, registry, url)
        own_origin = partial(self.upstream.is_own_origin, registry.name)
        resumed = partial(self.observer.upstream_resumed, exchange)

        def attempts() -> resume.Attempts:
            return resume.Attempts(cfg.resume_attempts, cfg.resume_backoff)

        if cfg.resume_attempts > 0:
            response.stream = ResumingStream(
                response, window, reopen, attempts(), own_origin=own_origin,
                what=registry.name, resumed=resumed,
            )  # fmt: skip
        direct = str(response.url)
        if (
            helpers is not None
            and response.status_code == 200
            and window.end >= cfg.parallel_min_size
            and not own_origin(direct)  # ranges go to the CDN, not to the registry
            and response.headers.get("accept-ranges", "").strip().lower() == "bytes"
            and self.parallel_fetches < cfg.parallel_max_fetches  # else: one stream
        ):
            self.parallel_fetches += 1
            fetch = partial(
                fetch_piece, reopen, direct_url=direct, attempts=attempts,
                own_origin=own_origin, what=registry.name, resumed=resumed,
            )  # fmt: skip
            response.stream = ParallelStream(
                response.stream,  # type: ignore[arg-type]
                window,
                fetch,
                helpers,
                connections=cfg.parallel_connections,
                release=self._parallel_fetch_ended,
            )

    def _parallel_fetch_ended(self) -> None:
        self.parallel_fetches -= 1

    @contextlib.asynccontextmanager
    async def _reopen(
        self,
        exchange: Exchange,
        route: routing.Route,
        registry: RegistryConfig,
        url: str,
        ask: Ask,
    ) -> AsyncIterator[httpx.Response]:
        """One resume request: at the redirect target the body came from (no
        credentials go there), or at the registry with fresh headers (a fresh token when
        it refused the last one), following its redirect to a fresh signed URL."""
        if ask.direct_url is not None:
            request = UpstreamRequest(
                "GET", ask.direct_url, (("user-agent", USER_AGENT), *ask.headers)
            )
            async with self.upstream.open(
                request, what=registry.name, registry=registry.name, redirected=True
            ) as response:
                yield response
            return
        names = [route.upstream_name]
        if ask.fresh_token:
            self.tokens.forget(registry.name, names)
        headers, username = await self.upstream_headers_as(exchange, registry, route)
        if ask.relay_token and not self._sent_own_token(exchange, registry):
            # The client's own token expired during a body it was allowed to read: the
            # rest is asked for with the relay's anonymous token (never the operator's,
            # which is never mixed with a client's credentials).
            token = await self.tokens.pull_token(registry, names, operator=False)
            headers = tuple(h for h in headers if h[0] != "authorization")
            if token is not None:
                headers = (*headers, ("authorization", f"Bearer {token}"))
            username = None
        kept = tuple(h for h in headers if h[0] not in ("range", "if-range"))
        request = UpstreamRequest("GET", url, (*kept, *ask.headers))
        async with self.upstream.open(
            request, what=registry.name, registry=registry.name
        ) as response:
            # As in `open_upstream`: the registry's own 429 rests the account (the next
            # resume asks with another); a CDN's says nothing about it.
            if username is not None and self.upstream.is_own_origin(
                registry.name, str(response.url)
            ):
                self._credential_answered(registry, username, response)
            yield response

    def _client_headers(
        self,
        exchange: Exchange,
        registry: RegistryConfig,
        route: routing.Route,
        response: httpx.Response,
    ) -> list[tuple[str, str]]:
        """The upstream answer's headers as the client gets them, learning the realm."""
        # What a redirect target (a CDN) says about authentication is not the
        # registry's word: only the registry's own answers teach the relay its realm.
        own_answer = self.upstream.is_own_origin(registry.name, str(response.url))
        realm = routing.relay_realm(exchange.view.base_url, registry.name)
        headers = list(header_policy.client_response_headers(response.headers.multi_items()))
        for challenge in response.headers.get_list("www-authenticate"):
            parsed = auth.parse_challenge(challenge)
            if parsed.is_bearer and own_answer:
                self.upstream.remember_challenge(registry.name, parsed)
            if self.clientauth.enabled:
                continue
            headers.append(("www-authenticate", auth.rewrite_challenge(parsed, realm).format()))
        if response.status_code == 401 and self._sent_own_token(exchange, registry):
            # The relay's own upstream token did not do (revoked, or the operator's
            # rights changed): forget it, so the client's next try fetches a fresh one.
            self.tokens.forget(registry.name, [route.upstream_name])
        if self.clientauth.enabled and response.status_code == 401:
            # The client comes back through the relay's /token.
            scope = f"repository:{route.upstream_name}:pull" if route.upstream_name else None
            headers.append(("www-authenticate", self.clientauth.challenge(realm, scope)))
        if route.kind is routing.Kind.BASE and response.status_code == 200 and own_answer:
            self.upstream.remember_challenge(registry.name, None)
        headers.extend(
            ("link", header_policy.rewrite_link(link, route.upstream_name, route.name))
            for link in response.headers.get_list("link")
        )
        # The relay's own version header, once: the upstream's copy is not passed too.
        headers = [h for h in headers if h[0] != API_VERSION_HEADER[0]]
        headers.append(API_VERSION_HEADER)
        return headers

    async def _stream(
        self,
        exchange: Exchange,
        response: httpx.Response,
        headers: header_policy.Headers,
        verifier: Verifier | None,
    ) -> None:
        await exchange.start(response.status_code, headers)
        if exchange.method == "HEAD":
            await exchange.body(b"", more=False)
            return
        failure: RelayError | None = None
        streams = self.metrics.active_streams
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, exchange, nursery.cancel_scope)
            try:
                with streams.track_inprogress():
                    await self._pump(exchange, response, verifier)
            except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _pump(
        self, exchange: Exchange, response: httpx.Response, verifier: Verifier | None
    ) -> None:
        # Both generators are closed here: `held_back` does not close the one it reads.
        async with contextlib.aclosing(self.chunks(response, exchange)) as read:
            chunks = held_back(read, verifier) if verifier is not None else read
            async with contextlib.aclosing(chunks) as body:
                async for chunk in body:
                    await exchange.body(chunk, more=True)
        await exchange.body(b"", more=False)

    async def chunks(self, response: httpx.Response, exchange: Exchange) -> AsyncGenerator[bytes]:
        """The upstream body as it arrives, counted in the metrics; a response from
        `Upstream.open` raises only `RelayError`s while it is read."""
        async for chunk in response.aiter_raw():
            self.observer.upstream_read(exchange, chunk)
            yield chunk
