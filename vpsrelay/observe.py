"""What the relay tells its operator: metrics, readiness, the access log, the page at `/`.

`app.py` calls these hooks where an exchange starts and ends and where an upstream
answer arrives; they only record (metrics, health, the log line) or answer the
operator paths, so the relaying code stays what it was.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from vpsrelay import landing
from vpsrelay.core import forwarding, headers as header_policy, logline, ratelimit, routing
from vpsrelay.errors import RelayError, UpstreamError
from vpsrelay.exchange import Exchange, serve_lifespan
from vpsrelay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, NO_REGISTRY

if TYPE_CHECKING:
    import httpx

    from vpsrelay.app import RelayApp
    from vpsrelay.exchange import Receive, Scope, Send

access = logging.getLogger("vpsrelay.access")
log = logging.getLogger("vpsrelay.observe")

JSON = (("content-type", "application/json"),)
TEXT = (("content-type", "text/plain; charset=utf-8"),)
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class TooManyRequests(RelayError):
    """The upstream's rate limit was hit (its 429, reworded to say whose limit)."""

    status = 429
    code = "TOOMANYREQUESTS"


def kind_of(exchange: Exchange) -> str:
    """The `kind` label: manifest, blob, token or other."""
    route = exchange.route
    if route is None:
        return "other"
    if route.kind in (routing.Kind.MANIFEST, routing.Kind.BLOB, routing.Kind.TOKEN):
        return route.kind.value
    return "other"


def registry_of(exchange: Exchange) -> str:
    return exchange.route.registry if exchange.route is not None else NO_REGISTRY


def reason_of(exc: RelayError) -> str:
    """`NameInvalid` -> `name_invalid`."""
    return _CAMEL.sub("_", type(exc).__name__).lower()


# --- hooks app.py calls


def failed(app: RelayApp, exchange: Exchange, exc: RelayError) -> None:
    """An exchange ended in a `RelayError`."""
    if isinstance(exc, UpstreamError):
        app.health.failed(registry_of(exchange))
    elif exc.status < 500 and not exchange.status:
        app.metrics.refused(reason_of(exc))


def finished(app: RelayApp, exchange: Exchange) -> None:
    """An exchange is over (answered, failed or abandoned)."""
    registry, kind = registry_of(exchange), kind_of(exchange)
    app.metrics.request_done(registry, kind, exchange.status, exchange.bytes_sent)
    if kind == "token":
        app.metrics.token_request(registry, exchange.status)


def upstream_answered(app: RelayApp, exchange: Exchange, response: httpx.Response) -> None:
    """The upstream's final response headers arrived for this exchange."""
    registry, kind = registry_of(exchange), kind_of(exchange)
    status = response.status_code
    exchange.upstream_status = status
    app.metrics.upstream_answered(registry, kind, status, exchange.upstream_seconds or 0.0)
    if status >= 500:
        app.health.failed(registry)
        return
    skew = app.health.answered(registry, response.headers.get("date"))
    if skew is not None:
        app.metrics.clock_skew(registry, skew)
    budget = ratelimit.parse((k.lower(), v) for k, v in response.headers.multi_items())
    if budget is not None:
        app.health.state(registry).ratelimit = budget
        app.metrics.ratelimit(registry, budget)


def upstream_read(app: RelayApp, exchange: Exchange, chunk: bytes) -> None:
    app.metrics.upstream_read(registry_of(exchange), kind_of(exchange), len(chunk))


async def too_many_requests(app: RelayApp, exchange: Exchange, response: httpx.Response) -> None:
    """Pass the upstream's 429 on with `Retry-After` and a message naming whose limit it is."""
    registry = registry_of(exchange)
    retry = ratelimit.retry_after(response.headers.get("retry-after"))
    budget = app.health.state(registry).ratelimit
    message = ratelimit.too_many_requests_message(registry, budget, retry)
    log.warning("upstream rate limit: %s", message)
    app.metrics.refused("upstream_rate_limited")
    error = TooManyRequests(message)
    passed = header_policy.select(
        response.headers.multi_items(),
        frozenset({"ratelimit-limit", "ratelimit-remaining", "docker-ratelimit-source"}),
    )
    await exchange.respond(
        429, (*JSON, ("retry-after", str(retry)), *passed), error.to_registry_body()
    )


