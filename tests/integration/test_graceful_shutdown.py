"""SIGTERM (docker stop, systemctl stop): stop accepting, let in-flight pulls finish up to
`server.graceful_timeout`, then exit 0."""

from __future__ import annotations

import hashlib
import signal
import socket
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
CHUNK = 1 << 20


def _refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _wait(predicate: object, timeout: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_in_flight_pull_finishes_after_sigterm(clean_hub: Hub, tmp_path: Path) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    with RelayProcess(tmp_path, "--upstream", f"docker.io={clean_hub.registry_url}") as relay:
        token = pull_token(relay.url, "big")
        digest = hashlib.sha256()
        received = 0
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/big/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes(CHUNK)
            for chunk in chunks:  # a few MiB in, then the stop signal
                digest.update(chunk)
                received += len(chunk)
                if received >= 8 * CHUNK:
                    break
            relay.process.send_signal(signal.SIGTERM)
            # New connections are refused at once, while this pull is still running ...
            assert _wait(lambda: _refuses_connections(relay.port), 5)
            assert relay.process.poll() is None
            for chunk in chunks:  # ... and it completes.
                digest.update(chunk)
                received += len(chunk)
        assert received == layer.size
        assert f"sha256:{digest.hexdigest()}" == layer.digest
        assert relay.process.wait(15) == 0
    log = relay.log_text()
    assert "received SIGTERM, stopping" in log
    assert f'path="/v2/big/blobs/{layer.digest}" status=200 bytes={layer.size}' in log


def test_grace_period_ends_a_stalled_pull(clean_hub: Hub, tmp_path: Path) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    grace = 2.0
    with RelayProcess(
        tmp_path,
        "--upstream",
        f"docker.io={clean_hub.registry_url}",
        env={"VPSRELAY_SERVER__GRACEFUL_TIMEOUT": str(grace)},
    ) as relay:
        token = pull_token(relay.url, "big")
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/big/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes(CHUNK)  # held: dropping it would close the response
            next(chunks)
            # The client stops reading: the pull cannot finish on its own.
            began = time.monotonic()
            relay.process.send_signal(signal.SIGTERM)
            assert relay.process.wait(grace + 10) == 0
            elapsed = time.monotonic() - began
            assert relay.log_text().count("vpsrelay.access") == 1  # only /token: blob cut off
    assert grace - 0.5 <= elapsed <= grace + 5, elapsed
    assert "grace period of 2s is over and a client still holds a response" in relay.log_text()
