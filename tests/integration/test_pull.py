"""Issue 2, end to end: real clients pull through a real `vpsrelay serve` from the Docker Hub
stand-in (Distribution with token auth, a token server, a CDN that rejects Authorization)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.clients import DeadPort
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage, BuiltIndex
from tests.infra.relay import REPO_ROOT, RelayProcess, pull_token

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
SKOPEO_TIMEOUT = 300
# These tests are about relaying: the cache (tests/integration/test_cache.py) stays out.
PASS_THROUGH = {"VPSRELAY_CACHE__ENABLED": "false"}


@pytest.fixture(scope="module")
def relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with RelayProcess(
        tmp_path_factory.mktemp("relay"),
        "--upstream",
        f"docker.io={hub.registry_url}",
        env=PASS_THROUGH,
    ) as process:
        yield process


def _registries_conf(tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors, no search registries\n")
    return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}


def skopeo_copy(
    tmp_path: Path, source: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    require_binary("skopeo")
    dest = tmp_path / "out"
    result = subprocess.run(
        [
            "skopeo", "copy", "--src-tls-verify=false", "--preserve-digests", *extra,
            f"docker://{source}", f"oci:{dest}:pulled",
        ],
        capture_output=True, text=True, timeout=SKOPEO_TIMEOUT,
        env=_registries_conf(tmp_path),
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"skopeo copy {source} failed ({result.returncode}): {result.stderr}")
    return result


def assert_blobs_pulled(tmp_path: Path, item: BuiltImage | BuiltIndex) -> None:
    """Every blob of `item` is in the pulled layout, and its bytes hash to its digest."""
    for blob in iter_blobs(item):
        path = tmp_path / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        assert f"sha256:{digest.hexdigest()}" == blob.digest
        assert path.stat().st_size == blob.size


def pulled_manifest_digest(tmp_path: Path) -> str:
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    return str(index["manifests"][0]["digest"])


def host(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


@pytest.mark.parametrize(
    ("reference", "image"),
    [
        ("library/alpine:latest", "library/alpine:latest"),
        ("alpine:latest", "library/alpine:latest"),  # official-image shorthand
        ("alpine:v2s2", "library/alpine:v2s2"),  # Docker v2 schema 2 manifest
        ("someuser/tool:1.0", "someuser/tool:1.0"),
    ],
)
def test_skopeo_pulls_byte_exact(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path, reference: str, image: str
) -> None:
    skopeo_copy(tmp_path, f"{host(relay)}/{reference}")
    item = clean_hub.images[image]
    assert isinstance(item, BuiltImage)
    assert pulled_manifest_digest(tmp_path) == item.manifest_digest
    assert_blobs_pulled(tmp_path, item)
    # The blobs came through the CDN hop, which never saw credentials.
    cdn = clean_hub.cdn.requests()
    assert cdn, "the blobs should have been fetched from the CDN"
    assert all(r.header("authorization") is None for r in cdn)
    assert all(r.method == "GET" for r in cdn)


def test_skopeo_pulls_multi_arch_index_with_all(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    skopeo_copy(tmp_path, f"{host(relay)}/multi:latest", "--all")
    index = clean_hub.images["library/multi:latest"]
    assert isinstance(index, BuiltIndex)
    assert pulled_manifest_digest(tmp_path) == index.index_digest
    assert_blobs_pulled(tmp_path, index)


def test_skopeo_pulls_by_digest(relay: RelayProcess, clean_hub: Hub, tmp_path: Path) -> None:
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    skopeo_copy(tmp_path, f"{host(relay)}/alpine@{image.manifest_digest}")
    assert_blobs_pulled(tmp_path, image)
    requests = clean_hub.wait_registry_requests(
        lambda log: any(image.manifest_digest in path for _, path in log)
    )
    assert ("GET", f"/v2/library/alpine/manifests/{image.manifest_digest}") in requests


def test_private_repository_needs_credentials(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    denied = skopeo_copy(tmp_path, f"{host(relay)}/private/secret:1.0", check=False)
    assert denied.returncode != 0
    assert "unauthorized" in denied.stderr.lower() or "denied" in denied.stderr.lower()

    user, password = clean_hub.creds
    skopeo_copy(tmp_path, f"{host(relay)}/private/secret:1.0", f"--src-creds={user}:{password}")
    image = clean_hub.images["private/secret:1.0"]
    assert isinstance(image, BuiltImage)
    assert_blobs_pulled(tmp_path, image)
    # The token server got alice's Basic credentials through the relay's /token.
    basic = [
        r
        for r in clean_hub.tokens.requests()
        if (r.header("authorization") or "").startswith("Basic ")
    ]
    assert basic
    assert any("private%2Fsecret" in r.path for r in basic)


# --- the HTTP API directly, with httpx --------------------------------------------------


def anonymous_token(relay: RelayProcess, repository: str) -> str:
    """A pull token fetched the way clients do: challenge, then the realm it names."""
    challenge = httpx.get(f"{relay.url}/v2/").headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{relay.url}/token"' in challenge
    assert 'service="registry.docker.io"' in challenge
    return pull_token(relay.url, repository)


def test_token_scope_gains_library_prefix(relay: RelayProcess, clean_hub: Hub) -> None:
    anonymous_token(relay, "alpine")
    (request,) = clean_hub.tokens.requests()
    assert "scope=repository%3Alibrary%2Falpine%3Apull" in request.path


def test_manifest_head_stays_head_and_headers_pass(relay: RelayProcess, clean_hub: Hub) -> None:
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    token = anonymous_token(relay, "alpine")
    clean_hub.clear_registry_requests()
    response = httpx.head(
        f"{relay.url}/v2/alpine/manifests/latest",
        headers={"authorization": f"Bearer {token}", "accept": image.manifest_media_type},
    )
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == image.manifest_digest
    assert response.headers["content-type"] == image.manifest_media_type
    assert int(response.headers["content-length"]) == len(image.manifest_bytes)
    requests = clean_hub.wait_registry_requests(lambda log: bool(log))
    assert requests == [("HEAD", "/v2/library/alpine/manifests/latest")]


def test_range_through_the_redirect_hop(relay: RelayProcess, clean_hub: Hub) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    token = anonymous_token(relay, "big")
    start, end = 1_000_003, 1_065_538
    response = httpx.get(
        f"{relay.url}/v2/big/blobs/{layer.digest}",
        headers={"authorization": f"Bearer {token}", "range": f"bytes={start}-{end}"},
    )
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {start}-{end}/{layer.size}"
    blob_file = image.layout / "blobs" / "sha256" / layer.digest.removeprefix("sha256:")
    with blob_file.open("rb") as f:
        f.seek(start)
        assert response.content == f.read(end - start + 1)
    (cdn_request,) = clean_hub.cdn.requests()
    assert cdn_request.header("range") == f"bytes={start}-{end}"
    assert cdn_request.header("authorization") is None


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "path",
    [
        "/v2/alpine/manifests/latest",
        "/v2/alpine/blobs/uploads/",
        f"/v2/alpine/blobs/sha256:{'a' * 64}",
    ],
)
def test_writes_are_refused_and_reach_no_upstream(
    relay: RelayProcess, clean_hub: Hub, method: str, path: str
) -> None:
    response = httpx.request(method, f"{relay.url}{path}", content=b"{}")
    assert response.status_code == 405
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert clean_hub.registry_requests() == []
    assert clean_hub.tokens.requests() == []


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Alpine/manifests/latest", "NAME_INVALID"),
        ("/v2/a..b/manifests/latest", "NAME_INVALID"),
        ("/v2/alpine/blobs/sha256:..%2Fx", "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:zz", "DIGEST_INVALID"),
    ],
)
def test_malformed_names_get_400_and_reach_no_upstream(
    relay: RelayProcess, clean_hub: Hub, path: str, code: str
) -> None:
    response = httpx.get(f"{relay.url}{path}")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == code
    assert clean_hub.registry_requests() == []


@pytest.mark.parametrize("tag", ["-bad-tag", ".hidden", "a" * 129])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_malformed_tag_is_404_manifest_unknown_and_reaches_no_upstream(
    relay: RelayProcess, clean_hub: Hub, method: str, tag: str
) -> None:
    # distribution-spec: a nonexistent manifest is 404 MANIFEST_UNKNOWN; a malformed tag
    # can name none, so the relay answers that itself.
    response = httpx.request(method, f"{relay.url}/v2/alpine/manifests/{tag}")
    assert response.status_code == 404
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    if method == "GET":
        assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert clean_hub.registry_requests() == []
    assert clean_hub.tokens.requests() == []


@pytest.mark.parametrize("path", ["/v2/", "/v2/alpine/manifests/latest"])
def test_relayed_401_carries_the_api_version_header_once(
    relay: RelayProcess, clean_hub: Hub, path: str
) -> None:
    # Distribution sends its own Docker-Distribution-API-Version on the 401: the client
    # gets one, not the upstream's and the relay's.
    response = httpx.get(f"{relay.url}{path}")
    assert response.status_code == 401
    assert response.headers.get_list("docker-distribution-api-version") == ["registry/2.0"]
    assert clean_hub.registry_requests(), "the 401 came from the upstream"


def test_unknown_path_is_404(relay: RelayProcess, clean_hub: Hub) -> None:
    response = httpx.get(f"{relay.url}/v1/repositories/x")
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert clean_hub.registry_requests() == []


def test_tags_list_pagination_link_points_at_the_relay(relay: RelayProcess, clean_hub: Hub) -> None:
    token = anonymous_token(relay, "paged")
    auth = {"authorization": f"Bearer {token}"}
    seen: list[str] = []
    url: str | None = f"{relay.url}/v2/paged/tags/list?n=2"
    for _ in range(10):  # bounded: five tags, two a page
        if url is None:
            break
        response = httpx.get(url, headers=auth)
        assert response.status_code == 200
        seen += response.json()["tags"]
        link = response.headers.get("link")
        if link is None:
            url = None
        else:
            assert link.startswith("</v2/paged/tags/list?"), link
            url = relay.url + link[1 : link.index(">")]
    assert seen == ["t01", "t02", "t03", "t04", "t05"]


def test_upstream_401_passes_with_realm_rewritten(relay: RelayProcess, clean_hub: Hub) -> None:
    response = httpx.get(f"{relay.url}/v2/private/secret/manifests/1.0")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = response.headers["www-authenticate"]
    assert f'realm="{relay.url}/token"' in challenge
    assert clean_hub.token_url not in challenge


def test_upstream_down_is_502_with_oci_body(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(tmp_path, "--upstream", f"docker.io={dead.url}") as relay:
        for path in ("/v2/", "/v2/alpine/manifests/latest", "/token?scope=repository:alpine:pull"):
            response = httpx.get(f"{relay.url}{path}")
            assert response.status_code == 502
            error = response.json()["errors"][0]
            assert error["code"] == "UNAVAILABLE"
            assert "Traceback" not in response.text
            assert dead.address not in response.text
        assert "Traceback" not in relay.log_text()


# --- streaming: memory, backpressure, disconnects ------------------------------------------


def _big_layer(hub: Hub) -> tuple[BuiltImage, str, int]:
    image = hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    assert layer.size >= 256 * 1024 * 1024
    return image, layer.digest, layer.size


def test_large_layer_streams_in_bounded_memory(clean_hub: Hub, tmp_path: Path) -> None:
    """300 MiB through a fresh relay: byte-exact, and its peak RSS grows by under 64 MiB."""
    _, digest, size = _big_layer(clean_hub)
    with RelayProcess(
        tmp_path, "--upstream", f"docker.io={clean_hub.registry_url}", env=PASS_THROUGH
    ) as relay:
        token = anonymous_token(relay, "big")
        before = relay.peak_rss_bytes()
        sha = hashlib.sha256()
        received = 0
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/big/blobs/{digest}",
            headers={"authorization": f"Bearer {token}"},
        ) as response:
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == size
            for chunk in response.iter_raw(1 << 20):
                sha.update(chunk)
                received += len(chunk)
        growth = relay.peak_rss_bytes() - before
    assert received == size
    assert f"sha256:{sha.hexdigest()}" == digest
    assert growth < 64 * 1024 * 1024, f"relay peak RSS grew by {growth / 2**20:.1f} MiB"


def test_client_disconnect_mid_blob_stops_the_upstream(clean_hub: Hub, tmp_path: Path) -> None:
    """A client that reads 8 MiB and leaves: the CDN stops sending long before the end."""
    _, digest, size = _big_layer(clean_hub)
    with RelayProcess(
        tmp_path, "--upstream", f"docker.io={clean_hub.registry_url}", env=PASS_THROUGH
    ) as relay:
        token = anonymous_token(relay, "big")
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/big/blobs/{digest}",
            headers={"authorization": f"Bearer {token}"},
        ) as response:
            read = 0
            for chunk in response.iter_raw(1 << 16):
                read += len(chunk)
                if read >= 8 * 1024 * 1024:
                    break
        # Bounded wait until the CDN's byte count settles (its connection was closed).
        settled = _wait_settled(lambda: clean_hub.cdn.bytes_sent)
        assert settled < size // 2, f"CDN sent {settled} of {size} bytes after the client left"
        log = _wait_for(relay.log_text, lambda text: "disconnected=true" in text)
        assert "disconnected=true" in log


def test_slow_client_slows_the_upstream(clean_hub: Hub, tmp_path: Path) -> None:
    """Backpressure: while the client reads nothing, the relay stops pulling from the CDN."""
    _, digest, size = _big_layer(clean_hub)
    with RelayProcess(
        tmp_path, "--upstream", f"docker.io={clean_hub.registry_url}", env=PASS_THROUGH
    ) as relay:
        token = anonymous_token(relay, "big")
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/big/blobs/{digest}",
            headers={"authorization": f"Bearer {token}"},
        ) as response:
            chunks = response.iter_raw(1 << 16)
            first = next(chunks)
            paused_at = _wait_settled(lambda: clean_hub.cdn.bytes_sent)
            # Socket buffers on both hops hold a few MiB at most; the rest waits for us.
            assert paused_at < 64 * 1024 * 1024, paused_at
            received = len(first) + sum(len(chunk) for chunk in chunks)
        assert received == size


def _wait_settled(read: Callable[[], int], *, quiet: float = 1.0, limit: float = 30.0) -> int:
    """Poll `read` until it has not changed for `quiet` seconds (bounded by `limit`)."""
    deadline = time.monotonic() + limit
    value, since = read(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = read()
        if current != value:
            value, since = current, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return value
    raise AssertionError(f"value kept changing for {limit}s (last {value})")


def _wait_for(read: Callable[[], str], done: Callable[[str], bool], limit: float = 10.0) -> str:
    deadline = time.monotonic() + limit
    text = read()
    while not done(text) and time.monotonic() < deadline:
        time.sleep(0.05)
        text = read()
    return text


def test_healthz_answers_without_upstream(tmp_path: Path) -> None:
    with DeadPort() as dead, RelayProcess(tmp_path, "--upstream", f"docker.io={dead.url}") as relay:
        response = httpx.get(f"{relay.url}/healthz")
        assert response.status_code == 200
        assert response.json()["status"] == "ok"


def test_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "vpsrelay", "serve", "--listen", f"127.0.0.1:{port}",
             "--upstream", "docker.io=http://127.0.0.1:9", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "vpsrelay: cannot serve: [Errno 98] Address already in use" in result.stderr
