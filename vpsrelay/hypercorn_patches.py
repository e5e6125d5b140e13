"""The one place where vpsrelay reaches into Hypercorn's internals, pinned to the
versions it was written against (`tests/test_hypercorn_patches.py` fails when they change).

HTTP/2 stream reset: ASGI has no way to abort a response. Over HTTP/1.1, an app that
returns mid-body makes Hypercorn close the connection, so the client sees a short
read. Over HTTP/2 Hypercorn forgets the stream without ending it, and the client
waits for the rest until the connection idles out. A relay that stops a blob
(upstream gone, digest mismatch) must say so at once: reset the stream.

HTTP/2 write coalescing: Hypercorn's send task pops one DATA frame (16 KiB, the
client's usual SETTINGS_MAX_FRAME_SIZE) from a stream's buffer and makes one transport
write per frame: one `send` (and one TLS record with its own write) per 16 KiB, which
held HTTP/2 at a fifth of HTTP/1.1's speed. The replacement `_send_data` queues the
frames the flow-control window allows, up to `COALESCE_BYTES`, and flushes them in one
write. Frame sizes, flow control, END_STREAM and the error handling are Hypercorn's own.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import TYPE_CHECKING

import h2.errors
import h2.exceptions
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger("vpsrelay.server")

PINNED = {"hypercorn": "0.18.0", "h2": "4.4.1"}
_ORIGINAL_CLOSE_STREAM = H2Protocol._close_stream
_ORIGINAL_SEND_DATA = H2Protocol._send_data
# Bytes of DATA frames queued before one transport write (16 frames of 16 KiB).
COALESCE_BYTES = 256 * 1024


def original_close_stream() -> Callable[..., Awaitable[None]]:
    """Hypercorn's own `_close_stream`, for the test that pins its source."""
    return _ORIGINAL_CLOSE_STREAM


def pinned_functions() -> dict[str, Callable[..., object]]:
    """Hypercorn's own code the patches wrap, replace or rely on, for the test that pins it."""
    return {
        "H2Protocol._close_stream": _ORIGINAL_CLOSE_STREAM,
        "H2Protocol._send_data": _ORIGINAL_SEND_DATA,
        "H2Protocol.send_task": H2Protocol.send_task,
        "H2Protocol.stream_send": H2Protocol.stream_send,
        "StreamBuffer.pop": StreamBuffer.pop,
        "StreamBuffer.push": StreamBuffer.push,
    }


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
        # The app's last body message marks the buffer complete; Hypercorn's send task may
        # still be flushing the final DATA frames (flow control, a slow TLS write) and sends
        # END_STREAM after them. Only a stream whose body was NOT finished is reset.
        buffer = self.stream_buffers.get(stream_id)
        finished = buffer is not None and buffer._complete
        await original(self, stream_id)
        stream = self.connection.streams.get(stream_id)
        if stream is not None and not stream.closed and not finished:  # stopped before the end
            try:
                self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                return
            await self._flush()

    H2Protocol._close_stream = close_stream_with_reset  # type: ignore[method-assign]
    H2Protocol._send_data = send_data_coalesced  # type: ignore[method-assign]
    H2Protocol._vpsrelay_patched = True  # type: ignore[attr-defined]
    return True


async def send_data_coalesced(self: H2Protocol, stream_id: int) -> None:
    """Hypercorn's `_send_data`, with up to `COALESCE_BYTES` of frames per transport write."""
    try:
        buffer = self.stream_buffers[stream_id]
        queued = 0
        while queued < COALESCE_BYTES:
            chunk_size = min(
                self.connection.local_flow_control_window(stream_id),
                self.connection.max_outbound_frame_size,
            )
            data = await buffer.pop(max(0, chunk_size))
            if not data:
                break
            self.connection.send_data(stream_id, data)
            queued += len(data)
        if queued:
            await self._flush()
        else:
            self.priority.block(stream_id)

        if buffer.complete:
            self.connection.end_stream(stream_id)
            await self._flush()
            del self.stream_buffers[stream_id]
            self.priority.remove_stream(stream_id)
    except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError):
        # As Hypercorn: the stream or connection closed while waiting to send. Frames
        # queued before the error are flushed with the connection's next write.
        await self.stream_buffers[stream_id].close()
        del self.stream_buffers[stream_id]
        self.priority.remove_stream(stream_id)