def access_log(exchange: Exchange) -> None:
    """One structured line per request; the formatter renders logfmt or JSON."""
    if not access.isEnabledFor(logging.INFO):
        return  # the line would be dropped: do not build it
    route = exchange.route
    query = f"?{exchange.query}" if exchange.query else ""
    upstream_ms = (
        round(exchange.upstream_seconds * 1000, 1)
        if exchange.upstream_seconds is not None
        else None
    )
    fields: list[logline.Field] = [
        ("client", exchange.view.client_ip),
        ("method", exchange.method),
        ("path", logline.redact(exchange.path + query)),
        ("status", exchange.status),
        ("bytes", exchange.bytes_sent),
        ("duration_ms", round((time.monotonic() - exchange.started) * 1000, 1)),
        ("user", exchange.user),
        ("registry", route.registry if route is not None else None),
        ("repository", (route.upstream_name or None) if route is not None else None),
        ("kind", kind_of(exchange)),
        ("upstream_status", exchange.upstream_status),
        ("upstream_ms", upstream_ms),
        ("cache", exchange.cache),
        ("disconnected", True if exchange.disconnected else None),
        ("aborted", True if exchange.aborted else None),
    ]
    access.info(logline.logfmt(fields), extra={"fields": fields})


# --- the operator paths: /, /metrics, /readyz


def metrics_allowed(app: RelayApp, exchange: Exchange) -> bool:
    """A Bearer token that matches, or a client address on the allow list.

    A request that came through a proxy the relay does not trust (it carries
    X-Forwarded-For, yet its peer is not a trusted proxy) is judged by token only:
    behind such a proxy every client would seem to come from the proxy's address.
    """
    cfg = app.settings.metrics
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


async def serve_operator_path(
    app: RelayApp, exchange: Exchange, *, operator_listener: bool = False
) -> bool:
    """Answer `/`, `/metrics` and `/readyz`; False for every other path."""
    path, method = exchange.path, exchange.method
    if method not in ("GET", "HEAD"):
        return False
    if path == "/metrics":
        if not app.settings.metrics.enabled or (
            app.settings.metrics.listen is not None and not operator_listener
        ):
            app.metrics.refused("not_found")
            await exchange.respond(404, TEXT, landing.NOT_FOUND)
        elif not metrics_allowed(app, exchange):
            app.metrics.refused("metrics_forbidden")
            body = b"403 forbidden: /metrics needs an allowed address or the metrics token\n"
            await exchange.respond(403, TEXT, body)
        else:
            await exchange.respond(
                200, (("content-type", METRICS_CONTENT_TYPE),), app.metrics.render()
            )
        return True
    if path == "/readyz":
        ready, report = await app.health.readiness(app.settings.registries, app.upstream)
        body = json.dumps(report).encode()
        await exchange.respond(200 if ready else 503, JSON, body)
        return True
    if path == "/" and not operator_listener:
        if not app.settings.ui.landing_page:
            await exchange.respond(404, TEXT, landing.NOT_FOUND)
            return True
        budgets = {
            name: state.ratelimit
            for name, state in app.health.upstreams.items()
            if state.ratelimit is not None
        }
        page, csp = landing.render(app.settings, exchange.view.base_url, budgets)
        headers = (
            ("content-type", "text/html; charset=utf-8"),
            ("content-security-policy", csp),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-cache"),
        )
        await exchange.respond(200, headers, page)
        return True
    return False


class OperatorApp:
    """The ASGI app of `metrics.listen`: /metrics, /readyz and /healthz only."""

    def __init__(self, relay: RelayApp) -> None:
        self.relay = relay

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
            trusted_proxies=self.relay.settings.server.trusted_proxies,
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
            await self.relay._healthz(exchange)
        elif not await serve_operator_path(self.relay, exchange, operator_listener=True):
            await exchange.respond(404, TEXT, landing.NOT_FOUND)


def log_extra(record: logging.LogRecord) -> list[tuple[str, Any]] | None:
    """The structured fields of an access-log record, if it has them."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, list) else None
