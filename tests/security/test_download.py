"""Issue 17: attacks on `/download`, the image-as-a-tar endpoint.

* A name, tag or platform that would inject a header (CR LF, quotes) or walk a path
  (`..`, encoded slashes) is refused before anything is asked upstream, and the file
  name in `Content-Disposition` is built of validated names only.
* Several ranges in one request (each would cost a blob request) are refused (416).
* More images than `download.max_images`, or a tar over `download.max_bytes`, are
  refused before the first byte, and before any layer is fetched.
* A private repository is not downloadable without the owner's credentials; a
  registry the relay does not serve is never contacted (closed world).
* A hostile upstream whose manifest lies about a layer's size, or whose layer does not
  match its digest, gets the download broken off: it never completes.
Afterwards the relay still answers: no request ends the server.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.oci import MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration]

TIMEOUT = httpx.Timeout(30.0)


@pytest.fixture(scope="module")
def relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    env = {"VPSRELAY_DOWNLOAD__MAX_IMAGES": "3"}
    with RelayProcess(
        tmp_path_factory.mktemp("relay"), "--upstream", f"docker.io={hub.registry_url}", env=env
    ) as process:
        yield process


def _alive(relay: RelayProcess) -> None:
    assert httpx.get(f"{relay.url}/healthz", timeout=TIMEOUT).status_code == 200
    assert relay.process.poll() is None


@pytest.mark.parametrize(
    "target",
    [
        "/download/alpine%0d%0aSet-Cookie:%20stolen=1",
        "/download/alpine:latest%0d%0aX-Injected:%201",
        '/download/alpine:lat"est',
        "/download?image=alpine&platform=linux/amd64%0d%0aX-Injected:%201",
        "/download/alpine?platform=linux/amd64%22%3B%20filename%3D%22evil",
        "/download/ALPINE",
        "/download/alpine:" + "t" * 200,
    ],
)
def test_no_header_injection_through_names(
    relay: RelayProcess, clean_hub: Hub, target: str
) -> None:
    response = httpx.get(f"{relay.url}{target}", timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert "set-cookie" not in response.headers
    assert "x-injected" not in response.headers
    assert "content-disposition" not in response.headers
    assert clean_hub.registry_requests() == []
    _alive(relay)


@pytest.mark.parametrize(
    "target",
    [
        "/download/../../etc/passwd",
        "/download/..%2f..%2fetc%2fpasswd",
        "/download/library/..%2fprivate/secret:1.0",
        "/download?image=../private/secret:1.0",
        "/download/alpine@sha256:..%2f..%2fx",
        "/download/alpine@sha256:" + "0" * 63,
    ],
)
def test_traversal_like_names_reach_nothing(
    relay: RelayProcess, clean_hub: Hub, target: str
) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        # As sent: no client-side normalisation of `..` or `%2f`.
        request = client.build_request("GET", f"{relay.url}/")
        request.url = request.url.copy_with(raw_path=target.encode())
        response = client.send(request)
    assert 400 <= response.status_code < 500, response.text
    assert "content-disposition" not in response.headers
    assert clean_hub.registry_requests() == []
    _alive(relay)


def test_unknown_registries_are_never_contacted(relay: RelayProcess, clean_hub: Hub) -> None:
    for name in ("evil.example.com/x:1", "169.254.169.254/latest:1", "localhost:9/x:1"):
        response = httpx.get(f"{relay.url}/download", params={"image": name}, timeout=TIMEOUT)
        assert response.status_code in (400, 404), (name, response.text)
        assert "content-disposition" not in response.headers
    assert clean_hub.registry_requests() == []
    _alive(relay)


def test_several_ranges_are_refused(relay: RelayProcess) -> None:
    url = f"{relay.url}/download/alpine:latest"
    size = int(httpx.head(url, timeout=TIMEOUT).headers["content-length"])
    ranges = ",".join(f"{n}-{n}" for n in range(0, 200, 2))
    response = httpx.get(url, headers={"range": f"bytes={ranges}"}, timeout=TIMEOUT)
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{size}"
    assert len(response.content) < 200
    past = httpx.get(url, headers={"range": f"bytes={size}-"}, timeout=TIMEOUT)
    assert past.status_code == 416
    _alive(relay)


def test_more_images_than_the_cap_are_refused_before_any_request(
    relay: RelayProcess, clean_hub: Hub
) -> None:
    params = {"image": [f"someuser/tool:{n}" for n in range(4)]}
    response = httpx.get(
        f"{relay.url}/download", params=params, headers={"accept": "application/json"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.status_code == 400
    assert "at most 3 images" in response.json()["errors"][0]["message"]
    assert clean_hub.registry_requests() == []


def test_a_tar_over_the_size_cap_is_refused_before_any_layer(
    hub: Hub, clean_hub: Hub, tmp_path: Path
) -> None:
    env = {"VPSRELAY_DOWNLOAD__MAX_BYTES": "1MiB"}
    with RelayProcess(tmp_path, "--upstream", f"docker.io={hub.registry_url}", env=env) as relay:
        response = httpx.get(f"{relay.url}/download/big:latest", timeout=TIMEOUT)
        assert response.status_code == 413, response.text
        assert "over this relay's cap" in response.text
        _alive(relay)
    # The manifest and the config were read, no layer: the CDN sent almost nothing.
    assert clean_hub.cdn.bytes_sent < 64 * 1024


def test_a_private_repository_is_refused_to_anonymous_clients(
    relay: RelayProcess, clean_hub: Hub
) -> None:
    for target in ("/download/private/secret:1.0", "/download/docker.io/private/secret:1.0"):
        response = httpx.get(f"{relay.url}{target}", timeout=TIMEOUT)
        assert response.status_code == 401, response.text
        assert b"the cake is a lie" not in response.content
        assert "application/x-tar" not in response.headers.get("content-type", "")
    assert not any(
        "/blobs/" in path for _, path in clean_hub.registry_requests() if "secret" in path
    )


# --- a hostile upstream ------------------------------------------------------------------------


def _layer(text: bytes) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("f")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return gzip.compress(raw.getvalue(), mtime=0)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Liar:
    """A registry without auth whose manifests lie: `short` says the layer is smaller
    than it is, `long` larger, and `forged` serves other bytes of the right size."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        for name, size_delta in (("short", -100), ("long", +100), ("forged", 0)):
            # Each its own layer: a verified copy in the cache would hide the forgery.
            real = _layer(random.Random(name).randbytes(300_000))  # several chunks
            self.blobs[_digest(real)] = real
            config = json.dumps({
                "architecture": "amd64", "os": "linux", "name": name,
                "rootfs": {"type": "layers", "diff_ids": [_digest(gzip.decompress(real))]},
            }).encode()  # fmt: skip
            self.blobs[_digest(config)] = config
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {
                    "mediaType": MT_OCI_CONFIG, "digest": _digest(config), "size": len(config),
                },
                "layers": [{
                    "mediaType": MT_OCI_LAYER_GZIP, "digest": _digest(real),
                    "size": len(real) + size_delta,
                }],
            }).encode()  # fmt: skip
            self.manifests[name] = manifest
        self.real = real  # the forged image's
        forged = bytearray(real)
        forged[len(forged) // 2] ^= 0xFF
        self.forged = bytes(forged)
        self.forge = False
        owner = self

        class Handler(BaseHandler):
            def do_GET(self) -> None:
                self._answer(body=True)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def _answer(self, *, body: bool) -> None:
                path = self.path.split("?")[0]
                data, kind = b"{}", "application/json"
                if "/manifests/" in path:
                    name = path.split("/")[3]
                    found = owner.manifests.get(name)
                    if found is None:
                        return self._status(404)
                    data, kind = found, MT_OCI_MANIFEST
                elif "/blobs/" in path:
                    digest = path.rsplit("/", 1)[1]
                    if digest == _digest(owner.real):
                        data = owner.forged if owner.forge else owner.real
                    elif digest in owner.blobs:
                        data = owner.blobs[digest]
                    else:
                        return self._status(404)
                    kind = "application/octet-stream"
                self.send_response(200)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(data)))
                self.send_header("docker-distribution-api-version", "registry/2.0")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _status(self, status: int) -> None:
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread: threading.Thread = serve_in_thread(self.server, "liar")
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        stop_server(self.server, self.thread)


