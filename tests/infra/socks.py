"""A small SOCKS5 proxy (RFC 1928, CONNECT only; RFC 1929 user/password) on loopback.

It records every CONNECT target and refuses any target outside loopback, so a test can
show that a registry was reached through it and that nothing left the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class SocksProxy:
    """`socks5://[user:password@]127.0.0.1:<port>`; `targets` lists (host, port) asked for."""

    username: str | None = None
    password: str | None = None
    host: str = "127.0.0.1"
    names: set[str] = field(default_factory=set)  # names it resolves (to 127.0.0.1)
    targets: list[tuple[str, int]] = field(default_factory=list)
    auth_failures: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="socks5", daemon=True)
        self._thread.start()

    def url(self, scheme: str = "socks5") -> str:
        userinfo = f"{self.username}:{self.password}@" if self.username else ""
        return f"{scheme}://{userinfo}{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(30)
        try:
            upstream = self._handshake(client)
        except (OSError, ValueError):
            client.close()
            return
        if upstream is None:
            client.close()
            return
        with self._lock:
            self._sockets.append(upstream)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)

    def _handshake(self, client: socket.socket) -> socket.socket | None:
        version, count = _read(client, 2)
        methods = _read(client, count)
        if version != 5:
            return None
        wanted = 2 if self.username is not None else 0
        if wanted not in methods:
            client.sendall(b"\x05\xff")
            return None
        client.sendall(bytes([5, wanted]))
        if wanted == 2:
            _, ulen = _read(client, 2)
            user = _read(client, ulen).decode()
            (plen,) = _read(client, 1)
            password = _read(client, plen).decode()
            if (user, password) != (self.username, self.password):
                with self._lock:
                    self.auth_failures += 1
                client.sendall(b"\x01\x01")
                return None
            client.sendall(b"\x01\x00")
        _, command, _, kind = _read(client, 4)
        if kind == 1:
            host = str(ipaddress.IPv4Address(_read(client, 4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(_read(client, 16)))
        elif kind == 3:
            (length,) = _read(client, 1)
            host = _read(client, length).decode()
        else:
            return None
        (port,) = struct.unpack("!H", _read(client, 2))
        with self._lock:
            self.targets.append((host, port))
        reply = b"\x05%c\x00\x01\x00\x00\x00\x00\x00\x00"
        if host in self.names:
            host = "127.0.0.1"
        if command != 1 or host not in ("127.0.0.1", "::1"):
            client.sendall(reply % 2)  # not allowed by ruleset: loopback only
            return None
        try:
            upstream = socket.create_connection((host, port), timeout=10)
        except OSError:
            client.sendall(reply % 5)  # connection refused
            return None
        upstream.settimeout(30)
        client.sendall(reply % 0)
        return upstream

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def __enter__(self) -> SocksProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError("the client left mid-handshake")
        data += chunk
    return data


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(256 * 1024):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(sink)
        _close(source)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
