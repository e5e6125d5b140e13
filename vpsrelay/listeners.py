"""Listening sockets: bound once by the supervisor, served by every worker.

With `server.workers` > 1 the supervising parent binds every address (plain, TLS, port 80,
metrics) before any worker starts, and each worker inherits the same sockets: the kernel
hands each new connection to whichever worker accepts first. The parent tells a worker
which descriptor serves which configured address in `_VPSRELAY_LISTENERS` (JSON, `ROLE
ADDRESS` -> descriptor: one address string, `127.0.0.1:0` say, may name several listeners of
different roles); `bind_spec` turns an address into Hypercorn's `fd://N` for an inherited one.
"""

from __future__ import annotations

import json
import os
import socket

from vpsrelay.config import parse_listen

ENVIRONMENT_NAME = "_VPSRELAY_LISTENERS"
BACKLOG = 1024
# The roles of listeners: what each serves.
PLAIN = "plain"  # server.listen: the relay over plain HTTP and h2c
HTTPS = "https"  # tls.https_listen
PORT80 = "http"  # tls.http_listen: ACME HTTP-01 answers and redirects to https
METRICS = "metrics"  # metrics.listen


def key(role: str, address: str) -> str:
    return f"{role} {address}"


def inherited() -> dict[str, int]:
    """`key(role, address)` -> descriptor the supervisor handed this worker (empty when
    unsupervised)."""
    # Not a setting: the supervisor sets it for the process it starts.
    text = os.environ.get(ENVIRONMENT_NAME)  # noqa: TID251
    if not text:
        return {}
    table = json.loads(text)
    return {str(name): int(fd) for name, fd in table.items()}


def encode(table: dict[str, int]) -> str:
    return json.dumps(table, sort_keys=True)


def host_port(address: str) -> str:
    host, port = parse_listen(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_spec(role: str, address: str) -> str:
    """Hypercorn's bind for `address`: the inherited socket's `fd://N`, else HOST:PORT."""
    fd = inherited().get(key(role, address))
    return f"fd://{fd}" if fd is not None else host_port(address)


def bind(address: str) -> socket.socket:
    """A listening TCP socket on `address` (port 0: one the kernel picks), inheritable.

    Raises:
        OSError: the address is taken or not ours.
    """
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket, scheme: str) -> str:
    """`http://127.0.0.1:5000`, `https://[::1]:443`: as Hypercorn reports its binds."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    return f"{scheme}://{shown}:{port}"
