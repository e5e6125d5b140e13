"""Shared fixtures: every test starts from a clean environment; the Docker Hub stand-in
(``hub``) is one per session for the integration and security suites alike."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from tests.infra import require_binary
from tests.infra.hub import Hub, start_hub

if TYPE_CHECKING:
    from collections.abc import Iterator

KEPT = frozenset({"VPSRELAY_REQUIRE_INTEGRATION", "VPSRELAY_CHAOS_SEED"})
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")
# Everything under these folders needs real sockets and real parts, marked or not.
INTEGRATION_DIRS = ("integration", "security")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    folders = tuple(os.path.join(here, name) + os.sep for name in INTEGRATION_DIRS)
    for item in items:
        if str(item.path).startswith(folders):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop `VPSRELAY_*` settings and proxy variables so the host cannot steer a test.

    `VPSRELAY_REQUIRE_INTEGRATION` stays: the integration suite reads it to decide
    between skipping and failing when a binary is missing.
    """
    for name in list(os.environ):
        if (name.startswith("VPSRELAY_") and name not in KEPT) or name.lower() in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """Token server + CDN + Distribution (token auth, CDN redirect) + seeded images.

    Synchronous and session-scoped (pytest-trio only supports function-scoped async
    fixtures).  Skips (or fails with VPSRELAY_REQUIRE_INTEGRATION=1) without the binaries.
    """
    registry = require_binary("docker-registry")
    require_binary("skopeo")
    stand_in = start_hub(tmp_path_factory.mktemp("hub"), registry_binary=registry)
    try:
        yield stand_in
    finally:
        # Keep the logs for post-mortems, drop the ~600 MiB of blobs and layouts.
        stand_in.close(remove_data=True)


@pytest.fixture
def clean_hub(hub: Hub) -> Hub:
    """The session hub with its request logs cleared and the CDN un-corrupted."""
    hub.clear()
    return hub
