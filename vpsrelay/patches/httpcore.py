"""The one place where vpsrelay tunes httpcore's internals, pinned to the versions it was
measured on (`tests/test_httpcore_patches.py` fails when they change). A performance reach:
on other versions `vpsrelay.patches` leaves httpcore alone and the relay runs with a warning.

Upstream read size: httpcore's HTTP/1.1 connection reads the socket 64 KiB at a time,
and every read then crosses h11, httpcore, httpx, the digest and one ASGI send. A blob
relay spends most of its CPU on that per-read work: reading up to 512 KiB at a time (the
kernel returns what is queued, so a slow upstream still yields small reads) halved the
relay's CPU per GiB of pass-through (docs/benchmarks.md). 1 MiB was no faster and held
~30 MiB more at peak with 20 streams (each read passes through h11's buffer, so a few
copies of it are alive per stream).
"""

from __future__ import annotations

import logging
from importlib.metadata import version

from httpcore._async.http11 import AsyncHTTP11Connection

log = logging.getLogger("vpsrelay.upstream")

PINNED = {"httpcore": "1.0.9", "h11": "0.16.0"}
DEFAULT_READ_BYTES = 64 * 1024  # httpcore 1.0.9's own value
READ_BYTES = 512 * 1024


def versions_match() -> bool:
    return all(version(name) == pinned for name, pinned in PINNED.items())


def apply() -> bool:
    """Install the tuning if httpcore is the pinned version; say whether it did."""
    if AsyncHTTP11Connection.READ_NUM_BYTES == READ_BYTES:
        return True
    if not versions_match():
        log.warning("httpcore/h11 versions differ from %s: upstream reads stay 64 KiB", PINNED)
        return False
    AsyncHTTP11Connection.READ_NUM_BYTES = READ_BYTES
    return True