def _download_never_completes(url: str) -> int:
    """GET `url`; asserts the body ends short of its Content-Length; the bytes received."""
    received = 0
    try:
        with httpx.stream("GET", url, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            length = int(response.headers["content-length"])
            for chunk in response.iter_raw():
                received += len(chunk)
    except httpx.RemoteProtocolError:
        pass  # the connection was broken off: what must happen
    else:
        pytest.fail(f"the download completed ({received} bytes)")
    assert received < length
    return received


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_hostile_upstream_cannot_complete_a_download(tmp_path: Path, cache: str) -> None:
    liar = Liar()
    try:
        env = {"VPSRELAY_CACHE__ENABLED": cache}
        with RelayProcess(tmp_path, "--upstream", f"docker.io={liar.url}", env=env) as relay:
            for name in ("short", "long"):
                _download_never_completes(f"{relay.url}/download/{name}:1")
                _alive(relay)
            liar.forge = True
            received = _download_never_completes(f"{relay.url}/download/forged:1")
            # The forged layer's last chunk was held back: not all of it reached the client.
            whole = httpx.head(f"{relay.url}/download/forged:1", timeout=TIMEOUT)
            assert received < int(whole.headers["content-length"]) - 1024
            _alive(relay)
            assert "bug while serving" not in relay.log_text()  # refused, not crashed
    finally:
        liar.close()


def test_downloads_hold_the_clients_stream_slots(hub: Hub, tmp_path: Path) -> None:
    """One client, one stream (`limits.streams_per_ip = 1`): while its tar streams, its
    next download is refused before the first byte, and another client is unaffected."""
    env = {
        "VPSRELAY_LIMITS__STREAMS_PER_IP": "1",
        "VPSRELAY_LIMITS__STREAM_BYTES_PER_SECOND": "4MiB",
    }
    with (
        RelayProcess(
            tmp_path, "--upstream", f"docker.io={hub.registry_url}", "--trusted-proxy",
            "127.0.0.1/32", env=env,
        ) as relay,
        httpx.stream("GET", f"{relay.url}/download/big:latest", timeout=TIMEOUT) as slow,
    ):  # fmt: skip
        assert slow.status_code == 200
        chunks = slow.iter_raw()
        received = 0
        while received < 2 * 1024 * 1024:  # into the big layer (bounded: 300 MiB)
            received += len(next(chunks))
        second = httpx.get(f"{relay.url}/download/alpine", timeout=TIMEOUT)
        assert second.status_code == 429, second.text
        other = httpx.get(
            f"{relay.url}/download/alpine", headers={"x-forwarded-for": "203.0.113.9"},
            timeout=TIMEOUT,
        )  # fmt: skip
        assert other.status_code == 200
        _alive(relay)
