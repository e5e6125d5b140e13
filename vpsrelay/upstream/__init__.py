"""The only code that talks to registries: connections, the error boundary, tokens.

`client` holds `Upstream` (per-registry pools, challenge discovery, redirects through
the sans-IO policy, and the one place where httpx errors become `RelayError`s);
`tokens` holds the token client the relay, the cache, client auth, `warm` and `check`
share.
"""

from __future__ import annotations

from vpsrelay.upstream.client import (
    MAX_TOKEN_ANSWER_BYTES,
    USER_AGENT,
    RelayError,
    Upstream,
    map_httpx_errors,
    read_body,
)

__all__ = [
    "MAX_TOKEN_ANSWER_BYTES",
    "USER_AGENT",
    "RelayError",
    "Upstream",
    "map_httpx_errors",
    "read_body",
]
