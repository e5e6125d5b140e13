"""The paths that answer the operator: `/`, `/metrics`, `/readyz`, `/healthz`.

`OperatorPaths` serves them on the relay's own listeners (asked first by the app) and,
as `OperatorApp`, on `metrics.listen`. It reads what `observe` recorded; it never
relays anything.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from typing import TYPE_CHECKING

import trio

from vpsrelay import __version__
from vpsrelay.core import forwarding, headers as header_policy
from vpsrelay.exchange import Exchange, serve_lifespan
from vpsrelay.ops import landing
from vpsrelay.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from vpsrelay.config import Settings
    from vpsrelay.exchange import Receive, Scope, Send
    from vpsrelay.ops.health import Health
    from vpsrelay.ops.metrics import Metrics
    from vpsrelay.upstream import Upstream

log = logging.getLogger("vpsrelay.operator")
JSON = (("content-type", "application/json"),)
TEXT = (("content-type", "text/plain; charset=utf-8"),)


class OperatorPaths:
    """Answers `/`, `/metrics`, `/readyz` and `/healthz` from the relay's state."""

    def __init__(
        self, settings: Settings, metrics: Metrics, health: Health, upstream: Upstream
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.upstream = upstream
        self.started = time.monotonic()

    async def healthz(self, exchange: Exchange) -> None:
        """Liveness: the process answers. Cheap, no upstream, for HEALTHCHECK and probes."""
        status = {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }
        await exchange.respond(200, JSON, json.dumps(status).encode())

    def metrics_allowed(self, exchange: Exchange) -> bool:
        """A Bearer token that matches, or a client address on the allow list.

        A request that came through a proxy the relay does not trust (it carries
        X-Forwarded-For, yet its peer is not a trusted proxy) is judged by token only:
        behind such a proxy every client would seem to come from the proxy's address.
        """
        cfg = self.settings.metrics
        authorization = header_policy.get(exchange.headers, "authorization") or ""
        scheme, _, credentials = authorization.partition(" ")
        if cfg.token is not None and scheme.lower() == "bearer":
            return hmac.compare_digest(credentials.strip().encode(), cfg.token.reveal().encode())
        proxied = header_policy.get(exchange.headers, "x-forwarded-for") is not None or (
            header_policy.get(exchange.headers, "forwarded") is not None
        )
        if proxied and exchange.view.client_ip == exchange.peer:
            return False
        try:
            address = ipaddress.ip_address(exchange.view.client_ip)
        except ValueError:
            return False
        return any(address in network for network in cfg.allow)

    async def serve(self, exchange: Exchange, *, operator_listener: bool = False) -> bool:
        """Answer `/`, `/metrics` and `/readyz`; False for every other path."""
        path, method = exchange.path, exchange.method
        if method not in ("GET", "HEAD"):
            return False
        if path == "/metrics":
            await self._metrics(exchange, operator_listener)
            return True
        if path == "/readyz":
            # The operator's account names and their state: for whom /metrics answers.
            detailed = operator_listener or self.metrics_allowed(exchange)
            ready, report = await self.health.readiness(
                self.settings.registries, self.upstream, detailed=detailed
            )
            await exchange.respond(200 if ready else 503, JSON, json.dumps(report).encode())
            return True
        if path == "/" and not operator_listener:
            await self._landing(exchange)
            return True
        return False

    async def _metrics(self, exchange: Exchange, operator_listener: bool) -> None:
        cfg = self.settings.metrics
        if not cfg.enabled or (cfg.listen is not None and not operator_listener):
            self.metrics.refused("not_found")
            await exchange.respond(404, TEXT, landing.NOT_FOUND)
        elif not self.metrics_allowed(exchange):
            self.metrics.refused("metrics_forbidden")
            body = b"403 forbidden: /metrics needs an allowed address or the metrics token\n"
            await exchange.respond(403, TEXT, body)
        elif self.metrics.multiprocess_dir is None:
            await exchange.respond(
                200, (("content-type", METRICS_CONTENT_TYPE),), self.metrics.render()
            )
        else:
            try:  # every worker's files and status: read off the event loop
                body = await trio.to_thread.run_sync(self._render_fleet)
            except (OSError, ValueError) as exc:  # the run directory was taken away
                log.warning("cannot read the workers' metrics: %s", exc)
                await exchange.respond(503, TEXT, b"503 the workers' metrics are unreadable\n")
                return
            await exchange.respond(200, (("content-type", METRICS_CONTENT_TYPE),), body)

    def _render_fleet(self) -> bytes:
        return self.metrics.render(self.health.survey())

    async def _landing(self, exchange: Exchange) -> None:
        if not self.settings.ui.landing_page:
            await exchange.respond(404, TEXT, landing.NOT_FOUND)
            return
        budgets = {
            name: state.ratelimit
            for name, state in self.health.upstreams.items()
            if state.ratelimit is not None
        }
        page, csp = landing.render(self.settings, exchange.view.base_url, budgets)
        headers = (
            ("content-type", "text/html; charset=utf-8"),
            ("content-security-policy", csp),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-cache"),
        )
        await exchange.respond(200, headers, page)


class OperatorApp:
    """The ASGI app of `metrics.listen`: /metrics, /readyz and /healthz only."""

    def __init__(self, paths: OperatorPaths) -> None:
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
        )
        peer = (scope.get("client") or ("", 0))[0]
        view = forwarding.client_view(
            peer=peer,
            scheme=scope.get("scheme", "http"),
            headers=headers,
            server_host="localhost",
            trusted_proxies=self.paths.settings.server.trusted_proxies,
            public_url=None,
        )
        exchange = Exchange(
            method=scope["method"].upper(),
            path=scope["path"],
            query="",
            headers=headers,
            view=view,
            receive=receive,
            send=send,
            peer=peer,
        )
        if exchange.path == "/healthz":
            await self.paths.healthz(exchange)
        elif not await self.paths.serve(exchange, operator_listener=True):
            await exchange.respond(404, TEXT, landing.NOT_FOUND)
