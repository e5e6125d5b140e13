"""Test infrastructure: offline OCI builder, Docker Hub stand-in (token server, CDN, registry).

Importing this package does not import pytest (so ``tests.infra.oci`` stays stdlib-only);
``require_binary`` pulls in ``tests.infra.binaries`` lazily.
"""

from __future__ import annotations


def require_binary(name: str) -> str:
    """See ``tests.infra.binaries.require_binary``: path of ``name`` or skip/fail the test."""
    from tests.infra.binaries import require_binary as _require_binary

    return _require_binary(name)


__all__ = ["require_binary"]
