"""The cache front in process: the relay app with a real store on a temporary directory,
a `FakeRegistry` behind `httpx.MockTransport`. Hits, fills (lead, join, resume after a
disk failure), manifests by tag and digest, stale answers, and who may read what."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.cache.harness import (
    BLOB,
    BLOB_DIGEST,
    MANIFEST,
    MANIFEST_DIGEST,
    MANIFEST_TYPE,
    OTHER_DIGEST,
    OTHER_MANIFEST,
    REPO,
    FakeRegistry,
    cached_relay,
    sha256,
)
from tests.test_app import Chunks
from vpsrelay.cache.storage import Fill, FillState
from vpsrelay.cache.store import DiskStore

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tests.cache.harness import CachedRelay
    from vpsrelay.config import CacheConfig

BLOB_PATH = f"/v2/alpine/blobs/{BLOB_DIGEST}"
TAG_PATH = "/v2/alpine/manifests/latest"
DIGEST_PATH = f"/v2/alpine/manifests/{MANIFEST_DIGEST}"
# Every type a registry converts between: an answer to this may be remembered for the tag.
ACCEPT = {
    "accept": ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            MANIFEST_TYPE,
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
    )
}


async def fill_blob(r: CachedRelay) -> None:
    response = await r.client.get(BLOB_PATH)
    assert response.status_code == 200
    assert response.headers["x-vpsrelay-cache"] == "miss"
    assert response.content == BLOB


async def fill_tag(r: CachedRelay) -> None:
    response = await r.client.get(TAG_PATH, headers=ACCEPT)
    assert response.status_code == 200
    assert response.headers["x-vpsrelay-cache"] == "miss"
    assert response.content == MANIFEST


def forget_tag_check(r: CachedRelay) -> None:
    """Make the cached tag older than any ttl: the next pull asks the upstream."""
    tag = r.store.index.tags[("docker.io", REPO, "latest")]
    tag.checked_at = time.time() - 3600
    # Where every worker reads it, too (a stale tag in memory is re-read from there).
    r.store.db.write([("UPDATE tags SET checked_at = ?", (tag.checked_at,))])


# --- blobs: miss, hit, HEAD, ranges


async def test_a_blob_miss_fills_the_cache_and_the_next_pull_is_a_hit(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        assert r.store.path(BLOB_DIGEST).read_bytes() == BLOB
        r.registry.seen.clear()
        response = await r.client.get(BLOB_PATH)
        assert response.status_code == 200
        assert response.headers["x-vpsrelay-cache"] == "hit"
        assert response.headers["docker-content-digest"] == BLOB_DIGEST
        assert response.headers["content-length"] == str(len(BLOB))
        assert response.content == BLOB
        assert r.registry.seen == []  # the anonymous puller's grant covers it
        counters = r.store.index.counters
        assert (counters["misses"], counters["hits"]) == (1, 1)
        assert counters["bytes_from_cache"] == len(BLOB)


async def test_a_head_of_a_cached_blob_has_its_length_and_no_body(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        r.registry.seen.clear()
        response = await r.client.head(BLOB_PATH)
        assert response.status_code == 200
        assert response.headers["x-vpsrelay-cache"] == "hit"
        assert response.headers["content-length"] == str(len(BLOB))
        assert response.content == b""
        assert r.registry.seen == []


async def test_ranges_of_a_cached_blob(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        partial = await r.client.get(BLOB_PATH, headers={"range": "bytes=10-19"})
        assert partial.status_code == 206
        assert partial.headers["content-range"] == f"bytes 10-19/{len(BLOB)}"
        assert partial.content == BLOB[10:20]
        beyond = await r.client.get(BLOB_PATH, headers={"range": f"bytes={len(BLOB)}-"})
        assert beyond.status_code == 416
        assert beyond.headers["content-range"] == f"bytes */{len(BLOB)}"


async def test_head_and_ranged_misses_pass_through_without_a_fill(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        head = await r.client.head(BLOB_PATH)
        assert head.status_code == 200
        ranged = await r.client.get(BLOB_PATH, headers={"range": "bytes=0-9"})
        assert ranged.status_code == 206
        assert ranged.content == BLOB[:10]
        assert "x-vpsrelay-cache" not in ranged.headers
        assert r.store.get(BLOB_DIGEST) is None
        assert r.store.fills == {}


async def test_a_blob_the_upstream_does_not_have_is_not_cached(tmp_path: Path) -> None:
    missing = sha256(b"nothing")
    async with cached_relay(tmp_path) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{missing}")
        assert response.status_code == 404
        assert r.store.get(missing) is None
        assert r.store.fills == {}


async def test_a_blob_too_big_for_the_cap_passes_through_verified(tmp_path: Path) -> None:
    async with cached_relay(tmp_path, overrides={"cache.max_size": 1024}) as r:
        response = await r.client.get(BLOB_PATH)
        assert response.status_code == 200
        assert response.content == BLOB
        assert "x-vpsrelay-cache" not in response.headers
        assert r.store.get(BLOB_DIGEST) is None
        assert r.store.index.counters["passthrough_no_space"] == 1


async def test_a_blob_named_by_another_algorithm_passes_through(tmp_path: Path) -> None:
    digest = "sha512:" + "a" * 128
    async with cached_relay(tmp_path) as r:
        response = await r.client.get(f"/v2/alpine/blobs/{digest}")
        assert response.status_code in (400, 404)
        assert r.store.fills == {}
        assert r.store.index.objects == {}


async def test_a_wrong_body_is_never_cached_nor_completed(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.blobs[BLOB_DIGEST] = b"x" + BLOB[1:]
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(BLOB_PATH)
        assert len(response.content) < len(BLOB)
        assert not response.extensions["complete"]
        assert r.store.get(BLOB_DIGEST) is None
        assert r.store.index.counters["digest_mismatches"] == 1
        assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_cached_file_gone_behind_the_index_is_fetched_again(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        r.store.path(BLOB_DIGEST).unlink()
        response = await r.client.get(BLOB_PATH)
        assert response.status_code == 200
        assert response.content == BLOB
        assert r.store.get(BLOB_DIGEST) is None  # forgotten; the next pull fills again


async def test_a_cached_file_cut_short_ends_the_body_short(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        with r.store.path(BLOB_DIGEST).open("r+b") as cached:
            cached.truncate(1000)  # a disk that lost the end of the file
        response = await r.client.get(BLOB_PATH)
        assert response.content == BLOB[:1000]
        assert not response.extensions["complete"]


# --- a client that hangs up while it leads a fill


async def test_a_fill_finishes_when_its_only_client_hangs_up(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        r.transport.hang_up_after = 100_000
        response = await r.client.get(BLOB_PATH)
        assert len(response.content) < len(BLOB)
        assert r.store.path(BLOB_DIGEST).read_bytes() == BLOB  # cached for the next pull
        assert r.store.fills == {}


async def test_without_finish_abandoned_a_fill_stops_with_its_last_client(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(gate=trio.Event())  # the upstream stalls after a first chunk
    overrides: dict[str, object] = {"cache.finish_abandoned": False}
    async with cached_relay(tmp_path, registry, overrides) as r:
        r.transport.hang_up_after = 0
        async with trio.open_nursery() as nursery:
            # The fill is shielded from the client's task: were it not stopped, it would
            # wait for the stalled upstream; the watchdog opens the gate, so it fails here.
            nursery.start_soon(open_gate_after, registry, 5.0)
            response = await r.client.get(BLOB_PATH)
            nursery.cancel_scope.cancel()
        assert response.content == b""
        assert r.store.get(BLOB_DIGEST) is None
        assert r.store.fills == {}
        assert list((tmp_path / "tmp").iterdir()) == []
        assert r.store.reserved == 0


# --- fills shared by concurrent clients


async def pull_with_a_joiner(r: CachedRelay) -> dict[str, httpx.Response]:
    answers: dict[str, httpx.Response] = {}

    async def pull(name: str) -> None:
        answers[name] = await r.client.get(BLOB_PATH)

    gate = r.registry.gate
    assert gate is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pull, "leader")
        try:
            fill = await wait_for_fill(r, FillState.STREAMING)
            nursery.start_soon(pull, "joiner")
            await wait_until(lambda: fill.readers >= 2)
        finally:
            gate.set()  # the fill is shielded: a test failing here must not leave it waiting
    return answers


async def test_two_concurrent_pulls_share_one_upstream_download(tmp_path: Path) -> None:
    registry = FakeRegistry(gate=trio.Event())
    async with cached_relay(tmp_path, registry) as r:
        answers = await pull_with_a_joiner(r)
        assert answers["leader"].headers["x-vpsrelay-cache"] == "miss"
        assert answers["joiner"].headers["x-vpsrelay-cache"] == "join"
        assert answers["leader"].content == answers["joiner"].content == BLOB
        assert len(registry.requests("GET", "/blobs/")) == 1
        assert r.store.index.counters["joins"] == 1
        assert r.store.get(BLOB_DIGEST) is not None


async def test_a_joiner_of_a_failed_fill_gets_a_short_body(tmp_path: Path) -> None:
    registry = FakeRegistry(gate=trio.Event())
    registry.blobs[BLOB_DIGEST] = BLOB[:-1] + b"x"
    async with cached_relay(tmp_path, registry) as r:
        answers = await pull_with_a_joiner(r)
        for answer in answers.values():
            assert len(answer.content) < len(BLOB)  # the last byte waits for the digest
            assert not answer.extensions["complete"]
        assert r.store.get(BLOB_DIGEST) is None


async def test_a_client_waiting_on_a_fill_the_upstream_refused_asks_itself(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry()
    async with cached_relay(tmp_path, registry) as r:
        fill, lead = r.store.claim(BLOB_DIGEST)  # a leader still waiting for its answer
        assert lead

        async def refuse_soon() -> None:
            await trio.sleep(0.05)
            r.store.drop(fill)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse_soon)
            response = await r.client.get(BLOB_PATH)
        assert response.status_code == 200
        assert response.content == BLOB
        assert response.headers["x-vpsrelay-cache"] == "miss"  # led a fill of its own


async def open_gate_after(registry: FakeRegistry, seconds: float) -> None:
    await trio.sleep(seconds)
    assert registry.gate is not None
    registry.gate.set()


async def wait_until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110 - the store signals no such event
            await trio.sleep(0.001)


async def wait_for_fill(r: CachedRelay, state: FillState) -> Fill:
    def found() -> bool:
        fill = r.store.fills.get(BLOB_DIGEST)
        return fill is not None and fill.state is state

    await wait_until(found)
    return r.store.fills[BLOB_DIGEST]


# --- a disk that fails during a fill


class FailingDiskStore(DiskStore):
    """A store whose disk takes the first write batch of a fill, then is full: the
    second batch is written to `/dev/full` (a real ENOSPC, after the batch was hashed)."""

    batches = 0

    async def _write(self, write: object, batch: list[bytes]) -> None:
        self.batches += 1
        if self.batches == 1:
            await super()._write(write, batch)
            return
        (fill,) = self.fills.values()
        disk, full = fill.fd, os.open("/dev/full", os.O_WRONLY)
        fill.fd = full
        try:
            await super()._write(write, batch)
        finally:
            fill.fd = disk
            os.close(full)


def failing_disk(root: Path, cache: CacheConfig) -> DiskStore:
    store = FailingDiskStore.open_dir(root, cache)
    assert isinstance(store, FailingDiskStore)
    return store


async def test_a_disk_failure_mid_fill_still_completes_every_client(tmp_path: Path) -> None:
    registry = FakeRegistry(gate=trio.Event())
    async with cached_relay(tmp_path, registry, store_class=failing_disk) as r:
        answers = await pull_with_a_joiner(r)
        assert answers["leader"].content == BLOB  # the rest passed through from memory
        assert answers["joiner"].content == BLOB  # resumed from the upstream
        resumes = [q for q in registry.requests("GET", "/blobs/") if "range" in q.headers]
        assert len(resumes) == 1
        assert resumes[0].headers["range"].startswith("bytes=")
        assert r.store.get(BLOB_DIGEST) is None
        assert r.store.index.counters["write_errors"] == 1
        assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_resume_from_an_upstream_without_ranges_skips_what_was_sent(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(gate=trio.Event(), ranges=False)
    async with cached_relay(tmp_path, registry, store_class=failing_disk) as r:
        answers = await pull_with_a_joiner(r)
        assert answers["leader"].content == BLOB
        assert answers["joiner"].content == BLOB


async def test_a_resume_the_upstream_refuses_leaves_the_joiner_short(tmp_path: Path) -> None:
    registry = FakeRegistry(gate=trio.Event())
    original = registry.handle

    def no_resume(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            registry.seen.append(request)
            return httpx.Response(503)
        return original(request)

    registry.handle = no_resume  # type: ignore[method-assign]
    async with cached_relay(tmp_path, registry, store_class=failing_disk) as r:
        answers = await pull_with_a_joiner(r)
        assert answers["leader"].content == BLOB
        assert len(answers["joiner"].content) < len(BLOB)
        assert not answers["joiner"].extensions["complete"]


# --- manifests


async def test_a_manifest_by_tag_is_cached_then_served_by_tag_and_by_digest(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        r.registry.seen.clear()
        by_tag = await r.client.get(TAG_PATH, headers=ACCEPT)
        by_digest = await r.client.get(DIGEST_PATH, headers=ACCEPT)
        head = await r.client.head(TAG_PATH, headers=ACCEPT)
        for response in (by_tag, by_digest, head):
            assert response.status_code == 200
            assert response.headers["x-vpsrelay-cache"] == "hit"
            assert response.headers["docker-content-digest"] == MANIFEST_DIGEST
            assert response.headers["content-type"] == MANIFEST_TYPE
            assert response.headers["content-length"] == str(len(MANIFEST))
        assert by_tag.content == by_digest.content == MANIFEST
        assert head.content == b""
        assert r.registry.seen == []
        # The manifest's layers are known to be held by the repository.
        assert r.store.index.holds(BLOB_DIGEST, "docker.io", REPO)


async def test_a_manifest_by_digest_is_cached_without_a_tag(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        first = await r.client.get(DIGEST_PATH, headers=ACCEPT)
        assert first.headers["x-vpsrelay-cache"] == "miss"
        assert r.store.index.tags == {}
        r.registry.seen.clear()
        again = await r.client.get(DIGEST_PATH, headers=ACCEPT)
        assert again.headers["x-vpsrelay-cache"] == "hit"
        assert again.content == MANIFEST
        assert r.registry.seen == []


async def test_a_manifest_head_miss_learns_the_tag_of_a_cached_manifest(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await r.client.get(DIGEST_PATH, headers=ACCEPT)
        head = await r.client.head(TAG_PATH, headers=ACCEPT)
        assert head.status_code == 200
        assert r.store.index.tags[("docker.io", REPO, "latest")].digest == MANIFEST_DIGEST


async def test_a_stale_tag_is_revalidated_with_a_head(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.seen.clear()
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.headers["x-vpsrelay-cache"] == "revalidated"
        assert response.content == MANIFEST
        assert [q.method for q in r.registry.seen] == ["HEAD"]
        assert r.store.index.tags[("docker.io", REPO, "latest")].checked_at > time.time() - 60


async def test_a_moved_tag_is_fetched_again(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.tags["latest"] = OTHER_DIGEST
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.headers["x-vpsrelay-cache"] == "miss"
        assert response.content == OTHER_MANIFEST
        assert r.store.index.tags[("docker.io", REPO, "latest")].digest == OTHER_DIGEST


async def test_a_tag_moved_to_a_cached_manifest_is_served_from_the_cache(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        await r.client.get(f"/v2/alpine/manifests/{OTHER_DIGEST}", headers=ACCEPT)
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.tags["latest"] = OTHER_DIGEST
        r.registry.seen.clear()
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.headers["x-vpsrelay-cache"] == "hit"
        assert response.content == OTHER_MANIFEST
        assert [q.method for q in r.registry.seen] == ["HEAD"]


async def test_a_manifest_the_client_does_not_accept_is_asked_for_again(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        r.registry.seen.clear()
        response = await r.client.get(
            TAG_PATH, headers={"accept": "application/vnd.docker.distribution.manifest.v2+json"}
        )
        assert response.status_code == 200  # the stand-in ignores Accept
        assert response.headers["x-vpsrelay-cache"] == "miss"
        assert len(r.registry.requests("GET", "/manifests/")) == 1


async def test_a_manifest_not_matching_its_digest_is_refused_and_not_kept(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry()
    registry.manifests[MANIFEST_DIGEST] = OTHER_MANIFEST
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code >= 400
        assert response.json()["errors"]
        assert r.store.index.objects == {}
        assert r.store.index.tags == {}
        assert r.store.index.counters["digest_mismatches"] == 1


async def test_a_manifest_without_a_length_passes_through_uncached(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v2/":
            return httpx.Response(200, json={})
        return httpx.Response(
            200,
            headers={"content-type": MANIFEST_TYPE, "docker-content-digest": MANIFEST_DIGEST},
            stream=Chunks(MANIFEST),  # no content-length
        )

    registry = FakeRegistry()
    registry.handle = handler  # type: ignore[method-assign]
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.content == MANIFEST
        assert r.store.index.objects == {}


# --- the upstream down: stale answers


async def test_a_stale_tag_is_served_while_the_upstream_is_down(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.down = True
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.headers["x-vpsrelay-cache"] == "stale"
        assert response.headers["warning"].startswith("110 ")
        assert response.content == MANIFEST
        assert r.store.index.counters["stale_served"] == 1


async def test_a_stale_tag_is_served_while_the_upstream_fails(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.failing_status = 503
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.headers["x-vpsrelay-cache"] == "stale"
        head = await r.client.head(TAG_PATH, headers=ACCEPT)
        assert head.headers["x-vpsrelay-cache"] == "stale"
        assert head.content == b""


async def test_a_tag_older_than_max_stale_is_not_served_stale(tmp_path: Path) -> None:
    async with cached_relay(tmp_path, overrides={"cache.max_stale": 60}) as r:
        await fill_tag(r)
        forget_tag_check(r)
        r.registry.down = True
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 502
        assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
        r.registry.down = False
        r.registry.failing_status = 503
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 503


async def test_v2_is_answered_from_the_cache_while_the_upstream_is_down(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        down = await r.client.get("/v2/")
        assert down.status_code == 200  # passed through: the stand-in answers 200
        r.registry.down = True
        empty = await r.client.get("/v2/")
        assert empty.status_code == 502  # nothing cached: nothing to offer
        r.registry.down = False
        await fill_tag(r)
        r.registry.down = True
        offline = await r.client.get("/v2/")
        assert offline.status_code == 200
        assert offline.headers["x-vpsrelay-cache"] == "stale"
        r.registry.down = False
        r.registry.failing_status = 502
        failing = await r.client.get("/v2/")
        assert failing.status_code == 200
        assert failing.headers["x-vpsrelay-cache"] == "stale"


async def test_a_cached_blob_is_served_to_a_new_credential_while_the_upstream_is_down(
    tmp_path: Path,
) -> None:
    """Pulled anonymously before: the repository is public, anyone may read it offline."""
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        r.registry.down = True
        response = await r.client.get(BLOB_PATH, headers={"authorization": "Bearer someone"})
        assert response.status_code == 200
        assert response.content == BLOB
        assert r.store.index.counters["stale_served"] == 1


# --- who may read cached objects


async def test_a_new_credential_is_checked_with_the_upstream_then_granted(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        r.registry.seen.clear()
        bob = {"authorization": "Bearer bob"}
        first = await r.client.get(BLOB_PATH, headers=bob)
        assert first.headers["x-vpsrelay-cache"] == "hit"
        assert [(q.method, q.headers["authorization"]) for q in r.registry.seen] == [
            ("HEAD", "Bearer bob")
        ]
        r.registry.seen.clear()
        again = await r.client.get(BLOB_PATH, headers=bob)
        assert again.headers["x-vpsrelay-cache"] == "hit"
        assert r.registry.seen == []  # granted for auth_ttl


async def test_a_credential_the_upstream_refuses_never_reads_the_cache(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        await fill_tag(r)
        r.registry.refused.add("Bearer mallory")
        mallory = {"authorization": "Bearer mallory", **ACCEPT}
        blob = await r.client.get(BLOB_PATH, headers=mallory)
        manifest = await r.client.get(TAG_PATH, headers=mallory)
        by_digest = await r.client.get(DIGEST_PATH, headers=mallory)
        for response in (blob, manifest, by_digest):
            assert response.status_code == 401
            assert BLOB[:100] not in response.content
            assert MANIFEST not in response.content


async def test_a_repository_that_does_not_hold_a_blob_never_gets_it_from_the_cache(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        other = await r.client.get(f"/v2/someone/private/blobs/{BLOB_DIGEST}")
        assert other.status_code == 404
        assert r.registry.requests("HEAD", "/v2/someone/private/blobs/")


async def test_sharing_across_registries_serves_what_any_repository_holds(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(repositories={REPO, "library/busybox"})
    overrides: dict[str, object] = {"cache.share_across_registries": True}
    async with cached_relay(tmp_path, registry, overrides) as r:
        await fill_blob(r)
        r.registry.seen.clear()
        response = await r.client.get(f"/v2/busybox/blobs/{BLOB_DIGEST}")
        assert response.headers["x-vpsrelay-cache"] == "hit"
        assert [q.method for q in r.registry.seen] == ["HEAD"]  # a repository of its own


async def test_a_joiner_the_upstream_refuses_is_not_served_the_fill(tmp_path: Path) -> None:
    registry = FakeRegistry(gate=trio.Event())
    registry.refused.add("Bearer mallory")
    async with cached_relay(tmp_path, registry) as r:
        answers: dict[str, httpx.Response] = {}

        async def pull(name: str, headers: dict[str, str]) -> None:
            answers[name] = await r.client.get(BLOB_PATH, headers=headers)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pull, "leader", {})
            try:
                await wait_for_fill(r, FillState.STREAMING)
                await pull("mallory", {"authorization": "Bearer mallory"})
            finally:
                assert registry.gate is not None
                registry.gate.set()
        assert answers["mallory"].status_code == 401
        assert answers["leader"].content == BLOB


async def test_a_public_repository_is_learnt_through_an_anonymous_token(tmp_path: Path) -> None:
    registry = FakeRegistry(token_realm=True)
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(
            TAG_PATH, headers={"authorization": "Bearer user-token", **ACCEPT}
        )
        assert response.status_code == 200
        assert ("docker.io", REPO) in r.store.index.public
        token_requests = [q for q in registry.seen if q.url.host == "auth.test"]
        assert len(token_requests) == 1
        assert token_requests[0].url.params["scope"] == f"repository:{REPO}:pull"
        assert "authorization" not in token_requests[0].headers
        probe = registry.requests("HEAD", "/manifests/")
        assert probe[-1].headers["authorization"] == "Bearer anon-token"


@pytest.mark.parametrize(
    ("service", "answer", "public"),
    [
        (None, (200, b'{"access_token": "anon-token"}'), True),
        ("hub", (401, b"{}"), False),
        ("hub", (200, b"not json"), False),
        ("hub", (200, b'["a list"]'), False),
        ("hub", (200, b'{"token": ""}'), False),
    ],
)
async def test_a_token_realm_that_gives_no_anonymous_token_means_not_public(
    tmp_path: Path, service: str | None, answer: tuple[int, bytes], public: bool
) -> None:
    registry = FakeRegistry(token_realm=True, token_service=service, token_answer=answer)
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(
            TAG_PATH, headers={"authorization": "Bearer user-token", **ACCEPT}
        )
        assert response.status_code == 200
        assert (("docker.io", REPO) in r.store.index.public) is public
        (token_request,) = [q for q in registry.seen if q.url.host == "auth.test"]
        assert ("service" in token_request.url.params) is (service is not None)


async def test_a_public_probe_that_fails_leaves_the_repository_unknown(tmp_path: Path) -> None:
    registry = FakeRegistry(token_realm=True)
    original = registry.handle

    def token_service_down(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            raise httpx.ConnectError("refused", request=request)
        return original(request)

    registry.handle = token_service_down  # type: ignore[method-assign]
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(
            TAG_PATH, headers={"authorization": "Bearer user-token", **ACCEPT}
        )
        assert response.status_code == 200
        assert r.store.index.public == {}


async def test_a_private_blob_is_not_served_to_a_new_credential_while_the_upstream_is_down(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        bob = {"authorization": "Bearer bob"}
        filled = await r.client.get(BLOB_PATH, headers=bob)
        assert filled.headers["x-vpsrelay-cache"] == "miss"
        assert r.store.index.public == {}  # pulled with credentials: not known public
        r.registry.down = True
        carol = await r.client.get(BLOB_PATH, headers={"authorization": "Bearer carol"})
        assert carol.status_code == 502
        assert BLOB[:100] not in carol.content
        again = await r.client.get(BLOB_PATH, headers=bob)  # granted, and it holds the blob
        assert again.content == BLOB


async def test_a_public_blob_is_served_while_the_upstream_answers_errors(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        await fill_blob(r)
        r.registry.failing_status = 503
        response = await r.client.get(BLOB_PATH, headers={"authorization": "Bearer someone"})
        assert response.status_code == 200
        assert response.content == BLOB


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_cached_manifest_whose_file_vanished_is_fetched_from_the_upstream(
    tmp_path: Path, method: str
) -> None:
    """Never a failed pull because of the cache: the body is read before the answer
    commits to a hit, and a store that cannot deliver it means the upstream's answer."""
    async with cached_relay(tmp_path) as r:
        await fill_tag(r)
        r.store._manifests.forget(MANIFEST_DIGEST)  # not in memory, and gone from disk
        r.store.path(MANIFEST_DIGEST).unlink()
        response = await r.client.request(method, TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.headers.get("x-vpsrelay-cache") in ("miss", None)  # HEAD: relayed
        assert response.headers["docker-content-digest"] == MANIFEST_DIGEST
        assert response.content == (MANIFEST if method == "GET" else b"")
        assert r.registry.requests(method, "/manifests/")
        again = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert again.status_code == 200
        assert again.content == MANIFEST


# --- what an upstream leaves out


async def test_a_manifest_without_a_digest_header_is_kept_under_the_digest_of_its_bytes(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(manifest_digest_header=False)
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.content == MANIFEST
        assert r.store.get(MANIFEST_DIGEST) is not None
        assert r.store.index.tags[("docker.io", REPO, "latest")].digest == MANIFEST_DIGEST


async def test_a_manifest_without_a_content_type_is_relayed_but_not_kept(tmp_path: Path) -> None:
    registry = FakeRegistry(manifest_type=None)
    async with cached_relay(tmp_path, registry) as r:
        response = await r.client.get(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.content == MANIFEST
        assert r.store.get(MANIFEST_DIGEST) is None
        assert ("docker.io", REPO, "latest") not in r.store.index.tags


async def test_a_head_of_an_uncached_tag_records_nothing(tmp_path: Path) -> None:
    async with cached_relay(tmp_path) as r:
        response = await r.client.head(TAG_PATH, headers=ACCEPT)
        assert response.status_code == 200
        assert response.headers["docker-content-digest"] == MANIFEST_DIGEST
        assert r.store.index.tags == {}
        assert r.store.get(MANIFEST_DIGEST) is None


async def test_a_registry_without_tokens_is_asked_anonymously_whether_a_repository_is_public(
    tmp_path: Path,
) -> None:
    async with cached_relay(tmp_path) as r:
        response = await r.client.get(
            TAG_PATH, headers={**ACCEPT, "authorization": "Bearer the-clients-own-token"}
        )
        assert response.status_code == 200
        probes = [
            request
            for request in r.registry.requests("HEAD", "/manifests/")
            if "authorization" not in request.headers
        ]
        assert len(probes) == 1  # the probe, without anyone's credentials
        assert r.registry.requests(path_part="/token") == []
        assert ("docker.io", REPO) in r.store.index.public
