"""A TCP proxy on loopback that a test switches to fail the server behind it.

Put it in front of a store (SeaweedFS's S3 port) and point the relay at it. Modes:
`forward` (pass bytes both ways); `reset` (every connection, open or new, is reset: a
store that went away); `drip` (the server's bytes reach the client at `DRIP_BYTES` every
`DRIP_SECONDS`: a store that still answers, too slowly); `hang` (connections accepted and
requests taken in, never answered: a store that went silent). `switch_after(mode, n)`
switches once any one connection has carried `n` bytes from the server: mid-body of a big
object. `attempts` counts connections accepted, and in `hang` mode the requests (reads
from the client) on open ones too.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

DRIP_BYTES = 1024
DRIP_SECONDS = 0.5
IDLE_SECONDS = 60.0  # a connection with nothing to forward for this long is closed


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (linger 0), as a store that crashed would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):  # wakes a thread blocked reading it (no FIN sent)
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """`127.0.0.1:<port>` forwarding to `target` (host, port) until told otherwise."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._mode = "forward"
        self._armed: tuple[str, int] | None = None
        self._open: list[socket.socket] = []
        self._hung: list[socket.socket] = []  # accepted in `hang` mode, never answered
        self.attempts = 0
        self.switched = threading.Event()
        self.switched_at = 0.0  # time.monotonic() of the last switch away from forward
        self._thread = threading.Thread(target=self._accept, name="faultproxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        assert mode in ("forward", "reset", "drip", "hang"), mode
        with self._lock:
            self._mode, self._armed = mode, None
            doomed = list(self._open) if mode == "reset" else []
            if mode != "hang":
                doomed += self._hung
                self._hung = []
        for sock in doomed:
            _reset(sock)
        if mode != "forward":
            self.switched_at = time.monotonic()
            self.switched.set()

    def switch_after(self, mode: str, server_bytes: int) -> None:
        """Switch to `mode` once one connection has carried `server_bytes` from the server
        (what is past that count in the chunk that crosses it is already under `mode`)."""
        with self._lock:
            self._armed = (mode, server_bytes)
            self.switched.clear()

    def reset_count(self) -> None:
        with self._lock:
            self.attempts = 0

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            doomed, self._open, self._hung = [*self._open, *self._hung], [], []
        for sock in doomed:
            _reset(sock)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.attempts += 1
                mode = self._mode
            if mode == "reset":
                _reset(client)
                continue
            if mode == "hang":
                with self._lock:
                    self._hung.append(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open += [client, server]
            for source, sink, from_server in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(source, sink, from_server), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        carried = 0
        source.settimeout(IDLE_SECONDS)
        try:
            while not self._stop.is_set():
                data = source.recv(65536)
                if not data:
                    break
                if self._mode == "hang":  # swallowed: a request here is never answered
                    if not from_server:
                        with self._lock:
                            self.attempts += 1
                    continue
                if from_server:
                    data = self._maybe_switch(carried, data, sink)
                    carried += len(data)
                    if self._mode == "drip":
                        self._drip(data, sink)
                        continue
                if self._mode == "reset":
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if self._mode == "reset":
                _reset(source)
                _reset(sink)
            else:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)

    def _maybe_switch(self, carried: int, data: bytes, sink: socket.socket) -> bytes:
        """Send what fits under the armed count as the current mode; switch if crossed."""
        with self._lock:
            armed = self._armed
        if armed is None or carried + len(data) <= armed[1]:
            return data
        head = max(0, armed[1] - carried)
        sink.sendall(data[:head])
        self.set_mode(armed[0])
        return data[head:]

    def _drip(self, data: bytes, sink: socket.socket) -> None:
        for start in range(0, len(data), DRIP_BYTES):
            if self._stop.wait(DRIP_SECONDS) or self._mode != "drip":
                if self._mode == "forward":
                    sink.sendall(data[start:])
                    return
                raise OSError("the proxy stopped dripping")
            sink.sendall(data[start : start + DRIP_BYTES])
