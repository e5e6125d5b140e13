"""The ASGI application: a request in, routed by the core, relayed to the upstream.

Responses stream: each upstream chunk is sent as it arrives, `send` waits for
the client (backpressure), and a client that disconnects cancels the upstream
request. Errors are rendered in one place, as OCI JSON bodies.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import trio

from vpsrelay import __version__
from vpsrelay.core import auth, forwarding, headers as header_policy, routing
from vpsrelay.core.digest import Digest, Verifier
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import RelayError, RequestTooLarge, UpstreamProtocolError
from vpsrelay.upstream import USER_AGENT, Upstream, map_httpx_errors

if TYPE_CHECKING:
    import httpx

    from vpsrelay.cache.front import CacheFront
    from vpsrelay.cache.store import BlobStore
    from vpsrelay.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Sees the upstream's answer before the client does; True: it answered the client itself.
RelayHook = Callable[["httpx.Response", header_policy.Headers], Awaitable[bool]]

access_log = logging.getLogger("vpsrelay.access")
log = logging.getLogger("vpsrelay.app")

MAX_TOKEN_FORM_BYTES = 64 * 1024
API_VERSION_HEADER = ("docker-distribution-api-version", "registry/2.0")


@dataclass(slots=True)
class Exchange:
    """One client request and what the relay did with it (for the access log)."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    view: forwarding.ClientView
    receive: Receive
    send: Send
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    bytes_sent: int = 0
    upstream_seconds: float | None = None
    disconnected: bool = False
    aborted: bool = False

    async def start(self, status: int, headers: header_policy.Headers) -> None:
        self.status = status
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, chunk: bytes, *, more: bool) -> None:
        self.bytes_sent += len(chunk)
        await self.send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def respond(self, status: int, headers: header_policy.Headers, body: bytes) -> None:
        length = ("content-length", str(len(body)))
        await self.start(status, (*headers, length, API_VERSION_HEADER))
        await self.body(b"" if self.method == "HEAD" else body, more=False)


