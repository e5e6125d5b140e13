"""HTTP/2 through the relay with curl: h2c (prior knowledge) and h2 over the relay's own TLS.

The bytes of a 256+ MiB layer arrive exact (the DATA frames `hypercorn_patches` packs into
one write, and the end of a finished stream that must not be reset), pass-through and
from the cache; and a body the relay stops (a corrupted upstream blob) ends at once with
a stream reset instead of hanging until the connection idles out.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import time
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from tests.infra import require_binary
from tests.infra.relay import RelayProcess, pull_token
from tests.integration.test_cache import push_unique
from tests.integration.test_pull import _big_layer
from tests.security.wire import make_pki

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
CURL_LIMIT = 180  # seconds for one transfer; a hang is a failure, not a stuck suite
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("h2-pki"))


def _relay(tmp: Path, hub: Hub, pki: dict[str, Path], *, cache: bool) -> RelayProcess:
    return RelayProcess(
        tmp,
        "--upstream", f"docker.io={hub.registry_url}",
        "--cert", str(pki["cert"]), "--key", str(pki["key"]),
        "--https-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
        env={"VPSRELAY_CACHE__ENABLED": "true" if cache else "false"},
    )  # fmt: skip


@pytest.fixture
def relays(
    clean_hub: Hub, tmp_path: Path, pki: dict[str, Path]
) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    require_binary("curl")
    with (
        _relay(tmp_path / "pass", clean_hub, pki, cache=False) as passing,
        _relay(tmp_path / "cache", clean_hub, pki, cache=True) as caching,
    ):
        yield passing, caching


def urls(relay: RelayProcess) -> tuple[str, str]:
    """(`--listen`: HTTP/1.1 and h2c, `--https-listen`: h2 by ALPN); the `--http-listen`
    port only redirects and is not among the logged `listening on` URLs."""
    plain = next(u for u in relay.urls if u.startswith("http://"))
    secure = next(u for u in relay.urls if u.startswith("https://"))
    return plain, secure


def token(relay: RelayProcess, repository: str) -> str:
    return pull_token(urls(relay)[0], repository)


def curl(url: str, flag: str, bearer: str, ca: Path, *extra: str) -> tuple[int, str, int, str, str]:
    """GET with curl; (exit code, sha256 of the body, its size, HTTP version, stderr)."""
    command = [
        "curl", "-sS", flag, *extra, "--cacert", str(ca), "--max-time", str(CURL_LIMIT),
        "-H", f"Authorization: Bearer {bearer}", "-w", "%{stderr}%{http_version}\n", url,
    ]  # fmt: skip
    sha, size = hashlib.sha256(), 0
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        while chunk := process.stdout.read(MiB):
            sha.update(chunk)
            size += len(chunk)
        stderr = process.stderr.read().decode(errors="replace")
    lines = stderr.strip().splitlines()
    version = lines[-1] if lines else ""
    return process.returncode, f"sha256:{sha.hexdigest()}", size, version, stderr


def test_large_blob_is_byte_exact_over_h2c_and_h2(
    relays: tuple[RelayProcess, RelayProcess], clean_hub: Hub, pki: dict[str, Path]
) -> None:
    """Pass-through over h2c and h2+TLS, then a fill and a hit over h2+TLS and h2c."""
    _, digest, size = _big_layer(clean_hub)
    passing, caching = relays
    for relay, label in ((passing, "pass"), (caching, "miss"), (caching, "hit")):
        if label == "hit":
            # The fill commits (fsync, rename) just after its last byte went out: until then
            # a request joins the fill instead of hitting the file.
            stored = relay.workdir / "data/blobs/sha256" / digest[7:9] / digest[7:]
            deadline = time.monotonic() + 30
            while not stored.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stored.exists(), "the fill was never committed"
        plain, secure = urls(relay)
        bearer = token(relay, "big")
        path = f"/v2/big/blobs/{digest}"
        cases = [(secure, "--http2")]
        if label != "miss":  # the fill once, then everything else from the cache
            cases.append((plain, "--http2-prior-knowledge"))
        for base, flag in cases:
            code, got, received, version, stderr = curl(base + path, flag, bearer, pki["ca"])
            assert code == 0, f"{label} {flag}: curl {code}: {stderr}"
            assert version == "2", f"{label} {flag}: HTTP/{version}"
            assert received == size, f"{label} {flag}: {received} of {size} bytes"
            assert got == digest, f"{label} {flag}: wrong bytes"
    # The access line is written after the last frame went out: curl may finish first.
    deadline = time.monotonic() + 10
    while "cache=hit" not in caching.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "cache=hit" in caching.log_text()
    assert "Traceback" not in passing.log_text() + caching.log_text()


def test_finished_stream_ends_cleanly_for_httpx(
    relays: tuple[RelayProcess, RelayProcess],
    clean_hub: Hub,
    pki: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The app returns while the last frames still wait to be written: the stream must
    end with END_STREAM, not a reset. curl takes a reset after Content-Length bytes as
    success; httpx (h2) reports it, so it is the client here."""
    image = push_unique(clean_hub, tmp_path, "someuser/h2end", 6 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    for relay in relays:
        plain, secure = urls(relay)
        bearer = token(relay, "someuser/h2end")
        for base in (secure, plain):
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            with httpx.Client(http1=False, http2=True, verify=context) as client:
                for _ in range(3):  # the second and third are hits on the caching relay
                    sha = hashlib.sha256()
                    with client.stream(
                        "GET",
                        f"{base}/v2/someuser/h2end/blobs/{layer.digest}",
                        headers={"authorization": f"Bearer {bearer}"},
                    ) as response:
                        assert response.http_version == "HTTP/2"
                        assert response.status_code == 200
                        for chunk in response.iter_raw():
                            sha.update(chunk)
                    assert f"sha256:{sha.hexdigest()}" == layer.digest


def test_stopped_body_is_reset_at_once_over_h2(
    relays: tuple[RelayProcess, RelayProcess],
    clean_hub: Hub,
    pki: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A corrupted upstream blob: the relay stops the body before its last bytes and the
    HTTP/2 stream is reset (curl reports it), not left open until the idle timeout."""
    image = push_unique(clean_hub, tmp_path, "someuser/h2reset", 24 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    clean_hub.cdn.corrupt = True
    for relay in relays:
        plain, secure = urls(relay)
        bearer = token(relay, "someuser/h2reset")
        for base, flag in ((secure, "--http2"), (plain, "--http2-prior-knowledge")):
            began = time.monotonic()
            code, got, received, _, stderr = curl(
                f"{base}/v2/someuser/h2reset/blobs/{layer.digest}", flag, bearer, pki["ca"]
            )
            took = time.monotonic() - began
            assert code not in (0, 28), f"{flag}: curl {code} after {took:.1f}s: {stderr}"
            assert took < 30, f"{flag}: the stream was not reset, curl waited {took:.1f}s"
            assert received < layer.size
            assert got != layer.digest
            assert "INTERNAL_ERROR" in stderr or "not closed cleanly" in stderr, stderr


def _h2c_get_without_window_updates(
    sock: socket.socket, authority: str, path: str, bearer: str, want: int
) -> int:
    """Open an h2c stream with the default 65,535-byte window and read `want` bytes of it,
    never sending a WINDOW_UPDATE: the relay must wait, not buffer the rest of the body.
    Returns the bytes received; the connection stays open."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [(":method", "GET"), (":path", path), (":scheme", "http"),
         (":authority", authority), ("authorization", f"Bearer {bearer}")],
        end_stream=True,
    )  # fmt: skip
    sock.sendall(client.data_to_send())
    received = 0
    deadline = time.monotonic() + 10
    while received < want and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)  # not acknowledged: the window stays shut
        sock.sendall(client.data_to_send())  # SETTINGS acks only
    return received


