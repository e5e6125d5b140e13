"""The ASGI application: a request in, admitted by the guard, routed by the core, then
answered by the operator paths, the token endpoint, the cache or the forwarder.

Errors are rendered in one place, as OCI JSON bodies. Everything below is built here
once and wired together; nothing below imports this module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from vpsrelay import config, download
from vpsrelay.access.clientauth import ClientAuth
from vpsrelay.access.guard import Guard
from vpsrelay.cache.front import CacheFront
from vpsrelay.core import forwarding, routing
from vpsrelay.errors import RelayError
from vpsrelay.exchange import SUBREQUEST, Exchange, Receive, Scope, Send, serve_lifespan
from vpsrelay.forward import Forwarder
from vpsrelay.ops.health import Health
from vpsrelay.ops.metrics import Metrics
from vpsrelay.ops.observe import Observer, access_log
from vpsrelay.ops.operator_paths import OperatorPaths
from vpsrelay.token_endpoint import TokenEndpoint
from vpsrelay.upstream.tokens import TokenClient

if TYPE_CHECKING:
    from vpsrelay.cache.storage import BlobStore
    from vpsrelay.config import Settings
    from vpsrelay.upstream import Upstream

log = logging.getLogger("vpsrelay.app")


class RelayApp:
    """The ASGI callable."""

    def __init__(
        self, settings: Settings, upstream: Upstream, store: BlobStore | None = None
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.registries = {registry.name: registry for registry in settings.registries}
        self.table = config.registry_table(settings)
        self.health = Health(settings.data_dir)
        self.metrics = Metrics(certificate_not_after=self.health.tls.expiry)
        upstream.on_stale_retry = self.metrics.upstream_stale_retry
        self.guard = Guard(settings)
        self.downloads = download.Limits(settings.download, self.guard.shared)
        # The relay's own upstream tokens: one keeper for the relay, the cache, client auth.
        self.token_client = TokenClient(upstream)
        self.clientauth = ClientAuth(settings, self.token_client, self.guard.shared)
        self.observer = Observer(self.metrics, self.health)
        self.operator = OperatorPaths(settings, self.metrics, self.health, upstream)
        self.forwarder = Forwarder(
            settings, upstream, self.token_client, self.clientauth, self.guard, self.observer,
            self.metrics,
        )  # fmt: skip
        self.token_endpoint = TokenEndpoint(
            settings, self.table, self.token_client, self.clientauth, self.guard, self.observer
        )
        self.cache: CacheFront | None = None
        if store is not None:
            self.cache = CacheFront(self.forwarder, store)
            if store.stats().bucket is not None:
                self.health.cache_bucket = lambda: store.stats().bucket
                self.metrics.watch_cache_bucket(lambda: store.stats().bucket == "ok")

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
            subrequest=SUBREQUEST in (scope.get("extensions") or {}),
        )
        try:
            await self._dispatch(exchange)
        except RelayError as exc:
            self.observer.failed(exchange, exc)
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
            self.observer.finished(exchange)
            self._log(exchange)

    def _log(self, exchange: Exchange) -> None:
        if self.settings.log.access_log:
            access_log(exchange)

    async def _dispatch(self, exchange: Exchange) -> None:
        if exchange.path == "/healthz" and exchange.method in ("GET", "HEAD"):
            await self.operator.healthz(exchange)
            return
        self.guard.admit(
            method=exchange.method, raw_path=exchange.raw_path, headers=exchange.headers,
            client_ip=exchange.view.client_ip, host=exchange.view.host,
        )  # fmt: skip
        if await self.operator.serve(exchange):
            return  # /, /metrics, /readyz
        ns = next((v for k, v in parse_qsl(exchange.query) if k == "ns"), None)
        route = routing.route(
            exchange.method, exchange.path, table=self.table, host=exchange.view.host, ns=ns
        )
        exchange.route = route
        self.guard.check_route(route)
        if route.kind is routing.Kind.TOKEN:
            await self.token_endpoint.serve(exchange, route)
            return
        if route.kind is routing.Kind.DOWNLOAD:  # built of subrequests to this app
            await download.serve(self, exchange, self.downloads)
            return
        if self.clientauth.enabled:
            realm = routing.relay_realm(exchange.view.base_url, route.registry)
            exchange.user = await self.clientauth.verify(
                exchange.headers, route, realm, exchange.view.client_ip
            )
            if route.kind is routing.Kind.BASE:  # the relay answers for itself
                await exchange.respond(200, (("content-type", "application/json"),), b"{}")
                return
        # A download's blob subrequests are metered as the download (what it sends).
        if route.kind is routing.Kind.BLOB and exchange.method == "GET" and not exchange.subrequest:
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
            await self.forwarder.relay(exchange, route)
