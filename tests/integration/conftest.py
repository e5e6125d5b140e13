"""Fixtures shared by the deploy tests: one dockerd, one pebble, images built once a session."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.infra.deployhost import DeployHost, hub_ports

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.infra.hub import Hub


@pytest.fixture(scope="session")
def deploy_host(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployHost]:
    """dockerd (with the hub's front, token server and CDN forwarded in) and pebble."""
    ports = hub_ports([hub.registry_url, hub.token_url, hub.cdn_url])
    with DeployHost(tmp_path_factory.mktemp("deploy-host"), ports) as host:
        yield host
