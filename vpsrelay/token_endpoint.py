"""The relay's `/token`: its own token service, or an open relay's pull-only pass-through.

With client authentication on, `ClientAuth` answers with relay tokens. Otherwise a
client with credentials of its own has its request passed to the registry's token
service, cut down to pulls of what the relay serves; a client without gets a
placeholder (`core.placeholders`) and the relay attaches its own token upstream.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from vpsrelay.core import auth, headers as header_policy, placeholders, routing
from vpsrelay.errors import ClientError, Denied, NotFound
from vpsrelay.exchange import Exchange, read_request_body
from vpsrelay.upstream import USER_AGENT

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from vpsrelay.access.clientauth import ClientAuth
    from vpsrelay.access.guard import Guard
    from vpsrelay.config import RegistryConfig, Settings
    from vpsrelay.core.registries import RegistryTable
    from vpsrelay.ops.observe import Observer
    from vpsrelay.upstream.tokens import TokenClient

MAX_TOKEN_FORM_BYTES = 64 * 1024


class TokenEndpoint:
    """Answers `/token` and `/token/<registry>`."""

    def __init__(
        self,
        settings: Settings,
        table: RegistryTable,
        tokens: TokenClient,
        clientauth: ClientAuth,
        guard: Guard,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.table = table
        self.tokens = tokens
        self.upstream = tokens.upstream
        self.clientauth = clientauth
        self.guard = guard
        self.observer = observer
        self.registries = {registry.name: registry for registry in settings.registries}

    async def serve(self, exchange: Exchange, route: routing.Route) -> None:
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
        realm = routing.relay_realm(exchange.view.base_url, registry.name)
        if self.clientauth.enabled:
            body = await self.clientauth.token(
                method=exchange.method, params=params, headers=exchange.headers,
                registry=registry, to_upstream=to_upstream,
                realm=realm, client_ip=exchange.view.client_ip,
            )  # fmt: skip
            await exchange.respond(200, (("content-type", "application/json"),), body)
            return
        await self._token_upstream(exchange, registry, params, to_upstream)

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
        registry: the token they earn stays in the relay (`Forwarder.upstream_headers`).
        """
        own_credentials = placeholders.has_own_credentials(
            exchange.method, params, exchange.headers
        )
        challenge = await self.upstream.challenge(registry)
        realm = challenge.realm if challenge is not None else None
        if realm is None or (registry.has_credentials and not own_credentials):
            # Checked (and refused past `auth.MAX_SCOPES`), but nothing is fetched: the
            # relay gets its own token when the client pulls (`Forwarder.upstream_headers`), so
            # an anonymous client's scopes cost no request with the operator's credentials.
            auth.pull_scopes(
                [v for k, v in params if k == "scope"], to_upstream, self._serves(registry)
            )
            await exchange.respond(
                200,
                (("content-type", "application/json"),),
                placeholders.placeholder_reply(registry.has_credentials),
            )
            return
        assert challenge is not None
        params = auth.token_request_params(
            params, to_upstream, challenge.service,
            admits=self._serves(registry), offline=own_credentials,
        )  # fmt: skip
        # Only the client's own credentials go to the token service, never the operator's.
        forwarded = header_policy.select(exchange.headers, frozenset({"authorization", "accept"}))
        forwarded = placeholders.without_placeholder(forwarded)
        agent = ("user-agent", header_policy.get(exchange.headers, "user-agent") or USER_AGENT)
        began = time.monotonic()

        def answered(response: httpx.Response) -> None:
            exchange.upstream_seconds = time.monotonic() - began
            self.observer.upstream_answered(exchange, response)

        relayed = await self.tokens.relay_request(
            registry, challenge, exchange.method, params, (*forwarded, agent), answered=answered
        )
        self.observer.upstream_read(exchange, relayed.body)
        headers = [
            (k, v)
            for k, v in header_policy.client_response_headers(relayed.headers)
            if k not in ("www-authenticate", "content-length")  # `respond` counts the body
        ]
        await exchange.respond(relayed.status, tuple(headers), relayed.body)
