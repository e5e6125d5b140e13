"""The one place where vpsrelay reaches into Hypercorn's internals, pinned to the
versions it was written against (`tests/test_hypercorn_patches.py` fails when they change;
pyproject pins them exactly, and `apply` refuses other versions: the relay does not start
without these patches, some of which are what keeps it safe, unless `server.allow_unpatched`
has it run degraded without any of them; see `vpsrelay.patches`).

Connections (the second half of this file): no error in one connection ends the server,
caps per address and in all, a deadline for request heads, a stall timeout.

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
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING

import h2.connection
import h2.errors
import h2.exceptions
import h2.stream
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import hypercorn.config

    from vpsrelay.core.connslots import ConnectionSlots

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
        # Sets `closed` before it closes the streams (the reset patch checks it).
        "H2Protocol.handle": H2Protocol.handle,
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


class PatchError(RuntimeError):
    """The installed libraries are not the ones the safety patches were written for."""


def apply() -> bool:
    """Install the patches; they are part of the relay's safety, so it does not serve
    without them.

    Raises:
        PatchError: hypercorn or h2 is not the pinned version (one line for the user).
    """
    if getattr(H2Protocol, "_vpsrelay_patched", False):
        return True
    if not versions_match():
        installed = {name: version(name) for name in PINNED}
        raise PatchError(
            f"hypercorn/h2 are {installed}, vpsrelay's HTTP/2 and connection safety patches "
            f"need exactly {PINNED} (reinstall vpsrelay with its pinned dependencies)"
        )
    original = _ORIGINAL_CLOSE_STREAM

    async def close_stream_with_reset(self: H2Protocol, stream_id: int) -> None:
        # The app's last body message marks the buffer complete; Hypercorn's send task may
        # still be flushing the final DATA frames (flow control, a slow TLS write) and sends
        # END_STREAM after them. Only a stream whose body was NOT finished is reset.
        buffer = self.stream_buffers.get(stream_id)
        finished = buffer is not None and buffer._complete
        await original(self, stream_id)
        if self.closed:
            # The connection is gone (`handle(Closed())` closes every stream, maybe while
            # the transport's send lock is held): there is nobody to send a reset to.
            return
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


# --- connections: caps, deadlines, and no connection can end the server ----------------------
#
# Hypercorn's trio worker builds one `TCPServer` per accepted connection from the module
# global `hypercorn.trio.run.TCPServer`; `install_connection_policy` replaces it with the
# subclass below (for every listener: plain, TLS, port 80 and the operator's), which:
#
# * catches every error of its connection: it is logged and counted, and the connection
#   closed. Hypercorn runs all connections in one nursery, so one stray exception (a
#   `RuntimeError` from a twice-taken send lock was one) ended the whole relay;
# * tells the protocol that the transport broke only after releasing the send lock:
#   Hypercorn does it under the lock, and a protocol that sends while closing (the HTTP/2
#   stream reset below) then took the lock twice;
# * caps connections, `server.max_connections` in all and `server.max_connections_per_ip`
#   from one address (`core.connslots`); the ones over a cap are closed at once, so a
#   flood of idle connections takes neither every descriptor nor everyone's slots;
# * gives a connection `server.head_timeout` seconds from its accept (TLS handshake
#   included) to its first complete request head, and an HTTP/1.1 head that has begun
#   the same time to complete: a head trickled a byte at a time held its slot until
#   the keep-alive timeout;
# * closes a connection whose request has had no byte read from or written to its client
#   for `server.stall_timeout`, and one with a single write piece pending that long
#   whatever it reads: bytes a client trickles in (a GET body the app throws away, HTTP/2
#   WINDOW_UPDATEs that need no answer) while it reads nothing held the write, and the
#   connection, for good (the write is shielded, so the app's `send_timeout` cannot end it);
# * applies `read_timeout` only while the connection waits for a request: Hypercorn's own
#   applies to every read, so a long download (the client sends nothing while it
#   receives a 10 GiB layer) was cut after `read_timeout` seconds;
# * once the client's side is closed or timed out, closes the connection then, not after
#   `keep_alive_timeout` (Hypercorn waits for its keep-alive task first, so every closed
#   or half-open connection kept its slot and descriptor for 75 s).

_POLICY_ATTRIBUTE = "_vpsrelay_connection_policy"
_MAX_RECV = 2**16  # hypercorn.trio.tcp_server.MAX_RECV
# Writes go out in pieces of this size, each one progress: a client that reads at all
# (2**16 bytes per `stall_timeout`) is never taken for one that stopped.
_SEND_PIECE = 2**16
STALLED = "stalled_connection"  # refusal reason, as logged and counted


@dataclass(frozen=True, slots=True)
class ConnectionPolicy:
    slots: ConnectionSlots
    head_timeout: float
    stall_timeout: float  # a request in flight, no byte read from or written to its client
    on_refused: Callable[[str, str], None]  # (reason, detail) for a connection over a cap
    on_error: Callable[[str], None]  # the type name of an error that ended a connection


def install_connection_policy(
    config: hypercorn.config.Config, policy: ConnectionPolicy | None = None
) -> None:
    """Serve connections made with `config` by `RelayTCPServer`, under `policy` if given."""
    import hypercorn.trio.run as trio_run

    if policy is not None:
        setattr(config, _POLICY_ATTRIBUTE, policy)
        # The handshake is part of the time a connection has to send its head.
        config.ssl_handshake_timeout = policy.head_timeout
    trio_run.TCPServer = RelayTCPServer  # type: ignore[attr-defined]


def _transport(stream: object) -> trio.SocketStream:
    """The socket stream under a TLS stream (or the stream itself)."""
    inner = getattr(stream, "transport_stream", stream)
    assert isinstance(inner, trio.SocketStream)
    return inner


def _peer_address(stream: object) -> str:
    """The client's address (the host part); "" on a unix socket."""
    name = _transport(stream).socket.getpeername()
    return str(name[0]) if isinstance(name, tuple) else str(name)


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


