"""The Hypercorn patch module is pinned: this fails when the libraries change under it.

The coalescing `_send_data` is driven here against a real h2 client connection (the h2
library on both ends, no sockets): frames, flow control and END_STREAM as a client sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trio
import trio.testing
from hypercorn.events import RawData
from hypercorn.protocol.h2 import H2Protocol, StreamBuffer
from hypercorn.trio.worker_context import EventWrapper
from hypothesis import given, settings, strategies as st
from priority.priority import PriorityTree

from vpsrelay.core.connslots import ConnectionSlots
from vpsrelay.patches import hypercorn as hypercorn_patches

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

# sha256 of the source of each function the patches wrap, replace or rely on, as of
# hypercorn 0.18.0. A changed hash means: re-read that function, re-check the patch.
PINNED_SOURCES = {
    "H2Protocol._close_stream": "a292549791640b651dc636a981d58eb25117578cc09d85929bef25d12fc425ed",
    "H2Protocol._send_data": "a89ce4286f36982057297d5c3302777cbcdb303c52eeb0936feaf5d95dd88eef",
    "H2Protocol.send_task": "3f55a53766403935c65d27c3d50c3f835cb00ac1e2e80b441fb4d9eadb2dbad9",
    "H2Protocol._flush": "1a771e85178d124c6e2420e89ec750159929b76267fc07dd3d798bb6f72db77a",
    "H2Protocol.stream_send": "d8fc824e2770ba5c7af707fc01e14eb2eaef377064221ec84009fa8d949fe90b",
    "H2Protocol.handle": "c67e89eb79af903209c197ff59b73d7210cb9ccd48d10798f8ff846926a6168a",
    "StreamBuffer.pop": "9eb73c8833891346cbd8658fdd2ac29da8336007abab40a711db857f9c7280e6",
    "StreamBuffer.push": "4ca8ee7b0fec5200558d7c92f251c1c5822f3589b2303c9d5d98bfbb579200b3",
    # h2 4.4.1: what `queue_data_frames` reproduces (checked byte for byte below).
    "H2Connection.send_data": "9f67cb77f02c01d08a7676dd2c499d64b2bb021b46faa99afb2fe506c838bcdf",
    "H2Connection._prepare_for_sending": (
        "6be16b5970454a30f26185221c6d744febde7ec9450d08b3165f5adc4b7400c5"
    ),
    "H2Connection.data_to_send": "d681c42548b1f8cc490c097511eae074d18e2a4da006088bd79b01b5e8ab4955",
    "H2Connection.local_flow_control_window": (
        "e8b7dd814ce6bc1d983b8a924b8f9335aca8bd744e04be7b498889d319700ec6"
    ),
    "H2Stream.send_data": "9742a001ccca6af762d5f21ef2764c999bfd64012019e27241b2d18fdc8ff2dd",
}
FRAME = 16384


def test_pinned_versions_are_installed() -> None:
    assert hypercorn_patches.versions_match(), (
        f"re-check vpsrelay/patches/hypercorn.py: pinned {hypercorn_patches.PINNED}"
    )


def test_pinned_functions_are_unchanged() -> None:
    functions = hypercorn_patches.pinned_functions()
    assert set(functions) == set(PINNED_SOURCES)
    for name, function in functions.items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
        assert digest == PINNED_SOURCES[name], f"{name} changed in hypercorn"


def test_apply_is_idempotent() -> None:
    assert hypercorn_patches.apply()
    assert hypercorn_patches.apply()
    assert H2Protocol._vpsrelay_patched  # type: ignore[attr-defined]


# The TCPServer methods `RelayTCPServer` overrides or relies on, and the worker that builds
# one per connection from the module global it replaces (hypercorn 0.18.0).
TCP_SERVER_SOURCES = {
    "run": "fd34b021d1a86c9859514de9472306ea47f4a6763732b26b7a5945278ded0e08",
    "_read_data": "7ca747d922c65cf1fb6bd7ceabe82b0b51bb9de218ce159d7b7e093ec279f728",
    "protocol_send": "225856426bff7be02990c0badb90f51f801db14ac5db0f3d0c210cafbeb528ab",
    "_close": "bc73c4ae25a1ceec1d535639443b57b3d3dea8b03c5375d58bf9702b8056ee15",
}
WORKER_SERVE_SHA256 = "8dc8347a9fc357ca334f8c3e4bcf0368176510a96d434f21a5eb4c9ec4103726"


def test_tcp_server_is_unchanged() -> None:
    from hypercorn.trio.tcp_server import TCPServer

    for name, expected in TCP_SERVER_SOURCES.items():
        source = inspect.getsource(getattr(TCPServer, name))
        assert hashlib.sha256(source.encode()).hexdigest() == expected, name


def test_worker_builds_servers_from_the_module_global() -> None:
    import hypercorn.trio.run as trio_run

    source = inspect.getsource(trio_run.worker_serve)
    assert hashlib.sha256(source.encode()).hexdigest() == WORKER_SERVE_SHA256
    assert "partial(\n                                TCPServer," in source


def _policy(**overrides: object) -> hypercorn_patches.ConnectionPolicy:
    fields: dict[str, object] = {
        "slots": ConnectionSlots(7, 3),
        "head_timeout": 4.0,
        "stall_timeout": 60.0,
        "on_refused": lambda reason, detail: None,
        "on_error": lambda error: None,
    }
    fields.update(overrides)
    return hypercorn_patches.ConnectionPolicy(**fields)  # type: ignore[arg-type]


def test_install_connection_policy_installs_the_relay_server() -> None:
    import hypercorn.config
    import hypercorn.trio.run as trio_run

    config = hypercorn.config.Config()
    policy = _policy()
    hypercorn_patches.install_connection_policy(config, policy)
    assert trio_run.TCPServer is hypercorn_patches.RelayTCPServer  # type: ignore[attr-defined]
    assert getattr(config, "_vpsrelay_connection_policy") is policy  # noqa: B009
    assert config.ssl_handshake_timeout == 4.0  # the handshake counts towards the head
    assert H2Protocol._send_data is hypercorn_patches.send_data_coalesced


def test_apply_refuses_other_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A safety patch that cannot apply stops the relay: it does not serve without it."""
    monkeypatch.setattr(H2Protocol, "_vpsrelay_patched", False)
    monkeypatch.setattr(hypercorn_patches, "version", lambda name: "0.0.1")
    with pytest.raises(hypercorn_patches.PatchError, match="need exactly"):
        hypercorn_patches.apply()


