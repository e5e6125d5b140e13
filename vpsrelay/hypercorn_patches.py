"""The one place where vpsrelay reaches into Hypercorn's internals, pinned to the
versions it was written against (`tests/test_hypercorn_patches.py` fails when they change).

HTTP/2 stream reset: ASGI has no way to abort a response. Over HTTP/1.1, an app that
returns mid-body makes Hypercorn close the connection, so the client sees a short
read. Over HTTP/2 Hypercorn forgets the stream without ending it, and the client
waits for the rest until the connection idles out. A relay that stops a blob
(upstream gone, digest mismatch) must say so at once: reset the stream.

HTTP/2 write coalescing: Hypercorn's send task pops one DATA frame (16 KiB, the
client's usual SETTINGS_MAX_FRAME_SIZE) from a stream's buffer, has h2 build it (a frame
object, four copies) and makes one transport write per frame: one `send` (and one TLS
record with its own write) per 16 KiB, which held HTTP/2 at a fifth of HTTP/1.1's speed.
The replacement `_send_data` takes what the flow-control window allows, up to
`COALESCE_BYTES`, writes its frames straight into h2's outgoing buffer (the same bytes,
windows and stream states as h2's `send_data` per frame: `queue_data_frames`) and hands
that buffer to the transport in one write, without h2's copy of it. END_STREAM and the
error handling stay Hypercorn's; the app's producer is woken only when the stream's buffer
runs low (Hypercorn's wakes it on every pass while the client's window is shut, so a
client with a small window made the relay buffer without bound).
"""

from __future__ import annotations

import logging
import math
import struct
from importlib.metadata import version
from typing import TYPE_CHECKING

import h2.connection
import h2.errors
import h2.exceptions
import h2.stream
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.trio.tcp_server import TCPServer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import hypercorn.config

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
        "H2Protocol._flush": H2Protocol._flush,
        "H2Protocol.stream_send": H2Protocol.stream_send,
        "StreamBuffer.pop": StreamBuffer.pop,
        "StreamBuffer.push": StreamBuffer.push,
        # What `queue_data_frames` does in one pass instead of one call per frame.
        "H2Connection.send_data": h2.connection.H2Connection.send_data,
        "H2Connection._prepare_for_sending": h2.connection.H2Connection._prepare_for_sending,
        "H2Connection.data_to_send": h2.connection.H2Connection.data_to_send,
        "H2Connection.local_flow_control_window": (
            h2.connection.H2Connection.local_flow_control_window
        ),
        "H2Stream.send_data": h2.stream.H2Stream.send_data,
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


# --- connections: a cap, and timeouts that fit a relay (issue 5) ------------------------------
#
# Hypercorn's trio worker builds one `TCPServer` per accepted connection from the module
# global `hypercorn.trio.run.TCPServer`; `cap_connections` replaces it with the subclass
# below, which changes three things:
#
# * a cap: connections over `server.max_connections` are closed at once, so a flood of
#   idle connections cannot take every file descriptor;
# * `read_timeout` applies only while the connection waits for a request: Hypercorn's own
#   applies to every read, so a long download (the client sends nothing while it
#   receives a 10 GiB layer) was cut after `read_timeout` seconds;
# * once the client's side is closed or timed out, the connection is closed then, not
#   after `keep_alive_timeout` (Hypercorn waits for its keep-alive task first, so every
#   closed or half-open connection kept its slot and descriptor for 75 s).
# * a write the client takes nothing of for `limits.send_timeout` seconds closes the
#   connection (`bound_writes`): Hypercorn shields its socket writes from cancellation, so
#   an HTTP/1.1 client that stopped reading held its request, and the upstream connection
#   behind it, for good; the app's own deadline around each send cannot reach inside.

_LIMITER_ATTRIBUTE = "_vpsrelay_connection_limiter"
_SEND_TIMEOUT_ATTRIBUTE = "_vpsrelay_send_timeout"
_REFUSED_ATTRIBUTE = "_vpsrelay_on_refused"
_MAX_RECV = 2**16  # hypercorn.trio.tcp_server.MAX_RECV


def cap_connections(
    config: hypercorn.config.Config, limit: int, on_refused: Callable[[str, str], None]
) -> None:
    """Serve at most `limit` connections at once with `config`; close the ones over it."""
    import hypercorn.trio.run as trio_run

    setattr(config, _LIMITER_ATTRIBUTE, trio.CapacityLimiter(limit))
    setattr(config, _REFUSED_ATTRIBUTE, on_refused)
    trio_run.TCPServer = RelayTCPServer  # type: ignore[attr-defined]


def bound_writes(config: hypercorn.config.Config, seconds: float) -> None:
    """Close a connection whose client takes nothing of one write for `seconds`
    (needs the `RelayTCPServer` that `cap_connections` installs)."""
    setattr(config, _SEND_TIMEOUT_ATTRIBUTE, seconds)


