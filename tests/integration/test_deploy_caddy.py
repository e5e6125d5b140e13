"""Issue 7: the shipped Caddyfile.alt in front of the relay, with Debian's Caddy.

Caddy gets its certificate for `relay.test` from pebble (tls-alpn-01 on its https_port; pebble's
DNS answers 127.0.0.1 for every name). The test-only global options (ACME CA, ports, storage,
loopback bind) come in through the `import` the Caddyfile offers for site-local globals; the
site block is the shipped one. skopeo runs in a private mount namespace whose /etc/hosts names
`relay.test` (and whose resolver is a dead loopback address), so no name leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage
from tests.infra.pebble import Pebble, free_port
from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
NAME = "relay.test"
CHUNK = 1 << 20


class Front:
    def __init__(self, relay: RelayProcess, caddy: subprocess.Popen[bytes], port: int, ca: Path):
        self.relay = relay
        self.caddy = caddy
        self.port = port
        self.ca = ca
        self.public = f"https://{NAME}:{port}"

    def client(self) -> httpx.Client:
        """HTTP/2 to Caddy on 127.0.0.1, with SNI, Host and verification for relay.test."""
        return httpx.Client(
            http2=True,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            timeout=60,
            trust_env=False,
            base_url=f"https://127.0.0.1:{self.port}",
            headers={"host": f"{NAME}:{self.port}"},
        )

    def get(self, client: httpx.Client, path: str, **kwargs: object) -> httpx.Response:
        return client.get(path, extensions={"sni_hostname": NAME}, **kwargs)  # type: ignore[arg-type]


def _wait_for_certificate(caddy: subprocess.Popen[bytes], log: Path, port: int, ca: Path) -> None:
    deadline = time.monotonic() + 60
    last: Exception | None = None
    context = ssl.create_default_context(cafile=str(ca))
    while time.monotonic() < deadline:
        if caddy.poll() is not None:
            raise RuntimeError(f"caddy exited:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with httpx.Client(verify=context, timeout=5, trust_env=False) as client:
                client.get(
                    f"https://127.0.0.1:{port}/healthz",
                    headers={"host": NAME},
                    extensions={"sni_hostname": NAME},
                )
                return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"no certificate: {last}\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def front(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    caddy_bin = require_binary("caddy")
    workdir = tmp_path_factory.mktemp("caddy")
    http_port, https_port = free_port(), free_port()
    with (
        Pebble(workdir / "pebble", http_port=http_port, tls_port=https_port) as pebble,
        RelayProcess(
            workdir / "relay",
            "--upstream", f"docker.io={hub.registry_url}",
            "--trusted-proxy", "127.0.0.1/32",
        ) as relay,
    ):  # fmt: skip
        globals_file = workdir / "test-globals.caddy"
        globals_file.write_text(
            f"admin 127.0.0.1:{free_port()}\n"
            f"http_port {http_port}\n"
            f"https_port {https_port}\n"
            "default_bind 127.0.0.1\n"
            "skip_install_trust\n"
            f"storage file_system {workdir / 'caddy-data'}\n"
            f"acme_ca {pebble.directory_url}\n"
            f"acme_ca_root {pebble.wfe_ca}\n"
            "grace_period 1s\n"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("VPSRELAY_", "CADDY"))},
            "XDG_DATA_HOME": str(workdir / "xdg-data"),
            "XDG_CONFIG_HOME": str(workdir / "xdg-config"),
            "VPSRELAY_DOMAIN": NAME,
            "VPSRELAY_EMAIL": "ops@relay.test",
            "VPSRELAY_UPSTREAM": f"h2c://127.0.0.1:{relay.port}",
            "VPSRELAY_CADDY_GLOBALS": str(globals_file),
        }
        log = workdir / "caddy.log"
        with log.open("wb") as out:
            caddy = subprocess.Popen(
                [caddy_bin, "run", "--config", str(REPO_ROOT / "Caddyfile.alt"),
                 "--adapter", "caddyfile"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        try:
            # The certificate chains to pebble's issuing root (new at every pebble start).
            ca = pebble.write_root(workdir / "pebble-root.pem")
            _wait_for_certificate(caddy, log, https_port, ca)
            yield Front(relay, caddy, https_port, ca)
        finally:
            caddy.terminate()
            try:
                caddy.wait(10)
            except subprocess.TimeoutExpired:
                caddy.kill()
                caddy.wait(5)


def _skopeo_via_hosts(front: Front, tmp_path: Path, ref: str) -> subprocess.CompletedProcess[str]:
    """skopeo with /etc/hosts (relay.test -> 127.0.0.1) and resolv.conf (a dead loopback
    resolver) bind-mounted in a private mount namespace; TLS verified against pebble's root."""
    skopeo = require_binary("skopeo")
    unshare = require_binary("unshare")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost {NAME}\n")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(front.ca, certs / "ca.crt")
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors, no search registries\n")
    script = (
        'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"'
    )
    return subprocess.run(
        [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         str(hosts), str(resolv),
         skopeo, "copy", "--src-cert-dir", str(certs), "--preserve-digests",
         f"docker://{NAME}:{front.port}/{ref}", f"oci:{tmp_path / 'out'}:pulled"],
        capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
    )  # fmt: skip