def test_pyproject_pins_the_patched_versions() -> None:
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    for name, pinned in hypercorn_patches.PINNED.items():
        assert f"{name}=={pinned}" in project["project"]["dependencies"]


class _ClosableStream:
    async def handle(self, event: object) -> None:
        pass


@pytest.mark.parametrize("connection_closed", [False, True])
async def test_an_unfinished_stream_is_reset_unless_the_connection_is_gone(
    connection_closed: bool,
) -> None:
    """The reset goes out on a live connection. On a closed one nothing is sent: Hypercorn
    closes every stream from `handle(Closed())`, which it may call holding the send lock,
    and a send from there took that lock twice (the RuntimeError that ended the relay)."""
    hypercorn_patches.apply()
    pair = _Pair(client_window=None)
    protocol = pair.protocol
    protocol.streams = {1: _ClosableStream()}  # type: ignore[dict-item]
    protocol.has_data = EventWrapper()
    protocol.closed = connection_closed
    await protocol._close_stream(1)
    resets = [
        event
        for data in pair.writes
        for event in pair.client.receive_data(data)
        if isinstance(event, h2.events.StreamReset)
    ]
    assert len(resets) == (0 if connection_closed else 1)


def test_the_tls_listeners_share_the_connection_policy() -> None:
    """HTTPS and port 80 copy the main config: the same slots, deadline and catch-all."""
    import hypercorn.config

    from vpsrelay.tls import serving as tlsserver

    base = hypercorn.config.Config()
    policy = _policy()
    hypercorn_patches.install_connection_policy(base, policy)
    for cls in (tlsserver._ManagedTLSConfig, hypercorn.config.Config):
        copy = tlsserver._copy_config(base, cls, ("127.0.0.1:0",))
        assert getattr(copy, "_vpsrelay_connection_policy") is policy  # noqa: B009
        assert copy.ssl_handshake_timeout == policy.head_timeout


async def _server_on_socketpair(
    policy: hypercorn_patches.ConnectionPolicy | None,
) -> tuple[hypercorn_patches.RelayTCPServer, trio.socket.SocketType]:
    import hypercorn.config
    from hypercorn.trio.worker_context import WorkerContext

    config = hypercorn.config.Config()
    if policy is not None:
        hypercorn_patches.install_connection_policy(config, policy)
    ours, theirs = trio.socket.socketpair()
    server = hypercorn_patches.RelayTCPServer(
        None,  # type: ignore[arg-type]
        config,
        WorkerContext(None),
        {},
        trio.SocketStream(ours),  # type: ignore[arg-type]
    )
    return server, theirs


