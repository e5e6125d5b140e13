"""Shared fixtures: every test starts from a clean environment."""

from __future__ import annotations

import os

import pytest

KEPT = frozenset({"VPSRELAY_REQUIRE_INTEGRATION"})
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop `VPSRELAY_*` settings and proxy variables so the host cannot steer a test.

    `VPSRELAY_REQUIRE_INTEGRATION` stays: the integration suite reads it to decide
    between skipping and failing when a binary is missing.
    """
    for name in list(os.environ):
        if (name.startswith("VPSRELAY_") and name not in KEPT) or name.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
