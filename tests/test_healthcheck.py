"""`vpsrelay healthcheck`: the URL it probes, and its exit status against a real relay."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from vpsrelay import config
from vpsrelay.ops.healthcheck import local_url

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:5000", "http://127.0.0.1:5000/healthz"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
        ("[::]:80", "http://[::1]:80/healthz"),
        ("[::1]:5000", "http://[::1]:5000/healthz"),
        ("relay.internal:5000", "http://relay.internal:5000/healthz"),
    ],
)
def test_local_url_follows_the_first_listener(listen: str, url: str) -> None:
    settings = config.load(None, {"VPSRELAY_SERVER__LISTEN": f"{listen},127.0.0.2:1"})
    assert local_url(settings) == url


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", "healthcheck", *args],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.integration
def test_healthcheck_exit_status(tmp_path: Path) -> None:
    from tests.infra.clients import DeadPort
    from tests.infra.relay import RelayProcess

    with RelayProcess(tmp_path) as relay:
        healthy = _healthcheck(env={"VPSRELAY_SERVER__LISTEN": f"127.0.0.1:{relay.port}"})
        assert healthy.returncode == 0, healthy.stderr
        assert f"http://127.0.0.1:{relay.port}/healthz: 200 " in healthy.stdout
        assert '"status": "ok"' in healthy.stdout
        not_found = _healthcheck("--url", f"{relay.url}/nothing-here")
        assert not_found.returncode == 1
        assert " 404 " in not_found.stderr
    with DeadPort() as dead:
        refused = _healthcheck("--url", f"{dead.url}/healthz", "--timeout", "2")
    assert refused.returncode == 1
    assert "ConnectError" in refused.stderr
