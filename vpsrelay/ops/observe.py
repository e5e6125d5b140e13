"""What the relay records as it works: metrics, upstream health, the access log.

`Observer`'s hooks are called where an exchange ends and where an upstream answer
arrives; they only record (metrics, health, the log line), so the relaying code stays
what it was. The paths that show these to the operator are in `operator_paths`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import trio

from vpsrelay.core import headers as header_policy, logline, ratelimit, routing
from vpsrelay.errors import RelayError, UpstreamError
from vpsrelay.ops.metrics import NO_REGISTRY

if TYPE_CHECKING:
    import httpx

    from vpsrelay.core.credpool import CredentialState
    from vpsrelay.exchange import Exchange
    from vpsrelay.ops.health import Health
    from vpsrelay.ops.metrics import Metrics

access = logging.getLogger("vpsrelay.access")
log = logging.getLogger("vpsrelay.observe")

JSON = (("content-type", "application/json"),)
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


# --- hooks the relay calls


class Observer:
    """Records what happens to exchanges and upstream answers in metrics and health."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health

    def failed(self, exchange: Exchange, exc: RelayError) -> None:
        """An exchange ended in a `RelayError`."""
        if isinstance(exc, UpstreamError):
            self.health.failed(registry_of(exchange))
        elif exc.status < 500 and not exchange.status:
            self.metrics.refused(reason_of(exc))

    def finished(self, exchange: Exchange) -> None:
        """An exchange is over (answered, failed or abandoned)."""
        registry, kind = registry_of(exchange), kind_of(exchange)
        self.metrics.request_done(registry, kind, exchange.status, exchange.bytes_sent)
        if kind == "token":
            self.metrics.token_request(registry, exchange.status)

    def upstream_answered(self, exchange: Exchange, response: httpx.Response) -> None:
        """The upstream's final response headers arrived for this exchange."""
        registry, kind = registry_of(exchange), kind_of(exchange)
        status = response.status_code
        exchange.upstream_status = status
        self.metrics.upstream_answered(registry, kind, status, exchange.upstream_seconds or 0.0)
        if status >= 500:
            self.health.failed(registry)
            return
        skew = self.health.answered(registry, response.headers.get("date"))
        if skew is not None:
            self.metrics.clock_skew(registry, skew)
        budget = ratelimit.parse((k.lower(), v) for k, v in response.headers.multi_items())
        if budget is not None:
            self.health.state(registry).ratelimit = budget
            self.metrics.ratelimit(registry, budget)

    def credential_state(self, registry: str, state: CredentialState) -> None:
        """The registry answered a request made with one of the operator's credentials:
        its budget (and rest) as now known, for `/metrics` and `/readyz`."""
        self.health.state(registry).credentials[state.name] = state
        rest = None
        if state.rest_until is not None:
            rest = time.time() + max(0.0, state.rest_until - trio.current_time())
        self.metrics.credential(registry, state, rest)

    def upstream_read(self, exchange: Exchange, chunk: bytes) -> None:
        self.metrics.upstream_read(registry_of(exchange), kind_of(exchange), len(chunk))

    def upstream_resumed(self, exchange: Exchange) -> None:
        """An upstream body that broke off was resumed for this exchange."""
        exchange.resumes += 1
        self.metrics.upstream_resumed(registry_of(exchange))

    async def too_many_requests(self, exchange: Exchange, response: httpx.Response) -> None:
        """Pass the upstream's 429 on with `Retry-After` and a message naming whose limit it is."""
        registry = registry_of(exchange)
        retry = ratelimit.retry_after(response.headers.get("retry-after"))
        budget = self.health.state(registry).ratelimit
        message = ratelimit.too_many_requests_message(registry, budget, retry)
        log.warning("upstream rate limit: %s", message)
        self.metrics.refused("upstream_rate_limited")
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
        ("resumes", exchange.resumes or None),
    ]
    access.info(logline.logfmt(fields), extra={"fields": fields})


def log_extra(record: logging.LogRecord) -> list[tuple[str, Any]] | None:
    """The structured fields of an access-log record, if it has them."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, list) else None
