"""The real `vpsrelay serve` on a Hypercorn that reports another version (a fake
distribution ahead of the real one on its path, as an unpinned `pip install` would leave):
it refuses to start with one line; with `--allow-unpatched` it serves, degraded, and says
so in /readyz."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.integration


def path_with_fake_hypercorn(directory: Path, version: str) -> str:
    """A PYTHONPATH whose first entry holds a `hypercorn` distribution of `version`: its
    metadata is found before the installed one's, its code is still the installed one."""
    info = directory / f"hypercorn-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hypercorn\nVersion: {version}\n")
    return os.pathsep.join([str(directory), str(REPO_ROOT)])


class _Answers(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    """A registry stand-in that answers `/v2/`, so that /readyz can be ready."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_another_hypercorn_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = path_with_fake_hypercorn(tmp_path / "site", "0.19.0")
    result = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "serve", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--upstream", "docker.io=http://127.0.0.1:9"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("vpsrelay: cannot serve: hypercorn 0.19.0 is installed, ")
    assert "needs hypercorn==0.18.0" in last_line
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stderr


def test_allow_unpatched_serves_degraded_and_readyz_says_so(tmp_path: Path, upstream: str) -> None:
    env = {"PYTHONPATH": path_with_fake_hypercorn(tmp_path / "site", "0.19.0")}
    with RelayProcess(
        tmp_path / "relay", "--allow-unpatched", "--upstream", f"docker.io={upstream}", env=env
    ) as relay:
        ready = httpx.get(f"{relay.url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "degraded"
        assert body["checks"]["patches"] == "degraded: without hypercorn"
        [entry] = body["degraded"]
        assert entry["reach"] == "hypercorn"
        assert entry["kind"] == "safety"
        assert entry["detail"].startswith("hypercorn 0.19.0 is installed")
        assert "running without the HTTP/2 buffer bound" in relay.log_text()
