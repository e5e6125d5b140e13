"""The httpcore tuning is pinned: this fails when httpcore changes under it."""

from __future__ import annotations

import hashlib
import inspect

from httpcore._async.http11 import AsyncHTTP11Connection

from vpsrelay.patches import httpcore as httpcore_patches

# sha256 of the source of the function that reads `READ_NUM_BYTES`, as of httpcore 1.0.9.
RECEIVE_EVENT_SHA256 = "1edfeb771f851df227ee68e76565ba6f794b57706b146d481038533663eb8f3f"


def test_pinned_versions_are_installed() -> None:
    assert httpcore_patches.versions_match(), (
        f"re-check vpsrelay/patches/httpcore.py: pinned {httpcore_patches.PINNED}"
    )


def test_the_read_size_is_still_read_where_it_was() -> None:
    source = inspect.getsource(AsyncHTTP11Connection._receive_event)
    assert hashlib.sha256(source.encode()).hexdigest() == RECEIVE_EVENT_SHA256
    assert "self.READ_NUM_BYTES" in source


def test_apply_sets_the_read_size_once() -> None:
    assert AsyncHTTP11Connection.READ_NUM_BYTES in (
        httpcore_patches.DEFAULT_READ_BYTES,
        httpcore_patches.READ_BYTES,
    )
    assert httpcore_patches.apply()
    assert httpcore_patches.apply()
    assert AsyncHTTP11Connection.READ_NUM_BYTES == httpcore_patches.READ_BYTES
