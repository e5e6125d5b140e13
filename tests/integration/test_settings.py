"""Issue 13, configuration: what the environment sets reaches the real `vpsrelay serve`.

A fraction of a second keeps its value on the way to the server.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import pytest

from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration


def test_a_read_timeout_under_a_second_closes_a_silent_connection(tmp_path: Path) -> None:
    # int() once made 0.5 into 0, which Hypercorn reads as "no timeout": the connection
    # then lasted until server.head_timeout (10 s).
    with RelayProcess(tmp_path, env={"VPSRELAY_SERVER__READ_TIMEOUT": "0.5"}) as relay:
        silent = socket.create_connection(("127.0.0.1", relay.port), timeout=8)
        started = time.monotonic()
        with silent:
            assert silent.recv(1) == b""  # closed by the relay, nothing sent
        waited = time.monotonic() - started
    assert 0.3 < waited < 3, f"closed after {waited:.1f} s"