async def test_an_error_in_a_connection_is_logged_counted_and_contained(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a connection raises ends that connection only: Hypercorn runs every
    connection in the serving nursery, so one exception ended the relay."""
    from hypercorn.trio.tcp_server import TCPServer

    async def broken_run(self: TCPServer) -> None:
        raise RuntimeError("attempt to re-acquire an already held Lock")

    monkeypatch.setattr(TCPServer, "run", broken_run)
    errors: list[str] = []
    slots = ConnectionSlots(7, 3)
    server, peer = await _server_on_socketpair(_policy(slots=slots, on_error=errors.append))
    with peer:
        await server.run()  # returns: nothing escapes
        assert await peer.recv(10) == b""  # and the connection is closed
    assert errors == ["RuntimeError"]
    assert slots.open == 0
    assert "ended by an error" in caplog.text


async def test_cancellation_still_ends_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercorn.trio.tcp_server import TCPServer

    async def forever(self: TCPServer) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr(TCPServer, "run", forever)
    errors: list[str] = []
    slots = ConnectionSlots(7, 3)
    server, peer = await _server_on_socketpair(_policy(slots=slots, on_error=errors.append))
    with peer, trio.move_on_after(0.2) as scope:
        await server.run()
    assert scope.cancelled_caught  # trio.Cancelled went through the catch-all
    assert errors == []
    assert slots.open == 0
    await server.stream.aclose()  # Hypercorn's own `run` (stubbed here) closes it


async def test_connections_over_the_address_cap_are_closed_unserved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hypercorn.trio.tcp_server import TCPServer

    served: list[object] = []

    async def serve(self: TCPServer) -> None:
        served.append(self)
        await trio.sleep_forever()

    monkeypatch.setattr(TCPServer, "run", serve)
    refused: list[str] = []
    slots = ConnectionSlots(10, 2)
    policy = _policy(slots=slots, on_refused=lambda reason, detail: refused.append(reason))
    peers, servers = [], []
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # a socketpair's peer address is the same (unnamed) every time
            server, peer = await _server_on_socketpair(policy)
            peers.append(peer)
            servers.append(server)
            nursery.start_soon(server.run)
            await trio.testing.wait_all_tasks_blocked()
        assert len(served) == 2
        assert refused == ["address_connection_cap"]
        assert await peers[2].recv(10) == b""
        nursery.cancel_scope.cancel()
    assert slots.open == 0
    for peer, server in zip(peers, servers, strict=True):
        peer.close()
        await server.stream.aclose()


class _SilentProtocol:
    """What `_read_data` and `protocol_send` need of Hypercorn's protocol: bytes read are
    dropped, as the app drops a GET's body or h2 a WINDOW_UPDATE that needs no answer."""

    protocol = None

    async def handle(self, event: object) -> None:
        pass


STALL = 0.5


async def _serve_one_big_write(
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    peer_step: Callable[[trio.socket.SocketType], Awaitable[None]],
) -> tuple[float, list[str]]:
    """A connection with a request in flight whose response is one `size`-byte write, the
    peer running `peer_step` every 0.05 s; (seconds the connection lasted, refusals)."""
    from types import SimpleNamespace

    from hypercorn.trio.tcp_server import TCPServer

    async def serve(self: hypercorn_patches.RelayTCPServer) -> None:
        self.protocol = _SilentProtocol()  # type: ignore[assignment]
        self._busy = True
        async with trio.open_nursery() as nursery:
            self._task_group = SimpleNamespace(_nursery=nursery)  # type: ignore[assignment]
            nursery.start_soon(self._read_data)
            await self.protocol_send(RawData(b"x" * size))
            nursery.cancel_scope.cancel()  # answered: done

    monkeypatch.setattr(TCPServer, "run", serve)
    refused: list[str] = []
    policy = _policy(stall_timeout=STALL, on_refused=lambda reason, detail: refused.append(reason))
    server, peer = await _server_on_socketpair(policy)
    began = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def run_peer() -> None:
            # Bounded: the peer then hangs up, which ends even a shielded write.
            with peer, contextlib.suppress(OSError), trio.move_on_after(20 * STALL):
                while True:
                    await peer_step(peer)
                    await trio.sleep(0.05)

        nursery.start_soon(run_peer)
        await server.run()
        nursery.cancel_scope.cancel()
    await server.stream.aclose()
    return trio.current_time() - began, refused


async def test_a_write_pending_for_the_stall_timeout_closes_the_connection_whatever_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer reads nothing and sends a byte every 0.05 s (a trickled GET body, HTTP/2
    WINDOW_UPDATEs): every byte read counted as progress, so the shielded write waited,
    and held the connection, for good."""

    async def trickle(peer: trio.socket.SocketType) -> None:
        await peer.send(b"a")

    lasted, refused = await _serve_one_big_write(monkeypatch, 8 * 1024 * 1024, trickle)
    assert refused == [hypercorn_patches.STALLED]
    assert STALL <= lasted < 10 * STALL


async def test_a_client_reading_slowly_is_not_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each 64 KiB piece is taken within the stall timeout: the write goes to its end."""

    async def read_some(peer: trio.socket.SocketType) -> None:
        await peer.recv(64 * 1024)

    lasted, refused = await _serve_one_big_write(monkeypatch, 1024 * 1024, read_some)
    assert refused == []
    assert lasted < 20 * STALL


class _Pair:
    """A server-side `H2Protocol` (only what `_send_data` uses) and an h2 client."""

    def __init__(self, *, client_window: int | None) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.client.initiate_connection()
        if client_window is not None:
            self.client.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: client_window}
            )
            self.client.increment_flow_control_window(client_window)
        self.client.send_headers(
            1,
            [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
            end_stream=True,
        )
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        server.initiate_connection()
        server.receive_data(self.client.data_to_send())
        server.send_headers(1, [(b":status", b"200")])
        self.client.receive_data(server.data_to_send())
        self.writes: list[bytes] = []
        protocol = H2Protocol.__new__(H2Protocol)
        protocol.connection = server
        protocol.stream_buffers = {1: StreamBuffer(EventWrapper)}
        protocol.priority = PriorityTree()
        protocol.priority.insert_stream(1)

        async def send(event: object) -> None:
            assert isinstance(event, RawData)
            self.writes.append(event.data)

        protocol.send = send
        self.protocol = protocol
        self.body = bytearray()
        self.ended = False

    def deliver(self) -> list[int]:
        """Feed the writes so far to the client; the DATA frame sizes it saw."""
        sizes = []
        for data in self.writes:
            for event in self.client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    sizes.append(len(event.data))
                    self.body += event.data
                    self.client.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended = True
        self.writes.clear()
        self.protocol.connection.receive_data(self.client.data_to_send())  # WINDOW_UPDATEs
        return sizes


async def test_frames_are_coalesced_into_one_write_per_256_kib() -> None:
    hypercorn_patches.apply()
    pair = _Pair(client_window=16 * 1024 * 1024)
    body = os.urandom(600 * 1024)
    buffer = pair.protocol.stream_buffers[1]
    buffer.buffer.extend(body)
    buffer.set_complete()
    writes = 0
    for _ in range(10):
        if 1 not in pair.protocol.stream_buffers:
            break
        await pair.protocol._send_data(1)
        writes += len(pair.writes)
        sizes = pair.deliver()
        assert all(size <= FRAME for size in sizes)
    assert bytes(pair.body) == body
    assert pair.ended
    # 600 KiB: 256 + 256 + 88 KiB, each in one write; END_STREAM in its own.
    assert writes == 4


async def test_coalescing_respects_the_flow_control_window() -> None:
    hypercorn_patches.apply()
    pair = _Pair(client_window=None)  # the default 65,535-byte window
    body = os.urandom(200 * 1024)
    buffer = pair.protocol.stream_buffers[1]
    buffer.buffer.extend(body)
    buffer.set_complete()
    await pair.protocol._send_data(1)
    assert len(pair.writes) == 1
    assert sum(pair.deliver()) == 65535  # no more than the window, in one write
    for _ in range(20):
        if 1 not in pair.protocol.stream_buffers:
            break
        await pair.protocol._send_data(1)
        pair.deliver()
    assert bytes(pair.body) == body
    assert pair.ended


def _server_with_open_stream(frame_size: int, window: int) -> h2.connection.H2Connection:
    """A server connection with stream 1 open, the client's max frame size and window set."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: frame_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
        }
    )
    client.increment_flow_control_window(window)
    client.send_headers(
        1,
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
        end_stream=True,
    )
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200")])
    server.data_to_send()
    return server


@settings(max_examples=60, deadline=None)
@given(
    frame_size=st.integers(16384, 70000),
    window=st.integers(1, 2**20),
    sizes=st.lists(st.integers(1, 300_000), min_size=1, max_size=4),
)
def test_queued_frames_equal_h2s_own(frame_size: int, window: int, sizes: list[int]) -> None:
    """Bytes on the wire, both windows and the stream state: as h2's send_data per frame."""
    ours = _server_with_open_stream(frame_size, window)
    theirs = _server_with_open_stream(frame_size, window)
    for size in sizes:
        amount = min(size, ours.local_flow_control_window(1))
        if amount == 0:
            break
        data = bytearray(os.urandom(size))
        hypercorn_patches.queue_data_frames(ours, 1, data, amount)
        for offset in range(0, amount, theirs.max_outbound_frame_size):
            end = min(amount, offset + theirs.max_outbound_frame_size)
            theirs.send_data(1, bytes(data[offset:end]))
        assert ours.data_to_send() == theirs.data_to_send()
        assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window
        assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1)
        assert ours.streams[1].state_machine.state == theirs.streams[1].state_machine.state