class RelayApp:
    """The ASGI callable."""

    def __init__(
        self, settings: Settings, upstream: Upstream, store: BlobStore | None = None
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.hub = settings.registry(routing.DOCKER_HUB)
        self.started = time.monotonic()
        self.cache: CacheFront | None = None
        if store is not None:
            from vpsrelay.cache.front import CacheFront

            self.cache = CacheFront(self, store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Hypercorn's trio worker crashes at start-up if lifespan is ignored.
            await _lifespan(receive, send)
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
        )
        try:
            await self._dispatch(exchange)
        except RelayError as exc:
            if exchange.status:
                # Headers are out: returning without finishing the body makes the server
                # break the connection, so the client sees a short read, not a clean end.
                exchange.aborted = True
                log.warning("aborted %s %s mid-body: %s", exchange.method, exchange.path, exc)
                return
            await exchange.respond(
                exc.status, (("content-type", "application/json"),), exc.to_registry_body()
            )
        except Exception:
            log.exception("bug while serving %s %s", exchange.method, exchange.path)
            if exchange.status:
                raise
            error = RelayError("internal error in the relay")
            await exchange.respond(
                500, (("content-type", "application/json"),), error.to_registry_body()
            )
        finally:
            self._log(exchange)

    def _log(self, exchange: Exchange) -> None:
        if not self.settings.log.access_log:
            return
        upstream_ms = (
            f"{exchange.upstream_seconds * 1000:.1f}"
            if exchange.upstream_seconds is not None
            else "-"
        )
        access_log.info(
            "client=%s method=%s path=%s status=%d bytes=%d upstream_ms=%s duration_ms=%.1f%s",
            exchange.view.client_ip,
            exchange.method,
            json.dumps(exchange.path + (f"?{exchange.query}" if exchange.query else "")),
            exchange.status,
            exchange.bytes_sent,
            upstream_ms,
            (time.monotonic() - exchange.started) * 1000,
            (" disconnected=true" if exchange.disconnected else "")
            + (" aborted=true" if exchange.aborted else ""),
        )

    async def _dispatch(self, exchange: Exchange) -> None:
        if exchange.path == "/healthz" and exchange.method in ("GET", "HEAD"):
            await self._healthz(exchange)
            return
        route = routing.route(exchange.method, exchange.path)
        if route.kind is routing.Kind.TOKEN:
            await self._token(exchange)
        elif route.kind is routing.Kind.BASE:
            if self.cache is not None:
                await self.cache.base(exchange, route)
            else:
                await self._relay(exchange, route, "/v2/")
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

    def _relay_realm(self, exchange: Exchange) -> str:
        return f"{exchange.view.base_url}/token"

    async def _relay(
        self, exchange: Exchange, route: routing.Route, path: str, hook: RelayHook | None = None
    ) -> None:
        query = _upstream_query(exchange.query, route)
        url = f"{self.hub.url}{path}{'?' + query if query else ''}"
        request = UpstreamRequest(
            exchange.method,
            url,
            header_policy.upstream_request_headers(exchange.headers, USER_AGENT),
        )
        began = time.monotonic()
        async with self.upstream.open(request, what=self.hub.name) as response:
            exchange.upstream_seconds = time.monotonic() - began
            headers = list(header_policy.client_response_headers(response.headers.multi_items()))
            for challenge in response.headers.get_list("www-authenticate"):
                parsed = auth.parse_challenge(challenge)
                if parsed.is_bearer:
                    self.upstream.remember_challenge(self.hub.name, parsed)
                rewritten = auth.rewrite_challenge(parsed, self._relay_realm(exchange))
                headers.append(("www-authenticate", rewritten.format()))
            if route.kind is routing.Kind.BASE and response.status_code == 200:
                self.upstream.remember_challenge(self.hub.name, None)
            headers.extend(
                ("link", header_policy.rewrite_link(link, route.upstream_name, route.name))
                for link in response.headers.get_list("link")
            )
            headers.append(API_VERSION_HEADER)
            if hook is not None and await hook(response, tuple(headers)):
                return
            verifier = None
            if (
                route.kind is routing.Kind.BLOB
                and exchange.method == "GET"
                and response.status_code == 200
            ):
                verifier = Verifier(Digest.parse(route.reference))
            await self._stream(exchange, response, tuple(headers), verifier)

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
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, exchange, nursery.cancel_scope)
            try:
                await self._pump(exchange, response, verifier)
            except RelayError as exc:  # re-raised outside, so it is not wrapped in a group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _pump(
        self, exchange: Exchange, response: httpx.Response, verifier: Verifier | None
    ) -> None:
        if verifier is None:
            with map_httpx_errors(self.hub.name):
                async for chunk in response.aiter_raw():
                    await exchange.body(chunk, more=True)
            await exchange.body(b"", more=False)
            return
        # The last chunk is held back until the digest is checked, so that a body
        # with the wrong bytes ends short instead of completing.
        pending = b""
        with map_httpx_errors(self.hub.name):
            async for chunk in response.aiter_raw():
                verifier.update(chunk)
                if pending:
                    await exchange.body(pending, more=True)
                pending = chunk
        verifier.finish()
        await exchange.body(pending, more=False)

    async def _token(self, exchange: Exchange) -> None:
        challenge = await self.upstream.challenge(self.hub)
        if challenge is None or not challenge.realm:
            body = json.dumps({"token": "", "access_token": "", "expires_in": 3600}).encode()
            await exchange.respond(200, (("content-type", "application/json"),), body)
            return

        def to_upstream(name: str) -> str:
            return routing.to_upstream_name(self.hub.name, name)

        forwarded = header_policy.select(exchange.headers, frozenset({"authorization", "accept"}))
        agent = ("user-agent", header_policy.get(exchange.headers, "user-agent") or USER_AGENT)
        content = None
        if exchange.method == "POST":
            form = parse_qsl(
                (await _read_body(exchange)).decode("utf-8", "replace"), keep_blank_values=True
            )
            form = auth.token_request_params(form, to_upstream, challenge.service)
            content = urlencode(form).encode()
            forwarded += (("content-type", "application/x-www-form-urlencoded"),)
            url = challenge.realm
        else:
            params = parse_qsl(exchange.query, keep_blank_values=True)
            params = auth.token_request_params(params, to_upstream, challenge.service)
            separator = "&" if "?" in challenge.realm else "?"
            url = f"{challenge.realm}{separator}{urlencode(params)}" if params else challenge.realm
        request = UpstreamRequest(exchange.method, url, (*forwarded, agent))
        began = time.monotonic()
        async with self.upstream.open(
            request, what=f"{self.hub.name} token", content=content
        ) as response:
            exchange.upstream_seconds = time.monotonic() - began
            headers = [
                (k, v)
                for k, v in header_policy.client_response_headers(response.headers.multi_items())
                if k != "www-authenticate"
            ]
            await self._stream(exchange, response, tuple(headers), None)


def _upstream_query(query: str, route: routing.Route) -> str:
    """The query passed upstream: pagination and referrer filters only."""
    if route.kind not in (routing.Kind.TAGS, routing.Kind.REFERRERS):
        return ""
    allowed = {"n", "last", "artifactType"}
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in allowed])


async def _read_body(exchange: Exchange) -> bytes:
    body = bytearray()
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            raise UpstreamProtocolError("client went away")
        body += message.get("body", b"")
        if len(body) > MAX_TOKEN_FORM_BYTES:
            raise RequestTooLarge(f"request body over {MAX_TOKEN_FORM_BYTES} bytes")
        if not message.get("more_body", False):
            return bytes(body)


async def _watch_disconnect(exchange: Exchange, cancel_scope: trio.CancelScope) -> None:
    """Cancel the stream when the client goes away, so the upstream request is dropped."""
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            cancel_scope.cancel()
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
