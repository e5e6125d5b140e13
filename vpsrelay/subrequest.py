"""Requests through the relay's own ASGI app, made as the client of another request.

`Subrequests` builds an ASGI scope for a registry API `GET` with the client's address,
Host, forwarding headers and credentials, calls the app with a `send` that passes the
answer through a small memory channel (backpressure: the app streams only as fast as
the caller reads), and answers a 401 as a docker client does: with a token from the
relay's own `/token` (never a realm elsewhere), asked with the client's credentials.
Whatever the app applies to a client's pull (authentication, repository lists, limits,
budgets, the cache, digest checks) applies to a subrequest, without being repeated.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import trio

from vpsrelay.core import auth, headers as header_policy
from vpsrelay.errors import (
    ClientError,
    Denied,
    RelayError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    UpstreamProtocolError,
)
from vpsrelay.exchange import SUBREQUEST

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Awaitable

    from vpsrelay.access.guard import Guard
    from vpsrelay.config import Settings
    from vpsrelay.exchange import Exchange, Message, Receive, Scope, Send

log = logging.getLogger("vpsrelay.subrequest")

MAX_TOKEN_BYTES = 64 * 1024
MAX_ERROR_BYTES = 16 * 1024
# Messages in flight between the app and the caller: backpressure, bounded memory.
CHANNEL_MESSAGES = 2
# The client's headers a subrequest keeps: who it is and where it came through.
_KEPT_HEADERS = frozenset({
    "host", "user-agent", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
    "forwarded", "x-real-ip",
})  # fmt: skip
BASIC_CHALLENGE = ("www-authenticate", 'Basic realm="vpsrelay", charset="UTF-8"')


class RelayApp(Protocol):
    """What a subrequest needs of the relay: its settings, its guard, itself as ASGI."""

    settings: Settings
    guard: Guard

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]: ...


class NotThere(ClientError):
    """The relay answered 404 (a manifest or blob it does not have)."""

    status = 404
    code = "MANIFEST_UNKNOWN"


@dataclass
class Answer:
    """A subrequest's answer: its head, and its body as the app sends it."""

    status: int
    headers: header_policy.Headers
    _messages: trio.MemoryReceiveChannel[Message]
    complete: bool = False

    def header(self, name: str) -> str | None:
        return header_policy.get(self.headers, name)

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The body; a body the app broke off (a digest mismatch) raises at its end.

        Raises:
            UpstreamProtocolError: the app ended the body without finishing it.
        """
        async for message in self._messages:
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if body:
                yield body
            if not more:
                self.complete = True
                return
        raise UpstreamProtocolError("the relay broke the body off")

    async def read(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes.

        Raises:
            UpstreamProtocolError: more than that (a manifest or config no image has),
                or the body was broken off.
        """
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if len(body) > limit:
                raise UpstreamProtocolError(f"answer over {limit} bytes")
        return bytes(body)