def test_queueing_refuses_what_h2_would() -> None:
    server = _server_with_open_stream(16384, 1000)
    with pytest.raises(h2.exceptions.FlowControlError):
        hypercorn_patches.queue_data_frames(server, 1, bytearray(2000), 1001)
    server.end_stream(1)
    with pytest.raises(h2.exceptions.StreamClosedError):
        hypercorn_patches.queue_data_frames(server, 1, bytearray(10), 10)


async def test_a_waiting_producer_is_released_when_the_buffer_runs_low() -> None:
    """The app's `push` of a big chunk waits; it must resume once the chunk is sent."""
    hypercorn_patches.apply()
    pair = _Pair(client_window=16 * 1024 * 1024)
    buffer = pair.protocol.stream_buffers[1]
    pushed = trio.Event()

    async def producer() -> None:
        await buffer.push(os.urandom(600 * 1024))  # over the high-water mark: waits
        pushed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not pushed.is_set()
        for _ in range(5):
            await pair.protocol._send_data(1)
            pair.deliver()
            await trio.testing.wait_all_tasks_blocked()
            if pushed.is_set():
                break
        assert pushed.is_set()
        assert len(pair.body) == 600 * 1024


async def test_a_shut_window_does_not_let_the_buffer_grow() -> None:
    """A client that does not open its window: the app's producer stays blocked after its
    first chunk, however often the send task comes round (Hypercorn's own pop woke it on
    every pass, one more 1 MiB chunk buffered each time); the body arrives whole later."""
    hypercorn_patches.apply()
    pair = _Pair(client_window=None)  # 65,535 bytes, then nothing until WINDOW_UPDATEs
    buffer = pair.protocol.stream_buffers[1]
    chunk = os.urandom(1024 * 1024)
    pushed = 0

    async def producer() -> None:
        nonlocal pushed
        for _ in range(8):
            await buffer.push(chunk)
            pushed += 1
        buffer.set_complete()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(50):  # the send task's passes while the window stays shut
            await pair.protocol._send_data(1)
            await trio.testing.wait_all_tasks_blocked()
        assert pushed <= 1
        assert len(buffer.buffer) <= len(chunk)
        for _ in range(2000):
            if 1 not in pair.protocol.stream_buffers:
                break
            pair.deliver()  # the client reads and opens its window again
            await pair.protocol._send_data(1)
            await trio.testing.wait_all_tasks_blocked()
        pair.deliver()
    assert pushed == 8
    assert bytes(pair.body) == chunk * 8
    assert pair.ended


def test_serve_refuses_to_start_without_the_safety_patches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Other hypercorn/h2 versions: one line naming them, exit status 1, nothing served."""
    from click.testing import CliRunner

    from vpsrelay import patches as library_patches
    from vpsrelay.cli import main

    monkeypatch.setattr(H2Protocol, "_vpsrelay_patched", False)
    monkeypatch.setattr(library_patches, "version", lambda name: "0.0.1")
    result = CliRunner().invoke(
        main, ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(
        "vpsrelay: cannot serve: hypercorn 0.0.1 and h2 0.0.1 are installed, vpsrelay needs "
        "hypercorn==0.18.0, h2==4.4.1 for the HTTP/2 buffer bound"
    )
    assert not H2Protocol._vpsrelay_patched  # type: ignore[attr-defined]
    assert "Traceback" not in result.output
    assert "listening on" not in result.output
