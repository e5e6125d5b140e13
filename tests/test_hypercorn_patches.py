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
