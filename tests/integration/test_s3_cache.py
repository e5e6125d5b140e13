"""Issue 15, end to end: two relay nodes (separate processes and data dirs) on one
SeaweedFS bucket, in front of the hub stand-in (Distribution, token server, CDN)."""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.clients import DockerDaemon
from tests.infra.seaweed import ACCESS_KEY, SECRET_KEY, Seaweed
from tests.integration.test_cache import (
    MiB,
    blob_gets,
    host,
    push_unique,
    start_relay,
    sub,
    wait_until,
)
from tests.integration.test_pull import (
    anonymous_token,
    assert_blobs_pulled,
    pulled_manifest_digest,
    skopeo_copy,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.relay import RelayProcess

pytestmark = pytest.mark.integration
PREFIX = "relay/"
# Nodes that evict soon: the grace must cover two gaps between a node's batches,
# 2 x (interval + timeout) = 7 s (config.py); a timeout of 1.5 s failed fills on a busy
# machine.
GRACE = 8
FAST_EVICTION = {"s3__evict_interval": "0.5", "s3__timeout": "3", "s3__evict_grace": str(GRACE)}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    store = Seaweed(tmp_path_factory.mktemp("seaweed"))
    store.start()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def bucket(seaweed: Seaweed) -> str:
    name = f"t{uuid.uuid4().hex[:16]}"
    seaweed.create_bucket(name)
    return name


def s3_env(seaweed: Seaweed, bucket: str, **extra: str) -> dict[str, str]:
    """The `start_relay` keyword arguments of a node on `bucket` (VPSRELAY_CACHE__...)."""
    return {
        "backend": "s3",
        "s3__endpoint": seaweed.endpoint,
        "s3__bucket": bucket,
        "s3__prefix": PREFIX,
        "s3__access_key": ACCESS_KEY,
        "s3__secret_key": SECRET_KEY,
        "s3__lease_ttl": "3",
        "s3__lease_wait": "60",
        "s3__part_size": "5MiB",
        "s3__timeout": "10",  # 5: a busy filer missed it, and the pull relayed
        **extra,
    }


def node(tmp: Path, hub: Hub, seaweed: Seaweed, bucket: str, **extra: str) -> RelayProcess:
    return start_relay(tmp, hub, **s3_env(seaweed, bucket, **extra))


def blob_key(digest: str) -> str:
    return f"{PREFIX}blobs/sha256/{digest.removeprefix('sha256:')}"


def cdn_gets(hub: Hub, digest: str) -> int:
    return sum(1 for r in hub.cdn.requests() if digest[7:] in r.path and r.method == "GET")


def test_the_store_honours_conditional_writes(seaweed: Seaweed, bucket: str) -> None:
    """What single-flight across nodes rests on: `If-None-Match: *` on PutObject and on
    CompleteMultipartUpload, and `If-Match` on PutObject (lease take-over) and on
    DeleteObject (lease release)."""
    key = f"/{bucket}/probe"
    assert seaweed.request("PUT", key, b"first", {"if-none-match": "*"}).status_code == 200
    assert seaweed.request("PUT", key, b"second", {"if-none-match": "*"}).status_code == 412
    etag = seaweed.request("HEAD", key).headers["etag"]
    assert seaweed.request("PUT", key, b"x", {"if-match": '"0000"'}).status_code == 412
    assert seaweed.request("PUT", key, b"third", {"if-match": etag}).status_code == 200
    assert seaweed.request("GET", key).content == b"third"
    # and on DeleteObject (a lease's release)
    assert seaweed.request("DELETE", key, headers={"if-match": '"0000"'}).status_code == 412
    assert seaweed.request("GET", key).content == b"third"
    started = seaweed.request("POST", f"{key}?uploads=")
    upload = started.text.split("<UploadId>")[1].split("</UploadId>")[0]
    part = seaweed.request("PUT", f"{key}?partNumber=1&uploadId={upload}", b"parts")
    body = (
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>"
        f"<ETag>{part.headers['etag']}</ETag></Part></CompleteMultipartUpload>"
    ).encode()
    done = seaweed.request("POST", f"{key}?uploadId={upload}", body, {"if-none-match": "*"})
    assert done.status_code == 412
    assert seaweed.request("GET", key).content == b"third"
    assert seaweed.request("GET", key, signed=False).status_code == 403


def test_a_blob_pulled_through_one_node_is_served_by_the_other(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/shared", 12 * MiB)
    blobs = [image.config, *image.layers]
    clean_hub.clear()
    with (
        node(tmp_path / "a", clean_hub, seaweed, bucket) as a,
        node(tmp_path / "b", clean_hub, seaweed, bucket) as b,
    ):
        skopeo_copy(sub(tmp_path / "via-a"), f"{host(a)}/someuser/shared:1")
        assert_blobs_pulled(tmp_path / "via-a", image)
        stored = seaweed.keys(bucket, f"{PREFIX}blobs/")
        for blob in blobs:
            assert stored.get(blob_key(blob.digest)) == blob.size, blob
        assert not seaweed.keys(bucket, f"{PREFIX}leases/"), "leases are released"
        assert not seaweed.uploads(bucket, PREFIX)
        clean_hub.clear()

        skopeo_copy(sub(tmp_path / "via-b"), f"{host(b)}/someuser/shared:1")
        assert pulled_manifest_digest(tmp_path / "via-b") == image.manifest_digest
        assert_blobs_pulled(tmp_path / "via-b", image)
        assert clean_hub.cdn.requests() == [], "node B fetched from the upstream's CDN"
        assert clean_hub.cdn.bytes_sent == 0
        token = anonymous_token(b, "someuser/shared")
        layer = max(image.layers, key=lambda blob: blob.size)
        answer = httpx.get(
            f"{b.url}/v2/someuser/shared/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}", "range": "bytes=10-19"},
        )
        assert answer.status_code == 206
        layer_bytes = (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()
        assert answer.content == layer_bytes[10:20]


def test_concurrent_pulls_across_two_nodes_fetch_once(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """10 skopeo pulls of one uncached image at once, split across both nodes: the
    upstream sees one full GET of each blob (SeaweedFS honours conditional writes)."""
    image = push_unique(clean_hub, tmp_path, "someuser/crowd", 24 * MiB)
    blobs = [image.config, *image.layers]
    clean_hub.clear()
    clean_hub.cdn.chunk_delay = 0.002  # ~100 MiB/s: the pulls overlap the fill
    with (
        node(tmp_path / "a", clean_hub, seaweed, bucket) as a,
        node(tmp_path / "b", clean_hub, seaweed, bucket) as b,
    ):
        nodes = [a, b]

        def pull(i: int) -> None:
            out = sub(tmp_path / f"client{i}")
            skopeo_copy(out, f"{host(nodes[i % 2])}/someuser/crowd:1")
            assert_blobs_pulled(out, image)

        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(pull, range(10)))
        for blob in blobs:
            assert cdn_gets(clean_hub, blob.digest) == 1, blob
        assert clean_hub.cdn.bytes_sent == sum(blob.size for blob in blobs)
        requests = clean_hub.registry_requests()
        for blob in blobs:
            assert blob_gets(requests, blob.digest) == 1, blob


def test_a_node_killed_mid_fill_leaves_nothing_and_the_other_takes_over(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/killed", 40 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    clean_hub.clear()
    clean_hub.cdn.chunk_delay = 0.04  # ~6 MiB/s: the fill is unfinished when A dies
    a = node(tmp_path / "a", clean_hub, seaweed, bucket)
    token = anonymous_token(a, "someuser/killed")
    path = f"/v2/someuser/killed/blobs/{layer.digest}"
    with httpx.stream("GET", f"{a.url}{path}", headers={"authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200
        got = 0
        for chunk in r.iter_raw(1 << 16):
            got += len(chunk)
            if got >= 11 * MiB:  # two parts uploaded
                break
        assert seaweed.uploads(bucket, PREFIX), a.log_text()[-4000:]
        a.close(sig=signal.SIGKILL)
    assert blob_key(layer.digest) not in seaweed.keys(bucket, PREFIX)
    assert seaweed.keys(bucket, f"{PREFIX}leases/"), "the dead node's lease is still there"
    clean_hub.cdn.chunk_delay = 0.0
    started = time.monotonic()
    with node(tmp_path / "b", clean_hub, seaweed, bucket) as b:
        skopeo_copy(sub(tmp_path / "via-b"), f"{host(b)}/someuser/killed:1")
        assert_blobs_pulled(tmp_path / "via-b", image)
        assert "took over" in b.log_text()
        assert "aborted a dead node's upload" in b.log_text()
    assert time.monotonic() - started < 30
    assert seaweed.keys(bucket, PREFIX).get(blob_key(layer.digest)) == layer.size
    assert seaweed.uploads(bucket, PREFIX) == []
    assert not seaweed.keys(bucket, f"{PREFIX}leases/")
    fetched = seaweed.request("GET", f"/{bucket}/{blob_key(layer.digest)}").content
    assert fetched == (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()


def test_pulls_pass_through_while_the_store_is_down(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """The store stops in the middle of a fill (that pull completes, unpublished), then
    stays down: a blob it held and a new one both pass through; /readyz and /metrics say so."""
    cached = push_unique(clean_hub, tmp_path, "someuser/before", 2 * MiB)
    during = push_unique(clean_hub, tmp_path, "someuser/during", 20 * MiB)
    fresh = push_unique(clean_hub, tmp_path, "someuser/after", 6 * MiB)
    with node(tmp_path / "a", clean_hub, seaweed, bucket) as a:
        skopeo_copy(sub(tmp_path / "warm"), f"{host(a)}/someuser/before:1")
        clean_hub.cdn.chunk_delay = 0.05  # 5 MiB/s: the fill runs while the store stops
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pulling = pool.submit(
                    skopeo_copy, sub(tmp_path / "mid-fill"), f"{host(a)}/someuser/during:1"
                )
                assert wait_until(lambda: bool(seaweed.uploads(bucket, PREFIX)), 20)
                seaweed.stop()
                pulling.result(timeout=120)
            assert_blobs_pulled(tmp_path / "mid-fill", during)
            clean_hub.cdn.chunk_delay = 0.0
            for name, image in (("before", cached), ("after", fresh)):
                out = sub(tmp_path / f"down-{name}")
                skopeo_copy(out, f"{host(a)}/someuser/{name}:1")
                assert_blobs_pulled(out, image)
            ready = httpx.get(f"{a.url}/readyz")
            assert ready.json()["status"] == "degraded", ready.text
            assert ready.json()["checks"]["cache_bucket"].startswith("failing: "), ready.text
            metrics = httpx.get(f"{a.url}/metrics").text
            assert "vpsrelay_cache_bucket_up 0.0" in metrics
        finally:
            seaweed.start()
        assert "not published" in a.log_text()
        assert SECRET_KEY not in a.log_text()


def test_presigned_redirects_send_clients_to_the_bucket(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """`cache.s3.redirect`: a cached blob's GET is a 307 to a presigned bucket URL that
    skopeo follows (byte-exact); the URL needs no Authorization and takes a Range."""
    image = push_unique(clean_hub, tmp_path, "someuser/redirected", 3 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    layer_bytes = (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()
    env = {"s3__redirect": "true", "s3__redirect_min_size": "1MiB"}
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
        skopeo_copy(sub(tmp_path / "fill"), f"{host(a)}/someuser/redirected:1")
        clean_hub.clear()
        out = sub(tmp_path / "redirected")
        skopeo_copy(out, f"{host(a)}/someuser/redirected:1")
        assert_blobs_pulled(out, image)
        assert clean_hub.cdn.requests() == []
        token = anonymous_token(a, "someuser/redirected")
        answer = httpx.get(
            f"{a.url}/v2/someuser/redirected/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 307
        # the redirect skopeo followed, and this one, each logged as a hit

        def redirects() -> list[str]:
            lines = a.log_text().splitlines()
            return [ln for ln in lines if layer.digest in ln and "status=307" in ln]

        assert wait_until(lambda: len(redirects()) >= 2, 10), redirects()
        assert all("cache=hit" in line for line in redirects()), redirects()
        location = answer.headers["location"]
        assert location.startswith(f"{seaweed.endpoint}/{bucket}/{blob_key(layer.digest)}?")
        assert "X-Amz-Signature=" in location
        assert "X-Amz-Expires=60" in location
        direct = httpx.get(location)  # no Authorization header
        assert direct.status_code == 200
        assert direct.content == layer_bytes
        ranged = httpx.get(location, headers={"range": "bytes=100-199"})
        assert ranged.status_code == 206
        assert ranged.content == layer_bytes[100:200]
        # the small config blob is below redirect_min_size: sent by the relay
        small = httpx.get(
            f"{a.url}/v2/someuser/redirected/blobs/{image.config.digest}",
            headers={"authorization": f"Bearer {token}"},
        )
        assert small.status_code == 200
        assert small.headers["x-vpsrelay-cache"] == "hit"


def test_eviction_keeps_the_bucket_under_its_cap_and_spares_objects_in_use(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Cap 20 MiB, grace 26 s: a 16 MiB blob read slowly through node B (recorded in
    every access batch while it is read) survives, though the least recently fetched;
    the two 7 MiB images pulled meanwhile through A and B are evicted instead."""
    first = push_unique(clean_hub, tmp_path, "someuser/evict1", 16 * MiB)
    second = push_unique(clean_hub, tmp_path, "someuser/evict2", 7 * MiB)
    third = push_unique(clean_hub, tmp_path, "someuser/evict3", 7 * MiB)
    env = {"s3__max_size": "20MiB", **FAST_EVICTION}
    held = max(first.layers, key=lambda blob: blob.size)
    held_bytes = (first.layout / "blobs/sha256" / held.digest[7:]).read_bytes()

    def total() -> int:
        return sum(seaweed.keys(bucket, f"{PREFIX}blobs/").values())

    with (
        node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a,
        node(tmp_path / "b", clean_hub, seaweed, bucket, **env) as b,
    ):
        skopeo_copy(sub(tmp_path / "p1"), f"{host(a)}/someuser/evict1:1")
        token = anonymous_token(b, "someuser/evict1")
        got = bytearray()

        def slow_read() -> None:
            url = f"{b.url}/v2/someuser/evict1/blobs/{held.digest}"
            with httpx.stream("GET", url, headers={"authorization": f"Bearer {token}"}) as r:
                assert r.headers["x-vpsrelay-cache"] == "hit"
                for chunk in r.iter_raw(64 * 1024):
                    got.extend(chunk)
                    time.sleep((GRACE + 4) / 256)  # 16 MiB in 256 reads: 30 s

        with ThreadPoolExecutor(max_workers=1) as pool:
            reading = pool.submit(slow_read)
            started = time.monotonic()
            skopeo_copy(sub(tmp_path / "p2"), f"{host(a)}/someuser/evict2:1")
            skopeo_copy(sub(tmp_path / "p3"), f"{host(b)}/someuser/evict3:1")
            assert total() > 20 * MiB
            time.sleep(max(0.0, started + GRACE + 2.5 - time.monotonic()))  # past the grace
            assert blob_key(held.digest) in seaweed.keys(bucket, f"{PREFIX}blobs/")
            reading.result(timeout=60)
        assert bytes(got) == held_bytes
        assert wait_until(lambda: total() <= 20 * MiB, 15), total()
        stored = seaweed.keys(bucket, f"{PREFIX}blobs/")
        assert blob_key(held.digest) in stored
        for image in (second, third):
            layer = max(image.layers, key=lambda blob: blob.size)
            assert blob_key(layer.digest) not in stored
        assert "evicted" in a.log_text() + b.log_text()


def test_a_tag_one_node_fetched_is_fresh_for_the_other(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Node B serves the manifest node A fetched, from the bucket, after a free HEAD
    (its own authorization of the client): no manifest GET reaches the upstream."""
    image = push_unique(clean_hub, tmp_path, "someuser/tagged", 1 * MiB)
    with (
        node(tmp_path / "a", clean_hub, seaweed, bucket) as a,
        node(tmp_path / "b", clean_hub, seaweed, bucket) as b,
    ):
        skopeo_copy(sub(tmp_path / "via-a"), f"{host(a)}/someuser/tagged:1")
        tag = f"{PREFIX}tags/docker.io/someuser/tagged/1"
        assert wait_until(lambda: tag in seaweed.keys(bucket, f"{PREFIX}tags/"), 10)
        clean_hub.clear()
        out = sub(tmp_path / "via-b")
        skopeo_copy(out, f"{host(b)}/someuser/tagged:1")
        assert pulled_manifest_digest(out) == image.manifest_digest
        assert_blobs_pulled(out, image)
        requests = clean_hub.registry_requests()
        manifest_gets = [p for m, p in requests if m == "GET" and "/manifests/" in p]
        assert manifest_gets == [], requests
        assert clean_hub.cdn.requests() == []


@pytest.mark.clients
def test_dockerd_follows_the_presigned_redirect_to_the_store(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """dockerd in its loopback-only network namespace (the relay's and the store's ports
    forwarded in) pulls a cached image: its big layer comes from the bucket by redirect."""
    image = push_unique(clean_hub, tmp_path, "someuser/dockerd", 3 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    env = {"s3__redirect": "true", "s3__redirect_min_size": "1MiB"}
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
        skopeo_copy(sub(tmp_path / "fill"), f"{host(a)}/someuser/dockerd:1")
        clean_hub.clear()
        with DockerDaemon(tmp_path / "dockerd", forward_ports=[a.port, seaweed.s3_port]) as dockerd:
            assert dockerd.netns_interfaces() == ["lo"]
            name = f"{host(a)}/someuser/dockerd:1"
            dockerd.docker("pull", name, timeout=120)
            image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", name).stdout
            assert image_id.strip() == image.config.digest  # dockerd checked every blob
        log = a.log_text()
    assert clean_hub.cdn.requests() == []
    redirected = [
        line for line in log.splitlines() if layer.digest in line and "status=307" in line
    ]
    assert redirected, log[-3000:]
