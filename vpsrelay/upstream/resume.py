"""An upstream body that heals itself: when it ends early, the rest is asked for again.

`ResumingStream` replaces a blob response's body stream. Whoever reads the response
(the pass-through, a cache fill) sees one body: when the connection breaks, the body
ends short or stalls, it asks its re-opener (supplied by the caller, who knows how to
go back to the registry with fresh headers) for `Range: bytes=N-` and goes on from
there, as `core.resume` decides. The digest is checked by the reader, over the joined
bytes. Only when the attempts are spent does the reader get the error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import trio

from vpsrelay.core import auth, resume
from vpsrelay.errors import UpstreamError, UpstreamProtocolError

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

log = logging.getLogger("vpsrelay.upstream")


@dataclass(frozen=True, slots=True)
class Ask:
    """One resume request, as the re-opener is to send it."""

    headers: resume.Headers  # `Range` and `If-Range`
    direct_url: str | None  # the redirect target to ask again; None: ask the registry
    fresh_token: bool  # the registry refused the token it was given: get a new one
    # The client's own token was refused once: ask with the relay's own from then on.
    relay_token: bool = False


Reopen = Callable[[Ask], "AbstractAsyncContextManager[httpx.Response]"]


def headers_of(response: httpx.Response) -> resume.Headers:
    return tuple((k.lower(), v) for k, v in response.headers.multi_items())


class ResumingStream(httpx.AsyncByteStream):
    """The body of `response`, resumed through `reopen` when it ends early.

    A body that came from a redirect target (a CDN: not on the registry's own origin,
    `own_origin`) is asked there again first; a 400/403/410 there (an expired signed
    URL) sends the next attempt to the registry, for a fresh redirect.
    """

    def __init__(
        self,
        response: httpx.Response,
        window: resume.Window,
        reopen: Reopen,
        attempts: resume.Attempts,
        *,
        own_origin: Callable[[str], bool],
        what: str,
        resumed: Callable[[], None],
    ) -> None:
        self._first: httpx.AsyncByteStream | None = response.stream  # type: ignore[assignment]
        self._stream: AsyncIterator[bytes] | None = None
        self._window = window
        self._position = window.first
        self._skip = 0  # bytes of a whole-body answer the reader already has
        self._reopen = reopen
        self._attempts = attempts
        self._own_origin = own_origin
        # Where the body came from, when that was a redirect target (a CDN).
        url = str(response.url)
        self._direct: str | None = None if own_origin(url) else url
        self._fresh_token = False
        self._relay_token = False
        self._what = what
        self._resumed = resumed
        self._current = contextlib.AsyncExitStack()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            failure: UpstreamError
            try:
                if self._stream is None:
                    assert self._first is not None
                    self._stream = aiter(self._first)
                chunk = await anext(self._stream)
            except StopAsyncIteration:
                if self._position >= self._window.end:
                    raise
                failure = UpstreamProtocolError(
                    f"{self._what}: upstream body ended at byte {self._position}"
                    f" of {self._window.end}"
                )
            except UpstreamError as exc:
                failure = exc
            else:
                if self._skip:
                    dropped = min(self._skip, len(chunk))
                    self._skip -= dropped
                    chunk = chunk[dropped:]
                chunk = chunk[: self._window.end - self._position]  # never past the window
                self._position += len(chunk)
                if chunk:
                    return chunk
                continue
            await self._resume(failure)

    async def _resume(self, failure: UpstreamError) -> None:
        """Open the rest of the body, or raise the last failure when attempts are spent."""
        while True:
            if not self._attempts.may_try(self._position):
                log.warning(
                    "upstream body broke off, not resumed (%d attempts): %s",
                    self._attempts.limit,
                    failure.message,
                )
                raise failure
            await self._drop_current()
            await trio.sleep(self._attempts.delay())
            ask = Ask(
                resume.ask_headers(self._window, self._position),
                self._direct,
                self._fresh_token,
                self._relay_token,
            )
            log.info(
                "resuming %s at byte %d (%s): %s",
                self._what,
                self._position,
                "redirect target" if ask.direct_url else "registry",
                failure.message,
            )
            try:
                response = await self._current.enter_async_context(self._reopen(ask))
            except UpstreamError as exc:
                failure = exc
                continue
            verdict = resume.judge(
                self._window, self._position, response.status_code, headers_of(response)
            )
            if verdict in (resume.Verdict.CONTINUE, resume.Verdict.RESTART):
                self._skip = self._position if verdict is resume.Verdict.RESTART else 0
                self._stream = aiter(response.stream)  # type: ignore[arg-type]
                self._fresh_token = False
                url = str(response.url)
                self._direct = None if self._own_origin(url) else url
                self._attempts.resumes += 1
                self._resumed()
                return
            if verdict is resume.Verdict.FRESH_URL and ask.direct_url is not None:
                self._direct = None
            elif verdict is resume.Verdict.FRESH_TOKEN and auth.fresh_token_may_help(
                response.headers.get_list("www-authenticate")
            ):  # not for `insufficient_scope`: a new token has the same rights
                self._fresh_token = self._relay_token = True
                self._direct = None  # a token is the registry's business, never a CDN's
            failure = UpstreamProtocolError(
                f"{self._what}: upstream answered {response.status_code} to a resume"
            )

    async def _drop_current(self) -> None:
        """Close the broken response (its connection is not reused)."""
        self._stream = None
        first, self._first = self._first, None
        with contextlib.suppress(UpstreamError):
            if first is not None:
                await first.aclose()
            await self._current.aclose()
        self._current = contextlib.AsyncExitStack()

    async def aclose(self) -> None:
        await self._drop_current()
