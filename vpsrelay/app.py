"""The ASGI application: a request in, routed by the core, relayed to the upstream.

Responses stream: each upstream chunk is sent as it arrives, `send` waits for
the client (backpressure), and a client that disconnects cancels the upstream
request. Errors are rendered in one place, as OCI JSON bodies.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit

import trio

from vpsrelay import __version__, download, observe
from vpsrelay.clientauth import ClientAuth
from vpsrelay.core import auth, forwarding, headers as header_policy, routing
from vpsrelay.core.digest import Verifier, held_back
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.core.registries import DOCKER_HUB, Registry, RegistryTable
from vpsrelay.errors import ClientError, Denied, NotFound, RelayError
from vpsrelay.exchange import (
    API_VERSION_HEADER,
    Exchange,
    Receive,
    Scope,
    Send,
    content_length,
    read_request_body,
    serve_lifespan,
    watch_disconnect,
)
from vpsrelay.guard import Guard
from vpsrelay.health import Health
from vpsrelay.metrics import Metrics
from vpsrelay.upstream import MAX_TOKEN_ANSWER_BYTES, USER_AGENT, Upstream, read_body

if TYPE_CHECKING:
    import httpx

    from vpsrelay.cache.front import CacheFront
    from vpsrelay.cache.store import BlobStore
    from vpsrelay.config import RegistryConfig, Settings

# Sees the upstream's answer before the client does; True: it answered the client itself.
RelayHook = Callable[["httpx.Response", header_policy.Headers], Awaitable[bool]]

access_log = logging.getLogger("vpsrelay.access")
log = logging.getLogger("vpsrelay.app")

MAX_TOKEN_FORM_BYTES = 64 * 1024


class RelayApp:
    """The ASGI callable."""

    def __init__(
        self, settings: Settings, upstream: Upstream, store: BlobStore | None = None
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.registries = {registry.name: registry for registry in settings.registries}
        self.table = registry_table(settings)
        self.started = time.monotonic()
        self.health = Health(settings.data_dir)
        self.metrics = Metrics(certificate_not_after=self.health.tls.expiry)
        self.guard = Guard(settings)
        self.clientauth = ClientAuth(settings, upstream)
        self.cache: CacheFront | None = None
        if store is not None:
            from vpsrelay.cache.front import CacheFront

            self.cache = CacheFront(self, store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Hypercorn's trio worker crashes at start-up if lifespan is ignored.
            await serve_lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
        )
        server = scope.get("server") or ("localhost", 0)
        view = forwarding.client_view(
            peer=(scope.get("client") or ("", 0))[0],
            scheme=scope.get("scheme", "http"),
            headers=headers,
            server_host=f"{server[0]}:{server[1]}",
            trusted_proxies=self.settings.server.trusted_proxies,
            public_url=self.settings.server.public_url,
        )
        exchange = Exchange(
            method=scope["method"].upper(),
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            view=view,
            receive=receive,
            send=send,
            peer=(scope.get("client") or ("", 0))[0],
            raw_path=(scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1"),
            send_timeout=self.settings.limits.send_timeout,
        )
        try:
            await self._dispatch(exchange)
        except RelayError as exc:
            observe.failed(self, exchange, exc)
            if exchange.status:
                # Headers are out: returning without finishing the body makes the server
                # break the connection, so the client sees a short read, not a clean end.
                exchange.aborted = True
                log.warning("aborted %s %s mid-body: %s", exchange.method, exchange.path, exc)
                return
            if exc.status < 500:
                self.guard.record(
                    exc, client_ip=exchange.view.client_ip, method=exchange.method,
                    path=exchange.raw_path,
                )  # fmt: skip
            await exchange.respond_error(
                exc.status,
                (("content-type", "application/json"), *exc.headers),
                exc.to_registry_body(),
            )
        except Exception:
            log.exception("bug while serving %s %s", exchange.method, exchange.path)
            if exchange.status:
                raise
            error = RelayError("internal error in the relay")
            await exchange.respond_error(
                500, (("content-type", "application/json"),), error.to_registry_body()
            )
        finally:
            observe.finished(self, exchange)
            self._log(exchange)

    def _log(self, exchange: Exchange) -> None:
        if self.settings.log.access_log:
            observe.access_log(exchange)

    async def _dispatch(self, exchange: Exchange) -> None:
        if exchange.path == "/healthz" and exchange.method in ("GET", "HEAD"):
            await self._healthz(exchange)
            return
        self.guard.admit(
            method=exchange.method, raw_path=exchange.raw_path, headers=exchange.headers,
            client_ip=exchange.view.client_ip, host=exchange.view.host,
        )  # fmt: skip
        if await observe.serve_operator_path(self, exchange):
            return  # /, /metrics, /readyz
        ns = next((v for k, v in parse_qsl(exchange.query) if k == "ns"), None)
        route = routing.route(
            exchange.method, exchange.path, table=self.table, host=exchange.view.host, ns=ns
        )
        exchange.route = route
        self.guard.check_route(route)
        if route.kind is routing.Kind.TOKEN:
            await self._token(exchange, route)
            return
        if route.kind is routing.Kind.DOWNLOAD:  # built of subrequests to this app
            await download.serve(self, exchange)
            return
        if self.clientauth.enabled:
            realm = self._relay_realm(exchange, self.registries[route.registry])
            exchange.user = await self.clientauth.verify(
                exchange.headers, route, realm, exchange.view.client_ip
            )
            if route.kind is routing.Kind.BASE:  # the relay answers for itself
                await exchange.respond(200, (("content-type", "application/json"),), b"{}")
                return
        if route.kind is routing.Kind.BLOB and exchange.method == "GET":
            client_ip = exchange.view.client_ip
            sent = lambda: exchange.bytes_sent  # noqa: E731
            async with self.guard.download(client_ip, exchange.user, sent) as meter:
                exchange.meter = meter
                await self._serve(exchange, route)
            return
        await self._serve(exchange, route)

    async def _serve(self, exchange: Exchange, route: routing.Route) -> None:
        """From the cache when it has a say, else straight from the upstream."""
        if self.cache is not None and route.kind is routing.Kind.BASE:
            await self.cache.base(exchange, route)
        elif self.cache is not None and route.kind in (routing.Kind.MANIFEST, routing.Kind.BLOB):
            await self.cache.serve(exchange, route)
        else:
            await self._relay(exchange, route, route.upstream_path)

    async def _healthz(self, exchange: Exchange) -> None:
        """Liveness: the process answers. Cheap, no upstream, for HEALTHCHECK and probes."""
        status = {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }
        body = json.dumps(status).encode()
        await exchange.respond(200, (("content-type", "application/json"),), body)

    def _relay_realm(self, exchange: Exchange, registry: RegistryConfig) -> str:
        """The relay's token endpoint for `registry` (Docker Hub keeps the plain `/token`)."""
        if registry.name == DOCKER_HUB:
            return f"{exchange.view.base_url}/token"
        return f"{exchange.view.base_url}/token/{registry.name}"

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
        if self.clientauth.enabled:
            return await self.clientauth.upstream_headers(
                exchange.headers, registry, route.upstream_name
            )
        headers = header_policy.upstream_request_headers(exchange.headers, USER_AGENT)
        client_auth = header_policy.get(headers, "authorization")
        if client_auth is not None and _is_placeholder(client_auth):
            headers = tuple((k, v) for k, v in headers if k != "authorization")
            if registry.has_credentials:
                return (*headers, *await self._operator_credentials(registry, route))
            return headers
        if client_auth is None and registry.has_credentials:
            await self.upstream.challenge(registry)  # learn (or recall) its scheme
            if self.upstream.known_scheme(registry.name) == "basic":
                return (*headers, ("authorization", _basic(registry)))
        elif client_auth is not None and self.upstream.known_scheme(registry.name) == "none":
            return tuple((k, v) for k, v in headers if k != "authorization")
        return headers

    async def _operator_credentials(
        self, registry: RegistryConfig, route: routing.Route
    ) -> header_policy.Headers:
        """The relay's own authorization for `route`, earned with the operator's credentials:
        a pull token for the route's repository (kept server-side), or Basic credentials."""
        challenge = await self.upstream.challenge(registry)
        if challenge is not None:
            if route.upstream_name or route.kind is routing.Kind.BASE:
                names = [route.upstream_name] if route.upstream_name else []
                token = await self.clientauth.upstream_token(registry, names)
                if token:
                    return (("authorization", f"Bearer {token}"),)
            return ()
        if self.upstream.known_scheme(registry.name) == "basic":
            return (("authorization", _basic(registry)),)
        return ()

    def _sent_own_token(self, exchange: Exchange, registry: RegistryConfig) -> bool:
        """Whether the upstream request carried a token of the relay's own (not the
        client's): always with client authentication, else for a placeholder."""
        if self.clientauth.enabled:
            return True
        client_auth = header_policy.get(exchange.headers, "authorization")
        return registry.has_credentials and client_auth is not None and _is_placeholder(client_auth)

    async def _relay(
        self, exchange: Exchange, route: routing.Route, path: str, hook: RelayHook | None = None
    ) -> None:
        # Each holds an upstream connection while its client reads: capped per client IP.
        with self.guard.upstream_stream(exchange.view.client_ip):
            await self._relay_upstream(exchange, route, path, hook)

    async def _relay_upstream(
        self, exchange: Exchange, route: routing.Route, path: str, hook: RelayHook | None
    ) -> None:
        registry = self.registries[route.registry]
        query = _upstream_query(exchange.query, route)
        base = registry.search_url if route.kind is routing.Kind.SEARCH else registry.url
        if base is None:
            raise NotFound(f"{registry.name} has no search endpoint configured")
        url = f"{base}{path}{'?' + query if query else ''}"
        request = UpstreamRequest(
            exchange.method, url, await self.upstream_headers(exchange, registry, route)
        )
        began = time.monotonic()
        async with self.upstream.open(
            request, what=registry.name, registry=registry.name
        ) as response:
            exchange.upstream_seconds = time.monotonic() - began
            observe.upstream_answered(self, exchange, response)
            if response.status_code == 429:
                await observe.too_many_requests(self, exchange, response)
                return
            if exchange.meter is not None and 200 <= response.status_code < 300:
                # Admitted before the hook, where a cache fill would begin for a download
                # the budget then refused.
                exchange.meter.admit(content_length(response.headers.get("content-length")))
            # What a redirect target (a CDN) says about authentication is not the
            # registry's word: only the registry's own answers teach the relay its realm.
            own_answer = self.upstream.is_own_origin(registry.name, str(response.url))
            headers = list(header_policy.client_response_headers(response.headers.multi_items()))
            for challenge in response.headers.get_list("www-authenticate"):
                parsed = auth.parse_challenge(challenge)
                if parsed.is_bearer and own_answer:
                    self.upstream.remember_challenge(registry.name, parsed)
                if self.clientauth.enabled:
                    continue
                rewritten = auth.rewrite_challenge(parsed, self._relay_realm(exchange, registry))
                headers.append(("www-authenticate", rewritten.format()))
            if response.status_code == 401 and self._sent_own_token(exchange, registry):
                # The relay's own upstream token did not do (revoked, or the operator's
                # rights changed): forget it, so the client's next try fetches a fresh one.
                self.clientauth.forget_upstream_token(registry.name, route.upstream_name)
            if self.clientauth.enabled and response.status_code == 401:
                # The client comes back through the relay's /token.
                scope = f"repository:{route.upstream_name}:pull" if route.upstream_name else None
                realm = self._relay_realm(exchange, registry)
                headers.append(("www-authenticate", self.clientauth.challenge(realm, scope)))
            if route.kind is routing.Kind.BASE and response.status_code == 200 and own_answer:
                self.upstream.remember_challenge(registry.name, None)
            headers.extend(
                ("link", header_policy.rewrite_link(link, route.upstream_name, route.name))
                for link in response.headers.get_list("link")
            )
            headers.append(API_VERSION_HEADER)
            checked, verifier = header_policy.checked_digest(
                route, exchange.method, response.status_code, tuple(headers)
            )
            if hook is not None and await hook(response, checked):
                return
            await self._stream(exchange, response, checked, verifier, registry.name)

    async def _stream(
        self,
        exchange: Exchange,
        response: httpx.Response,
        headers: header_policy.Headers,
        verifier: Verifier | None,
        what: str,
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
                    await self._pump(exchange, response, verifier, what)
            except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _pump(
        self, exchange: Exchange, response: httpx.Response, verifier: Verifier | None, what: str
    ) -> None:
        # Both generators are closed here: `held_back` does not close the one it reads.
        async with contextlib.aclosing(upstream_chunks(response, what, self, exchange)) as read:
            chunks = held_back(read, verifier) if verifier is not None else read
            async with contextlib.aclosing(chunks) as body:
                async for chunk in body:
                    await exchange.body(chunk, more=True)
        await exchange.body(b"", more=False)

    def _token_registry(self, route: routing.Route, params: list[tuple[str, str]]) -> str:
        """Which registry a token request is for.

        The route knows when the realm, Host or `ns` named one. Otherwise the scopes do:
        clients that pinged `/v2/` got Docker Hub's realm, and ask it for
        `repository:ghcr/owner/app:pull` when they pull through a path prefix.

        Raises:
            ClientError: scopes for repositories of different registries.
        """
        if route.registry:
            return route.registry
        chosen: set[str] = set()
        for value in (v for k, v in params if k == "scope"):
            for text in value.split(" "):
                scope = auth.Scope.parse(text)
                if scope is not None and scope.resource_type.startswith("repository"):
                    chosen.add(self.table.by_path(scope.name).registry.name)
        if len(chosen) > 1:
            raise ClientError("one token request cannot cover repositories of several registries")
        if chosen:
            return chosen.pop()
        if self.table.default is None:
            raise NotFound("Docker Hub is disabled on this relay")
        return self.table.default.name

    def _serves(self, registry: RegistryConfig) -> Callable[[str], bool]:
        """Whether the relay serves a repository (upstream name) of `registry`."""

        def serves(name: str) -> bool:
            route = routing.Route(routing.Kind.MANIFEST, registry.name, name, name)
            try:
                self.guard.check_route(route)
            except Denied:
                return False
            return True

        return serves

    def _scope_names(self, route: routing.Route, registry: RegistryConfig) -> Callable[[str], str]:
        """Maps a token scope's repository name to `registry`'s name for it."""

        def to_upstream(name: str) -> str:
            selection = self.table.by_path(name) if not route.registry else None
            if selection is not None and selection.registry.name == registry.name:
                name = selection.name  # strip the path prefix the client used
            return routing.to_upstream_name(registry.name, name)

        return to_upstream

    async def _token(self, exchange: Exchange, route: routing.Route) -> None:
        if exchange.method == "POST":
            # A form is sent with its head: it gets the time a head gets.
            form = await read_request_body(
                exchange, self.settings.server.head_timeout, MAX_TOKEN_FORM_BYTES
            )
            raw = form.decode("utf-8", "replace")
            params = parse_qsl(raw, keep_blank_values=True)
        else:
            params = parse_qsl(exchange.query, keep_blank_values=True)
        params = [(k, v) for k, v in params if k != "ns"]
        registry = self.registries[self._token_registry(route, params)]
        exchange.route = dataclasses.replace(route, registry=registry.name)  # for the log
        to_upstream = self._scope_names(route, registry)
        if self.clientauth.enabled:
            body = await self.clientauth.token(
                method=exchange.method, params=params, headers=exchange.headers,
                registry=registry, to_upstream=to_upstream,
                realm=self._relay_realm(exchange, registry), client_ip=exchange.view.client_ip,
            )  # fmt: skip
            await exchange.respond(200, (("content-type", "application/json"),), body)
            return
        await self._token_upstream(exchange, registry, params, to_upstream)

    async def _token_upstream(
        self,
        exchange: Exchange,
        registry: RegistryConfig,
        params: list[tuple[str, str]],
        to_upstream: Callable[[str], str],
    ) -> None:
        """An open relay's `/token`: a token that can only pull, and never one minted with
        the operator's credentials.

        A client with credentials of its own (Basic, or the OAuth2 form) gets its request
        passed to the registry's token service with them, its scopes cut down to `pull`
        on the repositories this relay serves. Its refresh token (`docker login`'s
        identity token) passes too: it stands for the client's own password, which the
        client holds anyway, and saves it from storing that password. A client without
        credentials gets a placeholder when the operator configured credentials for the
        registry: the token they earn stays in the relay (`upstream_headers`).
        """
        own_credentials = _has_own_credentials(exchange.method, params, exchange.headers)
        challenge = await self.upstream.challenge(registry)
        realm = challenge.realm if challenge is not None else None
        if realm is None or (registry.has_credentials and not own_credentials):
            # Checked (and refused past `auth.MAX_SCOPES`), but nothing is fetched: the
            # relay gets its own token when the client pulls (`_operator_credentials`), so
            # an anonymous client's scopes cost no request with the operator's credentials.
            auth.pull_scopes(
                [v for k, v in params if k == "scope"], to_upstream, self._serves(registry)
            )
            await exchange.respond(
                200, (("content-type", "application/json"),), _placeholder_reply(registry)
            )
            return
        assert challenge is not None
        params = auth.token_request_params(
            params, to_upstream, challenge.service,
            admits=self._serves(registry), offline=own_credentials,
        )  # fmt: skip
        # Only the client's own credentials go to the token service, never the operator's.
        forwarded = header_policy.select(exchange.headers, frozenset({"authorization", "accept"}))
        if any(_is_placeholder(v) for k, v in forwarded if k == "authorization"):
            forwarded = tuple((k, v) for k, v in forwarded if k != "authorization")
        agent = ("user-agent", header_policy.get(exchange.headers, "user-agent") or USER_AGENT)
        content = None
        if exchange.method == "POST":
            content = urlencode(params).encode()
            forwarded += (("content-type", "application/x-www-form-urlencoded"),)
            url = realm
        else:
            separator = "&" if "?" in realm else "?"
            url = f"{realm}{separator}{urlencode(params)}" if params else realm
        request = UpstreamRequest(exchange.method, url, (*forwarded, agent))
        began = time.monotonic()
        what = f"{registry.name} token"
        async with self.upstream.open(request, what=what, content=content) as response:
            exchange.upstream_seconds = time.monotonic() - began
            observe.upstream_answered(self, exchange, response)
            # Read whole before answering (a token is small): a token service that fails
            # mid-body is then a clean 504 or 502, not a 200 cut short.
            body = await read_body(response, what=what, limit=MAX_TOKEN_ANSWER_BYTES, raw=True)
            observe.upstream_read(self, exchange, body)
        headers = [
            (k, v)
            for k, v in header_policy.client_response_headers(response.headers.multi_items())
            if k not in ("www-authenticate", "content-length")  # `respond` counts the body
        ]
        await exchange.respond(response.status_code, tuple(headers), body)


# The query parameters each kind passes upstream (`ns` and anything else stay here).
_PASSED_QUERY = {
    routing.Kind.TAGS: {"n", "last"},
    routing.Kind.REFERRERS: {"artifactType"},
    routing.Kind.SEARCH: {"q", "n", "page"},
}


def registry_table(settings: Settings) -> RegistryTable:
    """The router's view of the configured registries."""
    base_domains = list(settings.server.base_domains)
    if settings.server.public_url:
        base_domains.append(urlsplit(settings.server.public_url).hostname or "")
    registries = (Registry(r.name, r.url, r.aliases, r.subdomain) for r in settings.registries)
    return RegistryTable(registries, [d for d in base_domains if d])


# What an open relay's `/token` answers instead of a token: for a registry that needs none
# (`anonymous`), and for one the relay holds the operator's credentials for (the relay
# attaches its own token upstream). Never sent upstream.
ANONYMOUS_PLACEHOLDER = "anonymous"
OPERATOR_PLACEHOLDER = "vpsrelay-relay-credentials"
PLACEHOLDER_TOKEN_SECONDS = 300


def _placeholder_reply(registry: RegistryConfig) -> bytes:
    token = OPERATOR_PLACEHOLDER if registry.has_credentials else ANONYMOUS_PLACEHOLDER
    reply: dict[str, object] = {"token": token, "access_token": token}
    if registry.has_credentials:
        reply["expires_in"] = PLACEHOLDER_TOKEN_SECONDS
    return json.dumps(reply).encode()


def _is_placeholder(authorization: str) -> bool:
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and value.strip() in (
        ANONYMOUS_PLACEHOLDER, OPERATOR_PLACEHOLDER,
    )  # fmt: skip


def _has_own_credentials(
    method: str, params: list[tuple[str, str]], headers: header_policy.Headers
) -> bool:
    """Whether a token request carries the client's own credentials (Basic or Bearer, or
    the OAuth2 form's password or refresh token), not just a placeholder of ours."""
    if method == "POST":
        return any(k in ("password", "refresh_token") and v for k, v in params)
    authorization = header_policy.get(headers, "authorization")
    return authorization is not None and not _is_placeholder(authorization)


def _basic(registry: RegistryConfig) -> str:
    assert registry.username is not None
    assert registry.password is not None
    pair = f"{registry.username}:{registry.password.reveal()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _upstream_query(query: str, route: routing.Route) -> str:
    """The query passed upstream: pagination, referrer filters and search terms only."""
    allowed = _PASSED_QUERY.get(route.kind)
    if not allowed:
        return ""
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in allowed])


async def upstream_chunks(
    response: httpx.Response, what: str, app: RelayApp, exchange: Exchange
) -> AsyncGenerator[bytes]:
    """The upstream body as it arrives, counted in the metrics; a response from
    `Upstream.open` raises only `RelayError`s while it is read."""
    async for chunk in response.aiter_raw():
        observe.upstream_read(app, exchange, chunk)
        yield chunk
