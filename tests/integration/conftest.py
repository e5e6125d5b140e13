"""Fixtures for integration tests: a session-wide Docker Hub stand-in (``hub``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from tests.infra import require_binary
from tests.infra.hub import Hub, start_hub

if TYPE_CHECKING:
    from collections.abc import Iterator


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration is an integration test, marked or not.
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here + os.sep):
            item.add_marker(pytest.mark.integration)


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