def test_realm_points_at_caddys_public_name(front: Front) -> None:
    with front.client() as client:
        response = front.get(client, "/v2/")
    assert response.status_code == 401
    assert response.http_version == "HTTP/2"
    challenge = response.headers["www-authenticate"]
    assert f'realm="{front.public}/token"' in challenge, challenge


def test_skopeo_pulls_through_caddy_over_https(
    front: Front, clean_hub: Hub, tmp_path: Path
) -> None:
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    _skopeo_via_hosts(front, tmp_path, "library/alpine:latest")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for blob in iter_blobs(image):
        path = tmp_path / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == blob.digest.split(":")[1]
    # The relay saw Caddy's forwarded client address (the trusted proxy). Its access-log
    # line is written after the answer, so it may land just after skopeo is done.
    line = 'path="/v2/library/alpine/manifests/latest"'
    deadline = time.monotonic() + 10
    while line not in front.relay.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert line in front.relay.log_text()


def _caddy_rss_peak(caddy: subprocess.Popen[bytes]) -> int:
    for line in Path(f"/proc/{caddy.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def test_a_large_layer_streams_through_caddy_unbuffered(front: Front, clean_hub: Hub) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    assert layer.size >= 256 * CHUNK
    blob_path = f"/v2/library/big/blobs/{layer.digest}"
    with front.client() as client:
        token = front.get(
            client,
            "/token",
            params={"service": "registry.docker.io", "scope": "repository:library/big:pull"},
        ).json()["token"]
        digest = hashlib.sha256()
        received = 0
        request = client.build_request(
            "GET", blob_path, headers={"authorization": f"Bearer {token}"},
            extensions={"sni_hostname": NAME},
        )  # fmt: skip
        response = client.send(request, stream=True)
        try:
            assert response.status_code == 200
            assert response.http_version == "HTTP/2"
            chunks = response.iter_bytes(CHUNK)
            for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
                if received >= 4 * CHUNK:
                    break
            # The first MiBs are here while the relay is still sending: had Caddy buffered
            # the response, the relay would have finished (and logged) it before any byte.
            time.sleep(0.5)
            assert f'path="{blob_path}"' not in front.relay.log_text()
            for chunk in chunks:
                digest.update(chunk)
                received += len(chunk)
        finally:
            response.close()
    assert received == layer.size
    assert f"sha256:{digest.hexdigest()}" == layer.digest
    peak = _caddy_rss_peak(front.caddy)
    print(f"caddy peak RSS after streaming {layer.size >> 20} MiB: {peak >> 20} MiB")
    assert peak < 150 * CHUNK, peak
