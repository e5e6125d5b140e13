"""The one place where vpsrelay reaches into Hypercorn's internals, pinned to the
versions it was written against (`tests/test_hypercorn_patches.py` fails when they change).

HTTP/2 stream reset: ASGI has no way to abort a response. Over HTTP/1.1, an app that
returns mid-body makes Hypercorn close the connection, so the client sees a short
read. Over HTTP/2 Hypercorn forgets the stream without ending it, and the client
waits for the rest until the connection idles out. A relay that stops a blob
(upstream gone, digest mismatch) must say so at once: reset the stream.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions
import trio
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import hypercorn.config

log = logging.getLogger("vpsrelay.server")

PINNED = {"hypercorn": "0.18.0", "h2": "4.4.1"}
_ORIGINAL_CLOSE_STREAM = H2Protocol._close_stream


def original_close_stream() -> Callable[..., Awaitable[None]]:
    """Hypercorn's own `_close_stream`, for the test that pins its source."""
    return _ORIGINAL_CLOSE_STREAM


def versions_match() -> bool:
    return all(version(name) == pinned for name, pinned in PINNED.items())


def apply() -> bool:
    """Install the patches if the libraries are the pinned versions; say whether it did."""
    if getattr(H2Protocol, "_vpsrelay_patched", False):
        return True
    if not versions_match():
        log.warning("hypercorn/h2 versions differ from %s: HTTP/2 aborts are not reset", PINNED)
        return False
    original = _ORIGINAL_CLOSE_STREAM

    async def close_stream_with_reset(self: H2Protocol, stream_id: int) -> None:
        await original(self, stream_id)
        stream = self.connection.streams.get(stream_id)
        if stream is not None and not stream.closed:  # the app stopped before the end
            try:
                self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                return
            await self._flush()

    H2Protocol._close_stream = close_stream_with_reset  # type: ignore[method-assign]
    H2Protocol._vpsrelay_patched = True  # type: ignore[attr-defined]
    return True


# --- a cap on open client connections (issue 5) ---------------------------------------------
#
# Hypercorn accepts every connection it can; each costs a file descriptor and a task,
# so a flood of idle connections could exhaust the process's descriptors. Hypercorn's
# trio worker builds one `TCPServer` per accepted connection from the module global
# `hypercorn.trio.run.TCPServer`; the capped subclass refuses (closes) connections over
# the limit set on the config by `cap_connections`.

_LIMITER_ATTRIBUTE = "_vpsrelay_connection_limiter"
_REFUSED_ATTRIBUTE = "_vpsrelay_on_refused"


def cap_connections(
    config: hypercorn.config.Config, limit: int, on_refused: Callable[[str, str], None]
) -> None:
    """Serve at most `limit` connections at once with `config`; close the ones over it."""
    import hypercorn.trio.run as trio_run

    setattr(config, _LIMITER_ATTRIBUTE, trio.CapacityLimiter(limit))
    setattr(config, _REFUSED_ATTRIBUTE, on_refused)
    trio_run.TCPServer = CappedTCPServer  # type: ignore[attr-defined]


class CappedTCPServer(TCPServer):
    """Hypercorn's per-connection server, which first takes a slot of the config's limiter."""

    async def run(self) -> None:
        limiter: trio.CapacityLimiter | None = getattr(self.config, _LIMITER_ATTRIBUTE, None)
        if limiter is None:
            await super().run()
            return
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            on_refused = getattr(self.config, _REFUSED_ATTRIBUTE, None)
            if on_refused is not None:
                on_refused("connection_cap", f"{limiter.total_tokens} connections already open")
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            return
        try:
            await super().run()
        finally:
            limiter.release()
