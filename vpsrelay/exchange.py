"""One client request as the relay sees it (`Exchange`) and the ASGI helpers around it.

Below the ASGI app and the cache: both build on it, it imports neither (import-linter
keeps it so), which lets the cache and the TLS ports use it without importing the app.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from vpsrelay.core import forwarding, headers as header_policy
from vpsrelay.errors import ClientTooSlow, RequestTooLarge, UpstreamProtocolError

if TYPE_CHECKING:
    from vpsrelay.core import routing


class Meter(Protocol):
    """What an exchange asks of a download's meter (the guard's `DownloadMeter`)."""

    def start(self, status: int, length: int | None) -> None: ...
    def admit(self, length: int | None) -> None: ...
    async def sent(self, size: int) -> None: ...


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The app's logger: these lines were the app's before the move, and log filters name it.
log = logging.getLogger("vpsrelay.app")

# The ASGI scope extension that marks a `/download`'s subrequest (set by the relay only).
SUBREQUEST = "vpsrelay.subrequest"

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
    peer: str = ""
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    bytes_sent: int = 0
    upstream_seconds: float | None = None
    disconnected: bool = False
    aborted: bool = False
    route: routing.Route | None = None
    user: str | None = None  # who authenticated (the relay token's user), with access control
    cache: str | None = None  # "hit" / "miss", set by the blob cache
    upstream_status: int | None = None
    extra_headers: list[tuple[str, str]] = field(default_factory=list)
    raw_path: str = "/"  # the request target as sent, for the guard's checks
    meter: Meter | None = None  # a blob download's budget hold and bandwidth cap
    # A request a `/download` makes through the app: metered as part of that download.
    subrequest: bool = False
    # How long one send may wait for the client to take it (`limits.send_timeout`).
    send_timeout: float = math.inf
    resumes: int = 0  # upstream bodies resumed after breaking off

    async def start(self, status: int, headers: header_policy.Headers) -> None:
        if self.meter is not None:
            # Before the head goes out: a download the budget cannot take is a clean 429.
            self.meter.start(status, content_length(header_policy.get(headers, "content-length")))
        self.status = status
        raw = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in (*headers, *self.extra_headers)
        ]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, chunk: bytes, *, more: bool) -> None:
        if self.meter is not None and chunk:
            await self.meter.sent(len(chunk))  # first: a piece the budget refuses is not sent
        self.bytes_sent += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def _send(self, message: Message) -> None:
        """One ASGI send, which waits while the client takes nothing (an HTTP/2 window it
        keeps shut): past the deadline the stream ends, and with it whatever upstream
        connection fed it. Over HTTP/1.1 Hypercorn's socket write cannot be interrupted
        from here; the connection's stall timeout (`patches.hypercorn`) ends that one."""
        with trio.move_on_after(self.send_timeout) as deadline:
            await self.send(message)
        if deadline.cancelled_caught:
            raise ClientTooSlow(
                f"the client accepted nothing for {self.send_timeout:g} s", reason="send_timeout"
            )

    async def respond(self, status: int, headers: header_policy.Headers, body: bytes) -> None:
        length = ("content-length", str(len(body)))
        version = () if header_policy.get(headers, API_VERSION_HEADER[0]) else (API_VERSION_HEADER,)
        await self.start(status, (*headers, length, *version))
        await self.body(b"" if self.method == "HEAD" else body, more=False)

    async def respond_error(self, status: int, headers: header_policy.Headers, body: bytes) -> None:
        """`respond` with an error; a client that takes not even that is left (aborted)."""
        try:
            await self.respond(status, headers, body)
        except ClientTooSlow as exc:
            self.aborted = True
            log.info("%s %s: no error answer either: %s", self.method, self.path, exc)


def content_length(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


async def read_request_body(exchange: Exchange, seconds: float, max_bytes: int) -> bytes:
    """The request body (the `/token` form): at most `max_bytes`, all of it
    within `seconds`. A form left unfinished (HTTP/2 PINGs, a byte now and then
    over HTTP/1.1) kept its stream busy and its connection open for good.

    Raises:
        RequestTooLarge: over `max_bytes` (413).
        ClientTooSlow: not all there after `seconds` (408).
    """
    body = bytearray()
    with trio.move_on_after(seconds):
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                exchange.disconnected = True
                raise UpstreamProtocolError("client went away")
            body += message.get("body", b"")
            if len(body) > max_bytes:
                raise RequestTooLarge(f"request body over {max_bytes} bytes")
            if not message.get("more_body", False):
                return bytes(body)
    raise ClientTooSlow(f"request body not complete within {seconds:g} s", reason="body_timeout")


async def watch_disconnect(exchange: Exchange, cancel_scope: trio.CancelScope) -> None:
    """Cancel the stream when the client goes away, so the upstream request is dropped."""
    while True:
        message = await exchange.receive()
        if message["type"] == "http.disconnect":
            exchange.disconnected = True
            cancel_scope.cancel()
            return


async def serve_lifespan(receive: Receive, send: Send) -> None:
    """Answer the ASGI lifespan protocol (Hypercorn's trio worker needs an answer)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
