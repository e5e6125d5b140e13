"""The Hypercorn patch module is pinned: this fails when the libraries change under it."""

from __future__ import annotations

import hashlib
import inspect

from hypercorn.protocol.h2 import H2Protocol

from vpsrelay import hypercorn_patches

# sha256 of the source of the function the patch wraps, as of hypercorn 0.18.0.
CLOSE_STREAM_SOURCE_SHA256 = "a292549791640b651dc636a981d58eb25117578cc09d85929bef25d12fc425ed"


def test_pinned_versions_are_installed() -> None:
    assert hypercorn_patches.versions_match(), (
        f"re-check vpsrelay/hypercorn_patches.py: pinned {hypercorn_patches.PINNED}"
    )


def test_wrapped_function_is_unchanged() -> None:
    original = hypercorn_patches.original_close_stream()
    digest = hashlib.sha256(inspect.getsource(original).encode()).hexdigest()
    assert digest == CLOSE_STREAM_SOURCE_SHA256


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


def test_cap_connections_installs_the_relay_server() -> None:
    import hypercorn.config
    import hypercorn.trio.run as trio_run

    config = hypercorn.config.Config()
    hypercorn_patches.cap_connections(config, 7, lambda reason, detail: None)
    assert trio_run.TCPServer is hypercorn_patches.RelayTCPServer  # type: ignore[attr-defined]
    assert getattr(config, "_vpsrelay_connection_limiter").total_tokens == 7  # noqa: B009
