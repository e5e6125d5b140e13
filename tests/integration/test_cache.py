"""Issue 6, end to end: the verified blob cache between real clients and the hub stand-in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.hub import start_hub
from tests.infra.oci import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Blob,
    BuiltImage,
    BuiltIndex,
    build_image,
)
from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.tmpfs import fill_up, mounted_tmpfs
from tests.integration.test_pull import (
    anonymous_token,
    assert_blobs_pulled,
    pulled_manifest_digest,
    skopeo_copy,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def host(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


def start_relay(tmp: Path, hub: Hub, *args: str, **env: str) -> RelayProcess:
    variables = {f"VPSRELAY_CACHE__{key.upper()}": value for key, value in env.items()}
    return RelayProcess(tmp, "--upstream", f"docker.io={hub.registry_url}", *args, env=variables)


def push_unique(hub: Hub, tmp: Path, repo: str, layer_bytes: int, tag: str = "1") -> BuiltImage:
    """A fresh image (its own random layer) pushed as `repo:tag`: never cached yet."""
    marker = uuid.uuid4().hex
    image = build_image(
        tmp / f"oci-{marker}",
        tag,
        files={"etc/marker": marker.encode()},
        extra_layer_bytes=layer_bytes,
    )
    hub.push_image(image, f"{repo}:{tag}")
    return image


def sub(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def blob_file(image: BuiltImage, digest: str) -> Path:
    return image.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def cached_files(relay_dir: Path) -> dict[str, int]:
    base = relay_dir / "data" / "blobs" / "sha256"
    return {f"sha256:{p.name}": p.stat().st_size for p in base.glob("*/*") if p.is_file()}


def blob_gets(requests: list[tuple[str, str]], digest: str) -> int:
    return sum(1 for method, path in requests if method == "GET" and path.endswith(digest))


def wait_until(check: Callable[[], bool], limit: float = 10.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.fixture
def relay(clean_hub: Hub, tmp_path: Path) -> Iterator[RelayProcess]:
    with start_relay(tmp_path / "relay", clean_hub) as process:
        yield process


def test_concurrent_pulls_fetch_each_blob_once(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    """N=10 skopeo pulls of one uncached image at once: byte-exact, one upstream fetch a blob."""
    image = push_unique(clean_hub, tmp_path, "someuser/concurrent", 24 * MiB)
    clean_hub.clear()
    clean_hub.cdn.chunk_delay = 0.002  # ~100 MiB/s: the pulls overlap the fills

    def pull(i: int) -> None:
        out = tmp_path / f"client{i}"
        out.mkdir()
        skopeo_copy(out, f"{host(relay)}/someuser/concurrent:1")
        assert pulled_manifest_digest(out) == image.manifest_digest
        assert_blobs_pulled(out, image)

    with ThreadPoolExecutor(max_workers=10) as pool:
        list(pool.map(pull, range(10)))
    blobs = [image.config, *image.layers]
    requests = clean_hub.wait_registry_requests(
        lambda log: all(blob_gets(log, b.digest) >= 1 for b in blobs)
    )
    for blob in blobs:
        assert blob_gets(requests, blob.digest) == 1, blob
        cdn_gets = [r for r in clean_hub.cdn.requests() if blob.digest[7:] in r.path]
        assert len(cdn_gets) == 1, blob
    assert clean_hub.cdn.bytes_sent == sum(b.size for b in blobs)
    db = sqlite3.connect(relay.workdir / "data" / "cache.db")
    relay.close()  # flushes the counters
    counters = dict(db.execute("SELECT name, value FROM counters"))
    assert counters.get("joins", 0) > 0


def test_corrupted_blob_fails_and_is_not_committed(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/corrupt", 2 * MiB)
    layer = max(image.layers, key=lambda b: b.size)
    clean_hub.clear()
    clean_hub.cdn.corrupt = True
    failed = skopeo_copy(sub(tmp_path / "bad"), f"{host(relay)}/someuser/corrupt:1", check=False)
    assert failed.returncode != 0
    assert "digest" in failed.stderr.lower() or "unexpected eof" in failed.stderr.lower(), (
        failed.stderr
    )
    assert layer.digest not in cached_files(relay.workdir)
    assert not list((relay.workdir / "data" / "tmp").iterdir())
    assert wait_until(lambda: "digest mismatch, not cached" in relay.log_text())

    clean_hub.cdn.corrupt = False
    skopeo_copy(sub(tmp_path / "good"), f"{host(relay)}/someuser/corrupt:1")
    assert_blobs_pulled(tmp_path / "good", image)
    assert cached_files(relay.workdir)[layer.digest] == layer.size
    stored = relay.workdir / "data/blobs/sha256" / layer.digest[7:9] / layer.digest[7:]
    assert sha256_file(stored) == layer.digest


def test_sigkill_mid_fill_leaves_nothing_servable(clean_hub: Hub, tmp_path: Path) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/crash", 48 * MiB)
    layer = max(image.layers, key=lambda b: b.size)
    clean_hub.clear()
    clean_hub.cdn.chunk_delay = 0.02  # 12 MiB/s: the fill is surely unfinished after 1 s
    workdir = tmp_path / "relay"
    first = start_relay(workdir, clean_hub)
    token = anonymous_token(first, "someuser/crash")
    auth = {"authorization": f"Bearer {token}"}
    with httpx.stream(
        "GET", f"{first.url}/v2/someuser/crash/blobs/{layer.digest}", headers=auth
    ) as r:
        assert r.status_code == 200
        got = 0
        for chunk in r.iter_raw(1 << 16):
            got += len(chunk)
            if got >= 2 * MiB:
                break
        first.close(sig=signal.SIGKILL)
    partial = list((workdir / "data" / "tmp").iterdir())
    assert partial, "the fill should have left a partial file behind"
    assert layer.digest not in cached_files(workdir)

    clean_hub.clear()
    with start_relay(tmp_path / "again", clean_hub, "--data-dir", str(workdir / "data")) as second:
        assert not list((workdir / "data" / "tmp").iterdir())
        token = anonymous_token(second, "someuser/crash")
        response = httpx.get(
            f"{second.url}/v2/someuser/crash/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert response.status_code == 200
        assert response.headers["x-vpsrelay-cache"] == "miss"
        assert f"sha256:{hashlib.sha256(response.content).hexdigest()}" == layer.digest
        # Fetched again, whole (the first relay's connection may count one last chunk).
        gets = [r for r in clean_hub.cdn.requests() if layer.digest[7:] in r.path]
        assert len(gets) == 1
        assert layer.size <= clean_hub.cdn.bytes_sent <= layer.size + 1 * MiB


@contextlib.contextmanager
def relay_on_a_small_disk(hub: Hub, tmp_path: Path) -> Iterator[tuple[RelayProcess, Path, Blob]]:
    """A relay whose data dir is a 24 MiB tmpfs, and a fresh 16 MiB layer to pull through it
    slowly (~25 MiB/s), so that the disk can be filled while the layer is being cached."""
    image = push_unique(hub, tmp_path, "someuser/diskfull", 16 * MiB)
    layer = max(image.layers, key=lambda b: b.size)
    hub.clear()
    hub.cdn.chunk_delay = 0.01
    with mounted_tmpfs(tmp_path / "data", "24m") as data, start_relay(
        tmp_path / "relay", hub, "--data-dir", str(data), min_free="0"
    ) as relay:  # fmt: skip
        yield relay, data, layer


def fill_the_disk_mid_pull(
    relay: RelayProcess, data: Path, layer_digest: str, cache: str = "miss"
) -> tuple[str, int]:
    """GET the layer through `relay` (answered as `cache`: miss or join), filling `data`'s
    disk once 2 MiB arrived; the body's digest and size (raises httpx.RemoteProtocolError
    when the relay ends it short)."""
    token = anonymous_token(relay, "someuser/diskfull")
    url = f"{relay.url}/v2/someuser/diskfull/blobs/{layer_digest}"
    sha, received = hashlib.sha256(), 0
    with httpx.stream(
        "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-vpsrelay-cache"] == cache
        for chunk in response.iter_raw(1 << 16):
            sha.update(chunk)
            received += len(chunk)
            if received >= 2 * MiB and not (data / "filler").exists():
                fill_up(data)  # the fill has 14 MiB to go, the disk has no byte left
    return f"sha256:{sha.hexdigest()}", received


def test_a_disk_filled_mid_fill_still_serves_the_whole_layer(
    clean_hub: Hub, tmp_path: Path
) -> None:
    """Another writer takes the relay's disk while a layer is being cached: the client still
    gets every byte (verified), nothing is committed, and the next pull passes through."""
    with relay_on_a_small_disk(clean_hub, tmp_path) as (relay, data, layer):
        digest, received = fill_the_disk_mid_pull(relay, data, layer.digest)
        assert (digest, received) == (layer.digest, layer.size)
        assert "write error while filling, passing the rest through" in relay.log_text()
        assert layer.digest not in cached_files(tmp_path)
        assert not list((data / "tmp").iterdir())
        cdn_gets = [r for r in clean_hub.cdn.requests() if layer.digest[7:] in r.path]
        assert len(cdn_gets) == 1  # the rest came from the same upstream response

        token = anonymous_token(relay, "someuser/diskfull")
        again = httpx.get(  # no room now: a pass-through
            f"{relay.url}/v2/someuser/diskfull/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert again.status_code == 200
        assert f"sha256:{hashlib.sha256(again.content).hexdigest()}" == layer.digest
        assert "passing through" in relay.log_text()


def test_a_client_that_joined_a_fill_whose_disk_fills_up_resumes_upstream(
    clean_hub: Hub, tmp_path: Path
) -> None:
    """The disk fails under a fill two clients read: the first gets the rest of the same
    upstream response, the joined one asks the upstream for the rest with a Range."""
    with relay_on_a_small_disk(clean_hub, tmp_path) as (relay, data, layer):
        token = anonymous_token(relay, "someuser/diskfull")
        url = f"{relay.url}/v2/someuser/diskfull/blobs/{layer.digest}"
        with httpx.stream(
            "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=60
        ) as leader:
            assert leader.headers["x-vpsrelay-cache"] == "miss"
            leader_chunks = leader.iter_raw(1 << 16)
            leader_sha = hashlib.sha256(next(leader_chunks))
            joined = fill_the_disk_mid_pull(relay, data, layer.digest, cache="join")
            for chunk in leader_chunks:
                leader_sha.update(chunk)
        assert joined == (layer.digest, layer.size)
        assert f"sha256:{leader_sha.hexdigest()}" == layer.digest
        assert "resuming" in relay.log_text()
        assert layer.digest not in cached_files(tmp_path)
    gets = [r for r in clean_hub.cdn.requests() if layer.digest[7:] in r.path]
    assert len(gets) == 2, [g.headers.get("range") for g in gets]
    ranges = [g.headers.get("range") for g in gets]
    assert ranges[0] is None
    resumed_at = int(str(ranges[1]).removeprefix("bytes=").removesuffix("-"))
    assert 2 * MiB <= resumed_at < layer.size  # not the whole layer twice


def test_a_disk_filled_mid_fill_still_withholds_a_corrupt_end(
    clean_hub: Hub, tmp_path: Path
) -> None:
    """After the switch to pass-through the body is still verified: wrong bytes end short."""
    with relay_on_a_small_disk(clean_hub, tmp_path) as (relay, data, layer):
        clean_hub.cdn.corrupt = True
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                fill_the_disk_mid_pull(relay, data, layer.digest)
        finally:
            clean_hub.cdn.corrupt = False
        assert "write error while filling, passing the rest through" in relay.log_text()
        assert "pass-through after a disk error failed" in relay.log_text()


def test_eviction_keeps_the_cap_and_spares_a_pull_in_progress(
    clean_hub: Hub, tmp_path: Path
) -> None:
    images = [push_unique(clean_hub, tmp_path, f"someuser/evict{i}", 2 * MiB) for i in range(4)]
    layers = [max(img.layers, key=lambda b: b.size) for img in images]
    cap = 5 * MiB
    with start_relay(tmp_path / "relay", clean_hub, max_size=str(cap), min_free="1MiB") as relay:

        def get(i: int, **kwargs: object) -> httpx.Response:
            token = anonymous_token(relay, f"someuser/evict{i}")
            return httpx.get(
                f"{relay.url}/v2/someuser/evict{i}/blobs/{layers[i].digest}",
                headers={"authorization": f"Bearer {token}"},
                timeout=60,
            )

        for i in range(3):
            response = get(i)
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == layers[i].digest[7:]
            assert sum(cached_files(relay.workdir).values()) <= cap
        assert layers[0].digest not in cached_files(relay.workdir)  # least recently used

        # A slow pull of evict3 fills while evict0 and evict1 are pulled again.
        clean_hub.cdn.chunk_delay = 0.05
        token = anonymous_token(relay, "someuser/evict3")
        sha, received = hashlib.sha256(), 0
        with httpx.stream(
            "GET",
            f"{relay.url}/v2/someuser/evict3/blobs/{layers[3].digest}",
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        ) as slow:
            assert slow.status_code == 200
            chunks = slow.iter_raw(1 << 16)
            first = next(chunks)
            sha.update(first)
            received += len(first)
            others = ThreadPoolExecutor(max_workers=2)
            results = list(others.map(get, [0, 1]))
            for chunk in chunks:
                sha.update(chunk)
                received += len(chunk)
        assert [r.status_code for r in results] == [200, 200]
        for i, r in zip([0, 1], results, strict=True):
            assert hashlib.sha256(r.content).hexdigest() == layers[i].digest[7:]
        assert received == layers[3].size
        assert f"sha256:{sha.hexdigest()}" == layers[3].digest
        assert sum(cached_files(relay.workdir).values()) <= cap
        assert "evicted" in relay.log_text()


def test_upstream_stopped_after_a_warm_pull(tmp_path: Path) -> None:
    """A second hub, stopped after the first pull: the pull is served from the cache."""
    hub = start_hub(tmp_path / "hub", seed=False)
    try:
        image = push_unique(hub, tmp_path, "library/offline", 1 * MiB, tag="latest")
        with start_relay(tmp_path / "relay", hub) as relay:
            skopeo_copy(sub(tmp_path / "warm"), f"{host(relay)}/offline:latest")
            assert_blobs_pulled(tmp_path / "warm", image)
            # The relay asks, after answering the manifest, whether the repository is public
            # (what decides serving anonymous clients while the upstream is down); skopeo may
            # be done before that answer is in, so wait for it before stopping the upstream.
            assert wait_until(lambda: "docker.io/library/offline is public" in relay.log_text())
            hub.close()
            cold = skopeo_copy(sub(tmp_path / "cold"), f"{host(relay)}/offline:latest", check=False)
            assert cold.returncode == 0, cold.stderr + relay.log_text()[-3000:]
            assert pulled_manifest_digest(tmp_path / "cold") == image.manifest_digest
            assert_blobs_pulled(tmp_path / "cold", image)
            log = relay.log_text()
            assert "from the cache, stale" in log
            # A manifest asked for directly carries the stale warning.
            response = httpx.get(
                f"{relay.url}/v2/offline/manifests/latest",
                headers={"accept": image.manifest_media_type},
            )
            assert response.status_code == 200
            assert response.headers["x-vpsrelay-cache"] == "stale"
            assert response.headers["warning"].startswith("110 ")
            assert response.content == image.manifest_bytes
    finally:
        hub.close()


MANIFEST_ACCEPT = ", ".join([MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST])


def tag_requests(hub: Hub) -> list[tuple[str, str]]:
    """Requests for the tag (the relay's own anonymous probes go by digest)."""
    return [(m, p) for m, p in hub.registry_requests() if p.endswith("/manifests/v")]


def test_tag_freshness_and_revalidation_with_head(clean_hub: Hub, tmp_path: Path) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/moving", 0, tag="v")
    with start_relay(tmp_path / "relay", clean_hub, tag_ttl="1.5") as relay:
        token = anonymous_token(relay, "someuser/moving")
        # Every manifest type named: a tag is remembered only from such an answer.
        auth = {"authorization": f"Bearer {token}", "accept": MANIFEST_ACCEPT}
        url = f"{relay.url}/v2/someuser/moving/manifests/v"
        clean_hub.clear_registry_requests()
        first = httpx.get(url, headers=auth)
        assert first.content == image.manifest_bytes
        assert first.headers["x-vpsrelay-cache"] == "miss"
        fresh = httpx.head(url, headers=auth)  # within tag_ttl, same credential: no upstream
        assert fresh.headers["x-vpsrelay-cache"] == "hit"
        assert fresh.headers["docker-content-digest"] == image.manifest_digest
        assert int(fresh.headers["content-length"]) == len(image.manifest_bytes)
        clean_hub.wait_registry_requests(lambda log: len(log) >= 1)
        time.sleep(0.3)
        assert tag_requests(clean_hub) == [("GET", "/v2/someuser/moving/manifests/v")]

        time.sleep(1.5)
        clean_hub.clear_registry_requests()
        stale = httpx.get(url, headers=auth)
        assert stale.headers["x-vpsrelay-cache"] == "revalidated"
        assert stale.content == image.manifest_bytes
        clean_hub.wait_registry_requests(lambda log: len(log) >= 1)
        assert tag_requests(clean_hub) == [("HEAD", "/v2/someuser/moving/manifests/v")]

        moved = push_unique(clean_hub, tmp_path, "someuser/moving", 0, tag="v")
        assert moved.manifest_digest != image.manifest_digest
        time.sleep(1.5)
        clean_hub.clear_registry_requests()
        again = httpx.get(url, headers=auth)
        assert again.content == moved.manifest_bytes
        assert again.headers["docker-content-digest"] == moved.manifest_digest
        clean_hub.wait_registry_requests(lambda log: len(log) >= 2)
        assert tag_requests(clean_hub) == [
            ("HEAD", "/v2/someuser/moving/manifests/v"),
            ("GET", "/v2/someuser/moving/manifests/v"),
        ]
        skopeo_copy(sub(tmp_path / "pulled"), f"{host(relay)}/someuser/moving:v")
        assert pulled_manifest_digest(tmp_path / "pulled") == moved.manifest_digest


def test_private_layer_is_not_served_to_anonymous_clients(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    secret = clean_hub.images["private/secret:1.0"]
    alpine = clean_hub.images["library/alpine:latest"]
    assert isinstance(secret, BuiltImage)
    assert isinstance(alpine, BuiltImage)
    user, password = clean_hub.creds
    skopeo_copy(
        sub(tmp_path / "alice"),
        f"{host(relay)}/private/secret:1.0",
        f"--src-creds={user}:{password}",
    )
    cached = cached_files(relay.workdir)
    assert all(blob.digest in cached for blob in secret.layers)

    # Anonymous, in the private repository itself: the upstream's 401, no bytes.
    token = anonymous_token(relay, "private/secret")
    auth = {"authorization": f"Bearer {token}"}
    for blob in secret.layers:
        denied = httpx.get(f"{relay.url}/v2/private/secret/blobs/{blob.digest}", headers=auth)
        assert denied.status_code == 401
        assert "x-vpsrelay-cache" not in denied.headers
    manifest = httpx.get(f"{relay.url}/v2/private/secret/manifests/1.0", headers=auth)
    assert manifest.status_code == 401
    assert secret.manifest_bytes not in manifest.content
    none = httpx.get(f"{relay.url}/v2/private/secret/blobs/{secret.layers[0].digest}")
    assert none.status_code == 401

    # Anonymous, through a public repository it may read: the secret layer is not there.
    token = anonymous_token(relay, "alpine")
    auth = {"authorization": f"Bearer {token}", "accept": alpine.manifest_media_type}
    assert httpx.get(f"{relay.url}/v2/alpine/manifests/latest", headers=auth).status_code == 200
    for blob in secret.layers:
        response = httpx.get(f"{relay.url}/v2/alpine/blobs/{blob.digest}", headers=auth)
        assert response.status_code == 404
        assert "x-vpsrelay-cache" not in response.headers
    # While alpine's own layers, cached or not, are served.
    layer = alpine.layers[0]
    first = httpx.get(f"{relay.url}/v2/alpine/blobs/{layer.digest}", headers=auth)
    second = httpx.get(f"{relay.url}/v2/alpine/blobs/{layer.digest}", headers=auth)
    assert first.status_code == second.status_code == 200
    assert second.headers["x-vpsrelay-cache"] == "hit"
    assert hashlib.sha256(second.content).hexdigest() == layer.digest[7:]


def test_hit_serves_range_and_head_with_direct_headers(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/ranges", 3 * MiB)
    layer = max(image.layers, key=lambda b: b.size)
    data = blob_file(image, layer.digest).read_bytes()
    token = anonymous_token(relay, "someuser/ranges")
    auth = {"authorization": f"Bearer {token}"}
    url = f"{relay.url}/v2/someuser/ranges/blobs/{layer.digest}"
    assert httpx.get(url, headers=auth).content == data  # fills
    clean_hub.clear()
    head = httpx.head(url, headers=auth)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(layer.size)
    assert head.headers["docker-content-digest"] == layer.digest
    assert head.headers["content-type"] == "application/octet-stream"
    assert head.headers["x-vpsrelay-cache"] == "hit"
    part = httpx.get(url, headers={**auth, "range": "bytes=1000-2000000"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-2000000/{layer.size}"
    assert part.content == data[1000:2000001]
    tail = httpx.get(url, headers={**auth, "range": "bytes=-10"})
    assert tail.content == data[-10:]
    bad = httpx.get(url, headers={**auth, "range": f"bytes={layer.size}-"})
    assert bad.status_code == 416
    assert clean_hub.cdn.requests() == []
    assert clean_hub.registry_requests() == []


def vpsrelay(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=120, env={**environ, **(env or {})}, check=False,
    )  # fmt: skip


def test_warm_and_cache_commands(relay: RelayProcess, clean_hub: Hub) -> None:
    index = clean_hub.images["library/multi:latest"]
    tool = clean_hub.images["someuser/tool:1.0"]
    assert isinstance(index, BuiltIndex)
    assert isinstance(tool, BuiltImage)
    arch = {
        entry["digest"]: entry["platform"]["architecture"]
        for entry in json.loads(index.index_bytes)["manifests"]
    }
    arm = next(img for img in index.images if arch[img.manifest_digest] == "arm64")
    amd = next(img for img in index.images if arch[img.manifest_digest] == "amd64")
    done = vpsrelay("warm", "--relay", relay.url, "multi", "--platform", "linux/arm64",
                    "docker.io/someuser/tool:1.0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "multi: 2 blobs warm" in done.stdout
    cached = cached_files(relay.workdir)
    for blob in [arm.config, *arm.layers, tool.config, *tool.layers]:
        assert blob.digest in cached
    assert amd.config.digest not in cached  # only the platform asked for

    data = str(relay.workdir / "data")
    relay.close()  # flush the index
    stats = vpsrelay("cache", "stats", "--json", "--data-dir", data)
    assert stats.returncode == 0, stats.stderr
    report = json.loads(stats.stdout)
    assert report["blobs"] == len(cached) - report["manifests"]
    assert report["counters"]["misses"] >= 4
    listing = vpsrelay("cache", "ls", "--data-dir", data)
    assert tool.layers[0].digest in listing.stdout
    assert "docker.io/someuser/tool" in listing.stdout
    removed = vpsrelay("cache", "rm", tool.layers[0].digest, "--data-dir", data)
    assert removed.returncode == 0, removed.stderr
    assert tool.layers[0].digest not in cached_files(relay.workdir)
    again = vpsrelay("cache", "rm", tool.layers[0].digest, "--data-dir", data)
    assert again.returncode == 1
    gc = vpsrelay("cache", "gc", "--data-dir", data, env={"VPSRELAY_CACHE__MAX_SIZE": "1"})
    assert gc.returncode == 0, gc.stderr
    assert cached_files(relay.workdir) == {}
    bad = vpsrelay("cache", "stats", "--data-dir", data, env={"VPSRELAY_CACHE__MAX_SIZE": "lots"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "vpsrelay: config error: VPSRELAY_CACHE__MAX_SIZE: cache.max_size:"
        " expected a size such as '50GiB', got 'lots'"
    )


def test_a_leader_that_leaves_does_not_stop_the_fill_others_read(
    relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    """The first client of an uncached blob hangs up early; a second client reading the same
    fill gets every byte, and the upstream is still asked only once."""
    image = push_unique(clean_hub, tmp_path, "someuser/leaving", 16 * MiB)
    layer = max(image.layers, key=lambda b: b.size)
    clean_hub.clear()
    clean_hub.cdn.chunk_delay = 0.01  # ~25 MiB/s: both clients overlap the fill
    token = anonymous_token(relay, "someuser/leaving")
    url = f"{relay.url}/v2/someuser/leaving/blobs/{layer.digest}"
    auth = {"authorization": f"Bearer {token}"}
    with httpx.stream("GET", url, headers=auth) as leader:
        assert leader.headers["x-vpsrelay-cache"] == "miss"
        next(leader.iter_raw(1 << 16))
        with httpx.stream("GET", url, headers=auth) as follower:
            assert follower.headers["x-vpsrelay-cache"] == "join"
            leader.close()  # the leader hangs up while the fill is far from done
            sha = hashlib.sha256()
            for chunk in follower.iter_raw(1 << 20):
                sha.update(chunk)
    assert f"sha256:{sha.hexdigest()}" == layer.digest
    cdn_gets = [r for r in clean_hub.cdn.requests() if layer.digest[7:] in r.path]
    assert len(cdn_gets) == 1
    assert wait_until(lambda: layer.digest in cached_files(relay.workdir))
