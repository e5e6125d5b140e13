"""The pebble stand-in itself: an ACME directory over verified HTTPS, a root to fetch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from tests.infra.pebble import Pebble

if TYPE_CHECKING:
    from pathlib import Path


def test_pebble_directory_and_root(tmp_path: Path) -> None:
    with Pebble(tmp_path) as pebble:
        directory = httpx.get(pebble.directory_url, verify=pebble.wfe_context()).json()
        assert "newOrder" in directory
        assert pebble.root_pem().startswith(b"-----BEGIN CERTIFICATE-----")
        first_root = pebble.root_pem()
        pebble.stop()
        pebble.start()
        assert pebble.root_pem() != first_root  # a new root at every start
