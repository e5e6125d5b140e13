"""Issue 13, configuration: what the environment sets reaches the real `vpsrelay serve`.

A mistyped `VPSRELAY_*` variable stops the relay before it serves; a fraction of a second
keeps its value on the way to the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration


def test_serve_with_a_mistyped_variable_exits_with_one_line(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    environ |= {"PYTHONPATH": str(REPO_ROOT), "VPSRELAY_SERVER__LISEN": "127.0.0.1:0"}
    # Where the variable went unchecked, the relay would serve: the timeout ends that.
    result = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "serve", "--data-dir", str(tmp_path / "data")],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "vpsrelay: config error: VPSRELAY_SERVER__LISEN: unknown variable "
        "(did you mean 'VPSRELAY_SERVER__LISTEN'?)\n"
    )
    assert not (tmp_path / "data").exists()  # stopped before touching anything


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