class Subrequests:
    """GETs through `app` as the downloading client, with the token dance done here."""

    def __init__(self, app: RelayApp, exchange: Exchange) -> None:
        self.app = app
        self.exchange = exchange
        self.headers = tuple((k, v) for k, v in exchange.headers if k in _KEPT_HEADERS)
        self.client_authorization = header_policy.get(exchange.headers, "authorization")
        # Without access control the relay passes a client's Authorization on to the
        # upstream's /v2: a download sends it only to the relay's /token, as a pull does.
        self.direct_authorization = self.client_authorization if app.settings.auth.enabled else None
        self.tokens: dict[str, str] = {}  # repository -> "Bearer ..." earned at /token
        self.scheme = urlsplit(exchange.view.base_url).scheme or "http"

    def _scope(self, path: str, query: str, headers: header_policy.Headers) -> Scope:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": self.scheme,
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": (self.exchange.peer, 0),
            "server": None,
            "extensions": {SUBREQUEST: {}},  # the server's own mark: no client can set it
        }

    @contextlib.asynccontextmanager
    async def _call(
        self, path: str, query: str, headers: header_policy.Headers
    ) -> AsyncIterator[Answer]:
        send_messages, messages = trio.open_memory_channel[Any](CHANNEL_MESSAGES)
        finished = trio.Event()
        asked = False

        async def receive() -> Message:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # until the answer is taken, or left
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await send_messages.send(message)

        async def run() -> None:
            async with send_messages:
                try:
                    await self.app(self._scope(path, query, headers), receive, send)
                except Exception:  # the app logged it; the body ends short
                    log.warning("subrequest %s failed", path, exc_info=True)

        # Errors of the caller's are caught and raised outside the nursery, so that they
        # arrive as themselves, not wrapped in an exception group.
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            try:
                try:
                    start = await messages.receive()
                except trio.EndOfChannel:
                    raise UpstreamProtocolError("the relay gave no answer") from None
                raw = start.get("headers", [])
                yield Answer(
                    int(start["status"]),
                    tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw),
                    messages,
                )
            except Exception as exc:
                failure = exc
            finally:
                finished.set()
                nursery.cancel_scope.cancel()
                messages.close()
        if failure is not None:
            raise failure

    @contextlib.asynccontextmanager
    async def get(
        self, repository: str, path: str, extra: header_policy.Headers = ()
    ) -> AsyncIterator[Answer]:
        """GET `path` of the registry API; a 401 earns a token and is tried once more.

        Raises:
            RelayError: the relay refused (its status and message), or gave no answer.
        """
        challenge: str | None = None
        for attempt in range(2):
            authorization = self.tokens.get(repository) or self.direct_authorization
            headers = (*self.headers, *extra)
            if authorization:
                headers = (*headers, ("authorization", authorization))
            async with self._call(path, "", headers) as answer:
                if answer.status == 401 and attempt == 0:
                    challenge = answer.header("www-authenticate")
                else:
                    if answer.status >= 300:
                        raise await _refusal(answer, path)
                    yield answer
                    return
            await self._earn_token(repository, challenge)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _earn_token(self, repository: str, challenge: str | None) -> None:
        """A token from the relay's `/token` for the scope a 401 named.

        Raises:
            Unauthorized: no Bearer challenge of the relay's own, or no token for it.
        """
        parsed = auth.parse_challenge(challenge) if challenge else None
        if parsed is None or not parsed.is_bearer or not parsed.realm:
            raise _unauthorized("authentication required")
        realm = urlsplit(parsed.realm)
        # Only the relay's own token endpoint: a realm elsewhere is never asked.
        if realm.path != "/token" and not realm.path.startswith("/token/"):
            raise UpstreamProtocolError("the relay announced a foreign token realm")
        params = [(k, v) for k, v in parsed.params if k.lower() in ("service", "scope")]
        try:
            url = urlsplit(auth.token_url(parsed.realm, params))
        except ValueError:
            raise UpstreamProtocolError("the relay announced an unusable token realm") from None
        headers = self.headers
        if self.client_authorization:
            headers = (*headers, ("authorization", self.client_authorization))
        async with self._call(url.path, url.query, headers) as answer:
            body = await answer.read(MAX_TOKEN_BYTES)
        if answer.status == 429:
            raise TooManyRequests("too many failed logins: try again later", headers=_retry(answer))
        try:
            token = auth.parse_token_answer(body).token if answer.status == 200 else None
        except ValueError:
            token = None
        if not token:
            raise _unauthorized("authentication required: wrong or missing credentials")
        self.tokens[repository] = f"Bearer {token}"


def _unauthorized(message: str) -> Unauthorized:
    # A browser asks its user for a password on this; curl takes `-u user:password`.
    return Unauthorized(message, reason="no_credentials", headers=(BASIC_CHALLENGE,))


def _retry(answer: Answer) -> tuple[tuple[str, str], ...]:
    value = answer.header("retry-after")
    return (("retry-after", value),) if value and value.isdigit() else ()


async def _refusal(answer: Answer, path: str) -> RelayError:
    """The relay's error answer to a subrequest, as an error of the download's own."""
    try:
        body = await answer.read(MAX_ERROR_BYTES)
        errors = json.loads(body).get("errors") or [{}]
        message = str(errors[0].get("message") or "")[:300]
    except (RelayError, ValueError, AttributeError, TypeError, IndexError):
        message = ""
    message = f"{message or 'refused'} ({path})"
    status = answer.status
    if status == 401:
        return _unauthorized(message)
    if status == 403:
        return Denied(message)
    if status == 404:
        return NotThere(message)
    if status == 429:
        return TooManyRequests(message, headers=_retry(answer))
    if 400 <= status < 500:
        return ClientError(message)
    return UpstreamError(message)