class RelayTCPServer(TCPServer):
    """Hypercorn's per-connection server with the relay's connection policy (see above)."""

    _busy = False  # a request is in flight (Hypercorn's `Updated(idle=False)`)

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

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated):
            self._busy = not event.idle
        timeout: float | None = getattr(self.config, _SEND_TIMEOUT_ATTRIBUTE, None)
        if isinstance(event, RawData) and timeout is not None:
            await self._send_within(event.data, seconds=timeout)
            return
        await super().protocol_send(event)

    async def _send_within(self, data: bytes, *, seconds: float) -> None:
        """Hypercorn's write (`TCPServer.protocol_send`, RawData), with a deadline."""
        async with self.send_lock:
            try:
                # Shielded as Hypercorn's is (a cancelled write leaves half a frame), but
                # the deadline inside the shield still ends it.
                with trio.CancelScope(shield=True), trio.move_on_after(seconds) as deadline:
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
                return
        if deadline.cancelled_caught:
            log.info("closing a connection: its client took no write for %g s", seconds)
            # Half a frame may be out: the connection cannot go on. The request sees a
            # disconnect and ends, with its upstream connection.
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
                await self.protocol.handle(Closed())

    async def _read_data(self) -> None:
        timeout = self.config.read_timeout or math.inf
        while True:
            with trio.move_on_after(timeout) as timer:
                try:
                    data = await self.stream.receive_some(_MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
            if timer.cancelled_caught:
                if self._busy:  # the client is receiving a response: it need not send
                    continue
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())
        # Nothing more can come from the client: end the connection now (its keep-alive
        # task would hold it open for keep_alive_timeout otherwise).
        self._task_group._nursery.cancel_scope.cancel()  # type: ignore[union-attr]


async def send_data_coalesced(self: H2Protocol, stream_id: int) -> None:
    """Hypercorn's `_send_data`, taking up to `COALESCE_BYTES` per call: the frames are
    built by `queue_data_frames` and leave in one transport write."""
    try:
        buffer = self.stream_buffers[stream_id]
        amount = min(
            self.connection.local_flow_control_window(stream_id),
            COALESCE_BYTES,
            len(buffer.buffer),
        )
        if amount > 0:
            queue_data_frames(self.connection, stream_id, buffer.buffer, amount)
            del buffer.buffer[:amount]
            await _wake_producer_if_low(buffer)
            await _flush_without_copy(self)
        else:
            await _wake_producer_if_low(buffer)
            self.priority.block(stream_id)

        if buffer.complete:
            self.connection.end_stream(stream_id)
            await self._flush()
            del self.stream_buffers[stream_id]
            self.priority.remove_stream(stream_id)
    except (h2.exceptions.StreamClosedError, KeyError, h2.exceptions.ProtocolError):
        # As Hypercorn: the stream or connection closed while waiting to send.
        await self.stream_buffers[stream_id].close()
        del self.stream_buffers[stream_id]
        self.priority.remove_stream(stream_id)


# DATA frame header: 24-bit length (as 16 + 8 bits), type 0, flags, stream id (RFC 9113 4.1).
_FRAME_HEADER = struct.Struct(">HBBBL")


def queue_data_frames(
    connection: h2.connection.H2Connection, stream_id: int, source: bytearray, amount: int
) -> None:
    """Queue the first `amount` bytes of `source` as DATA frames on `stream_id`.

    The same bytes, windows and states as calling h2's `send_data` once per frame of at
    most `max_outbound_frame_size` (the test compares them), without h2's per-frame
    objects: one frame object and four copies per 16 KiB made HTTP/2 cost twice HTTP/1.1.
    The caller keeps `amount` within the flow-control window.
    """
    window = connection.local_flow_control_window(stream_id)
    if not 0 < amount <= min(window, len(source)):
        raise h2.exceptions.FlowControlError(f"cannot send {amount} bytes, window is {window}")
    # The state checks h2 makes for every frame: a closed stream or connection raises here.
    connection.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
    stream = connection.streams[stream_id]
    stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
    frame_size = connection.max_outbound_frame_size
    out = connection._data_to_send
    with memoryview(source) as view:
        for offset in range(0, amount, frame_size):
            length = min(frame_size, amount - offset)
            out += _FRAME_HEADER.pack(length >> 8, length & 0xFF, 0, 0, stream_id)
            out += view[offset : offset + length]
    stream.outbound_flow_control_window -= amount
    connection.outbound_flow_control_window -= amount


async def _flush_without_copy(protocol: H2Protocol) -> None:
    """Hypercorn's `_flush`, handing over h2's outgoing buffer instead of a copy of it
    (`data_to_send` copies every byte once more: a 256 KiB copy per write)."""
    connection = protocol.connection
    data = connection._data_to_send
    if data:
        connection._data_to_send = bytearray()
        await protocol.send(RawData(data=data))  # type: ignore[arg-type]


async def _wake_producer_if_low(buffer: StreamBuffer) -> None:
    """Let the app push its next chunk only once the stream's buffer runs low.

    `StreamBuffer.pop` wakes the producer after any short pop, including the empty pop
    made while the client's window is shut: a client that keeps its window small (or at
    zero) then had the relay buffer one more app chunk (1 MiB) per send-task pass,
    without bound. Here the producer waits until the buffer is nearly empty."""
    if len(buffer.buffer) < BUFFER_LOW_WATER:
        await buffer._paused.set()
    if not buffer.buffer:
        await buffer._is_empty.set()
