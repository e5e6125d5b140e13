"""Shared bits for the threaded stdlib HTTP stand-ins (token server, CDN)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class LoggedRequest:
    """One request as received. ``headers`` keys are lower-cased; ``path`` includes the query."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    client: tuple[str, int] = ("", 0)
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class RequestLog:
    """Thread-safe append-only list of ``LoggedRequest`` with ``clear()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[LoggedRequest] = []

    def append(self, item: LoggedRequest) -> None:
        with self._lock:
            self._items.append(item)

    def snapshot(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class QuietThreadingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body are expected in streaming tests; keep stderr quiet.
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "vpsrelay-test"
    sys_version = ""
    timeout = 60  # idle keep-alive connections end eventually

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def headers_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in self.headers.items():
            key = k.lower()
            out[key] = f"{out[key]}, {v}" if key in out else v
        return out


def serve_in_thread(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name=name, daemon=True
    )
    thread.start()
    return thread


def stop_server(server: ThreadingHTTPServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