def test_a_client_that_does_not_open_its_window_costs_no_memory(
    relays: tuple[RelayProcess, RelayProcess], clean_hub: Hub, tmp_path: Path
) -> None:
    """An HTTP/2 client that takes the first 64 KiB of a 96 MiB layer and never opens its
    window: the relay holds at most a chunk or two of it (Hypercorn buffered one more
    1 MiB chunk per send pass, so the whole layer ended up in memory)."""
    image = push_unique(clean_hub, tmp_path, "someuser/h2window", 96 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    for relay in relays:  # pass-through, then a cache hit
        plain, _ = urls(relay)
        bearer = token(relay, "someuser/h2window")
        path = f"/v2/someuser/h2window/blobs/{layer.digest}"
        if relay is relays[1]:  # fill the cache first: the file is the fastest producer
            response = httpx.get(plain + path, headers={"authorization": f"Bearer {bearer}"})
            assert response.status_code == 200
        authority = plain.removeprefix("http://")
        host, _, port = authority.partition(":")
        before = relay.rss_bytes()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            received = _h2c_get_without_window_updates(sock, authority, path, bearer, 65535)
            assert received == 65535
            time.sleep(2.0)  # the app would push the rest meanwhile
            grown = relay.rss_bytes() - before
        assert grown < 24 * MiB, f"the relay buffered {grown / MiB:.0f} MiB for a shut window"