class RelayTCPServer(TCPServer):
    """Hypercorn's per-connection server with the relay's connection policy (see above)."""

    _busy = False  # a request is in flight (Hypercorn's `Updated(idle=False)`)
    # When the pending request head must be complete (trio clock); inf: none is pending.
    _head_deadline = math.inf
    _first_head_deadline = math.inf  # the accept's: for the first head
    _last_progress = -math.inf  # trio clock: a byte read, a piece written, a request begun
    _write_started = math.inf  # trio clock: when the pending write piece began; inf: none

    async def run(self) -> None:
        policy: ConnectionPolicy | None = getattr(self.config, _POLICY_ATTRIBUTE, None)
        try:
            peer = _peer_address(self.stream)
        except OSError:  # gone before it could be served
            with trio.CancelScope(shield=True):
                await _transport(self.stream).aclose()
            return
        try:
            if policy is None:
                await super().run()
            else:
                await self._run_in_slot(policy, peer)
        except* Exception as group:  # trio.Cancelled is no Exception: it still propagates
            log.error("connection from %s ended by an error", peer, exc_info=group)
            for error in _leaves(group):
                if policy is not None:
                    policy.on_error(type(error).__name__)
            with trio.CancelScope(shield=True):
                await _transport(self.stream).aclose()

    async def _run_in_slot(self, policy: ConnectionPolicy, peer: str) -> None:
        refused = policy.slots.take(peer)
        if refused is not None:
            policy.on_refused(refused, policy.slots.describe(refused, peer))
            with trio.CancelScope(shield=True):
                await _transport(self.stream).aclose()  # no TLS: nothing is said to it
            return
        try:
            self._first_head_deadline = trio.current_time() + policy.head_timeout
            self._head_deadline = self._first_head_deadline
            async with trio.open_nursery() as watchdog:
                watchdog.start_soon(self._close_when_stalled, policy, peer)
                await super().run()
                watchdog.cancel_scope.cancel()
        finally:
            policy.slots.give_back(peer)

    async def _close_when_stalled(self, policy: ConnectionPolicy, peer: str) -> None:
        """Close the connection once a request has been in flight `stall_timeout` seconds
        without a byte read from or written to the client, or once one write piece has
        waited that long for the client whatever it sends: one that stopped reading (its
        shielded write waited for good) or keeps its HTTP/2 window shut held its slot,
        and the upstream download behind it, forever."""
        self._last_progress = trio.current_time()
        while True:
            # A write that starts later than now has its deadline after this one.
            await trio.sleep_until(
                min(self._last_progress, self._write_started) + policy.stall_timeout
            )
            now = trio.current_time()
            if now - self._write_started >= policy.stall_timeout:
                detail = f"one write waited {policy.stall_timeout:g}s for the client to read"
            elif self._busy and now - self._last_progress >= policy.stall_timeout:
                detail = (
                    f"nothing read or written for {policy.stall_timeout:g}s "
                    "with a request in flight"
                )
            else:
                if not self._busy:
                    self._last_progress = now  # idle: the head and keep-alive timeouts apply
                continue
            policy.on_refused(STALLED, f"{peer}: {detail}")
            # The transport, not the TLS stream: its close wakes a blocked write.
            await _transport(self.stream).aclose()
            return

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            broken = False
            async with self.send_lock:
                try:
                    # Shielded as Hypercorn's: no half-sent frames.
                    with trio.CancelScope(shield=True), memoryview(event.data) as data:
                        for offset in range(0, len(data), _SEND_PIECE):
                            self._write_started = trio.current_time()
                            await self.stream.send_all(data[offset : offset + _SEND_PIECE])
                            self._last_progress = trio.current_time()
                            self._write_started = math.inf
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    broken = True
                finally:
                    self._write_started = math.inf
            if broken:  # outside the lock: closing may send (an HTTP/2 reset)
                await self.protocol.handle(Closed())
            return
        if isinstance(event, Updated):
            self._busy = not event.idle
            self._last_progress = trio.current_time()
            # A head just completed, or the connection waits idle: its next head starts
            # with its first byte (the keep-alive timeout bounds the wait before it).
            self._head_deadline = math.inf
        await super().protocol_send(event)

    def _starts_a_head(self) -> bool:
        """Bytes arriving now begin a request head: HTTP/1.1 and not mid-request.
        (HTTP/2 sends control frames while idle; its first head has the accept's deadline.)"""
        return (
            not self._busy
            and self._head_deadline == math.inf
            and isinstance(self.protocol.protocol, H11Protocol)
            and getattr(self.config, _POLICY_ATTRIBUTE, None) is not None
        )

    async def _switched_to_h2(self) -> None:
        """h11 took the HTTP/2 preface (`PRI * HTTP/2.0`) for a request and reported the
        connection busy, which stopped the keep-alive task and every read timeout; the
        HTTP/2 protocol that replaced it reports only when a stream closes. A connection
        that sent the preface and no request was then held for good: say it is idle, as
        it is, with the deadline its first head got at the accept."""
        protocol = self.protocol.protocol
        if isinstance(protocol, H2Protocol) and protocol.idle:
            self._busy = False
            self._head_deadline = self._first_head_deadline
            await self.idle_task.restart(self._task_group, self._idle_timeout)

    async def _read_data(self) -> None:
        read_timeout = self.config.read_timeout or math.inf
        policy: ConnectionPolicy | None = getattr(self.config, _POLICY_ATTRIBUTE, None)
        while True:
            deadline = trio.current_time() + read_timeout
            if not self._busy:
                deadline = min(deadline, self._head_deadline)
            with trio.move_on_at(deadline) as timer:
                try:
                    data = await self.stream.receive_some(_MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
            if timer.cancelled_caught:
                if self._busy:  # the client is receiving a response: it need not send
                    continue
                break
            if data:
                self._last_progress = trio.current_time()
            if data and policy is not None and self._starts_a_head():
                self._head_deadline = trio.current_time() + policy.head_timeout
            before = self.protocol.protocol
            await self.protocol.handle(RawData(bytes(data)))
            if self.protocol.protocol is not before:
                await self._switched_to_h2()
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
