"""Locate external binaries the integration tests need; skip or fail when one is missing."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_ENV = "VPSRELAY_REQUIRE_INTEGRATION"


def integration_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def require_binary(name: str) -> str:
    """Return the absolute path of ``name``.

    If it is not on PATH: ``pytest.skip`` with the reason, or ``pytest.fail`` when
    ``VPSRELAY_REQUIRE_INTEGRATION=1`` (CI must not silently skip integration tests).
    """
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"required binary {name!r} not found on PATH"
    if integration_required():
        pytest.fail(f"{reason} and {REQUIRE_ENV}=1", pytrace=False)
    pytest.skip(reason)
