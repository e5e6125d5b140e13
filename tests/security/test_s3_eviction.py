"""Eviction across nodes never deletes an object in use (issue 15).

The handshake (`vpsrelay/cache/s3/evict.py`): the evictor writes a tombstone per victim,
then reads the access batches once more; a node writes an access record, then looks for
the tombstone. Both orderings are forced here by driving an `Evictor`'s steps against the
real SeaweedFS bucket, with a real node (in-process `S3Store`, or a relay process) reading
the victim in between; then two relay processes pull while eviction runs, and a dead
evictor's tombstone is cleared by the next pass. What a client (anonymous, wrong
credentials) can make a node write is bounded too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.infra.faultproxy import FaultProxy
from tests.integration.test_cache import MiB, host, push_unique, sub, wait_until
from tests.integration.test_pull import anonymous_token, assert_blobs_pulled, skopeo_copy
from tests.integration.test_s3_cache import (  # the fixtures, shared
    FAST_EVICTION,
    GRACE as GRACE_OF_NODES,
    PREFIX,
    blob_key,
    bucket,
    node,
    s3_env,
    seaweed,
)
from vpsrelay import config
from vpsrelay.cache.index import Obj
from vpsrelay.cache.s3.client import S3Client, S3Error
from vpsrelay.cache.s3.evict import (
    EVICT_LEASE,
    MAX_BATCH,
    TOMBSTONE_MEMORY,
    Evictor,
    LeaseLapsed,
    _first_s3_error,
)
from vpsrelay.cache.s3.lease import Leases, LeaseState
from vpsrelay.cache.s3.store import S3Store
from vpsrelay.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import BuiltImage
    from tests.infra.relay import RelayProcess
    from tests.infra.seaweed import Seaweed

__all__ = ["bucket", "seaweed"]  # fixtures
GRACE = 1.0  # the in-process evictor's: objects older than this are victims


def _settings(seaweed: Seaweed, bucket: str, **extra: str) -> config.Settings:
    env = s3_env(seaweed, bucket, **extra)
    return config.load(None, {f"VPSRELAY_CACHE__{k.upper()}": v for k, v in env.items()})


def _evictor(
    seaweed: Seaweed, bucket: str, client: S3Client, name: str = "evictor", **change: Any
) -> Evictor:
    """An evictor with a tiny cap: every object older than `GRACE` is a victim. It is
    driven by the test (no batches every interval), so the config check of the grace
    against the batch rhythm does not apply: its fields are set after loading."""
    s3 = _settings(seaweed, bucket, s3__max_size="1KiB").cache.s3
    s3 = dataclasses.replace(s3, evict_grace=GRACE, **change)
    return Evictor(client, Leases(client, PREFIX, name, s3.lease_ttl), s3, name)


def _batches(seaweed: Seaweed, bucket: str) -> dict[str, int]:
    return seaweed.keys(bucket, f"{PREFIX}access/batch-")


def _put_blob(seaweed: Seaweed, bucket: str, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert seaweed.request("PUT", f"/{bucket}/{blob_key(digest)}", data).status_code == 200
    return digest, data


def _in_bucket(seaweed: Seaweed, bucket: str, digest: str) -> bool:
    return seaweed.request("HEAD", f"/{bucket}/{blob_key(digest)}").status_code == 200


def _tombstones(seaweed: Seaweed, bucket: str) -> dict[str, int]:
    return seaweed.keys(bucket, f"{PREFIX}evicting/")


def _layer(image: BuiltImage) -> tuple[str, bytes]:
    layer = max(image.layers, key=lambda blob: blob.size)
    return layer.digest, (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()


def _get(relay: RelayProcess, repository: str, digest: str) -> httpx.Response:
    """A client's GET of a blob through `relay`, following a redirect to the bucket."""
    token = anonymous_token(relay, repository)
    return httpx.get(
        f"{relay.url}/v2/{repository}/blobs/{digest}",
        headers={"authorization": f"Bearer {token}"},
        follow_redirects=True,
        timeout=30,
    )


def _log_lines(relay: RelayProcess, digest: str) -> list[str]:
    return [line for line in relay.log_text().splitlines() if f"/blobs/{digest}" in line]


def _passed_through(access_line: str) -> bool:
    """An access log line of a blob GET sent by the upstream, not the cache."""
    return (
        "status=200" in access_line
        and "upstream_status=200" in access_line
        and ("cache=" not in access_line)
    )


@pytest.mark.integration
async def test_a_read_that_began_before_the_pass_is_spared(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Ordering "record first": a node begins to stream an object older than the grace
    (its access record reaches the bucket before any tombstone), then a whole pass runs:
    the object is spared and the read completes byte-exact; an old object nobody reads
    is evicted by the same pass."""
    served, served_bytes = _put_blob(seaweed, bucket, 3 * MiB)
    idle, _ = _put_blob(seaweed, bucket, 64 * 1024)
    await trio.sleep(GRACE + 1.1)  # both older than the grace (Last-Modified: whole seconds)
    settings = _settings(seaweed, bucket)
    store = await S3Store.connect(tmp_path, settings.cache)
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    try:
        store.index.add(served, Obj(len(served_bytes), time.time(), "blob"))
        assert await store.locate(served, fill=False, read=True) is not None
        reader = store.open(served)
        assert reader is not None
        got = bytearray(await reader.read(0, 256 * 1024))

        deleted = await _evictor(seaweed, bucket, client).run_pass()

        assert idle in deleted, deleted  # the pass does evict
        assert served not in deleted
        assert _in_bucket(seaweed, bucket, served)
        for _ in range(100):  # bounded: 3 MiB in 256 KiB reads
            if len(got) == len(served_bytes):
                break
            got += await reader.read(len(got), 256 * 1024)
        reader.close()
        assert bytes(got) == served_bytes
        assert _tombstones(seaweed, bucket) == {}
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            await store.aclose()


@pytest.mark.integration
async def test_a_record_written_after_the_plan_spares_its_victim(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """The pass picked the object as a victim; a node then begins to read it (its record
    is written before the tombstones): the last look finds the record and spares it."""
    served, served_bytes = _put_blob(seaweed, bucket, 1 * MiB)
    await trio.sleep(GRACE + 1.1)
    store = await S3Store.connect(tmp_path, _settings(seaweed, bucket).cache)
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    evictor = _evictor(seaweed, bucket, client)
    try:
        state = await evictor.plan()
        assert served in state.victims
        store.index.add(served, Obj(len(served_bytes), time.time(), "blob"))
        assert await store.locate(served, fill=False, read=True) is not None
        await evictor.mark(state)
        await evictor.last_look(state)
        assert served not in state.victims
        await evictor.delete_victims(state)
        await evictor.finish(state)
        await evictor.unmark(state)
        reader = store.open(served)
        assert reader is not None
        assert await reader.read(0, len(served_bytes)) == served_bytes
        reader.close()
        assert _in_bucket(seaweed, bucket, served)
        assert _tombstones(seaweed, bucket) == {}
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            await store.aclose()


@pytest.mark.integration
async def test_a_redirect_given_before_the_pass_is_followed_after_it(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """A relay process in redirect mode answers a GET of an object older than the grace
    with a presigned URL; a whole pass runs before the client follows it: the client
    still gets the object (the node's access record reached the bucket before it
    answered), and an old object nobody asked for is evicted."""
    image = push_unique(clean_hub, tmp_path, "someuser/redirected", 1 * MiB)
    other = push_unique(clean_hub, tmp_path, "someuser/unasked", 1 * MiB)
    digest, data = _layer(image)
    unasked, _ = _layer(other)
    redirect = {"s3__redirect": "true", "s3__redirect_min_size": "1"}
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    try:
        with node(tmp_path / "a", clean_hub, seaweed, bucket, **redirect) as a:
            for repo in ("redirected", "unasked"):
                out = sub(tmp_path / repo)
                await trio.to_thread.run_sync(skopeo_copy, out, f"{host(a)}/someuser/{repo}:1")
            await trio.sleep(GRACE + 1.1)
            token = anonymous_token(a, "someuser/redirected")
            answer = await trio.to_thread.run_sync(
                lambda: httpx.get(
                    f"{a.url}/v2/someuser/redirected/blobs/{digest}",
                    headers={"authorization": f"Bearer {token}"},
                )
            )
            assert answer.status_code == 307, answer.text
            deleted = await _evictor(seaweed, bucket, client).run_pass()
            followed = await trio.to_thread.run_sync(
                lambda: httpx.get(answer.headers["location"], timeout=30)
            )
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
    assert followed.status_code == 200  # main: 404, the object was deleted meanwhile
    assert followed.content == data
    assert unasked in deleted, deleted
    assert digest not in deleted


@pytest.mark.integration
async def test_a_node_that_finds_a_tombstone_passes_through(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Ordering "tombstone first", against a relay process in redirect mode: while the
    evictor's tombstones exist the node neither streams nor redirects to the victims, it
    passes the GET through (200, byte-exact, not a hit). A request before the last look
    gets its object spared (its record is seen); one after it does not, and that object is
    deleted while the client reads from the upstream. No client ever gets a 404."""
    first = push_unique(clean_hub, tmp_path, "someuser/marked1", 1 * MiB)
    second = push_unique(clean_hub, tmp_path, "someuser/marked2", 1 * MiB)
    (one, one_bytes), (two, two_bytes) = _layer(first), _layer(second)
    redirect = {"s3__redirect": "true", "s3__redirect_min_size": "1", "s3__lease_ttl": "30"}
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    evictor = _evictor(seaweed, bucket, client)
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **redirect) as a:
        for image, repo in ((first, "marked1"), (second, "marked2")):
            out = sub(tmp_path / repo)
            await trio.to_thread.run_sync(skopeo_copy, out, f"{host(a)}/someuser/{repo}:1")
            assert_blobs_pulled(out, image)
        await trio.sleep(GRACE + 1.1)
        try:
            # this test is the pass: node A's own passes (every 60 s) keep off
            assert await evictor.leases.take(EVICT_LEASE) is LeaseState.MINE
            state = await evictor.plan()
            assert {one, two} <= set(state.victims)
            await evictor.mark(state)

            before = await trio.to_thread.run_sync(_get, a, "someuser/marked1", one)
            looked = time.monotonic()
            assert before.status_code == 200
            assert before.content == one_bytes
            assert before.history == []  # not redirected to the bucket
            assert before.headers.get("x-vpsrelay-cache") is None  # passed through
            assert "being evicted" in a.log_text()

            await evictor.last_look(state)
            assert one not in state.victims  # A's record was seen: spared
            assert two in state.victims

            after = await trio.to_thread.run_sync(_get, a, "someuser/marked2", two)
            assert after.status_code == 200
            assert after.content == two_bytes
            assert after.history == []
            await evictor.delete_victims(state)
            await evictor.finish(state)
        finally:
            with trio.CancelScope(shield=True):
                await evictor.unmark(state)
                await evictor.leases.release(EVICT_LEASE)
                await client.aclose()
        assert two in state.deleted
        assert not _in_bucket(seaweed, bucket, two)
        assert _in_bucket(seaweed, bucket, one)
        assert _tombstones(seaweed, bucket) == {}

        # The pass is over: the spared object is a hit again (a redirect to the bucket)
        # once the node forgot the tombstone it found (its next batch, or 10 s), the
        # evicted one is fetched from the upstream; every answer a 200.
        await trio.sleep(max(0.0, looked + TOMBSTONE_MEMORY + 0.5 - time.monotonic()))
        hit = await trio.to_thread.run_sync(_get, a, "someuser/marked1", one)
        assert hit.status_code == 200
        assert hit.content == one_bytes
        assert [r.status_code for r in hit.history] == [307]
        gone = await trio.to_thread.run_sync(_get, a, "someuser/marked2", two)
        assert gone.status_code == 200
        assert gone.content == two_bytes
        out = sub(tmp_path / "again")
        await trio.to_thread.run_sync(skopeo_copy, out, f"{host(a)}/someuser/marked2:1")
        assert_blobs_pulled(out, second)
        lines = _log_lines(a, one) + _log_lines(a, two)
    assert lines, "no access log lines"
    assert not [line for line in lines if "status=404" in line], lines
    for digest in (one, two):  # the GETs while the tombstones stood: from the upstream
        relayed = [line for line in _log_lines(a, digest) if _passed_through(line)]
        assert relayed, _log_lines(a, digest)
    assert a.log_text().count("being evicted") == 2  # one look per request


@pytest.mark.integration
async def test_a_pass_that_lost_its_lease_deletes_nothing(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Evictor A plans and writes its tombstones, then freezes past its lease. B takes the
    lease over, clears A's tombstones; a node begins to read A's victim (no tombstone:
    it reads); B's next pass folds that node's record and deletes its batch. A thaws: its
    last look finds a batch it had read gone (another pass ran) and spares everything,
    and its deletes, even of victims it still had, are refused: its lease is not
    renewed. Main deleted the object under the read."""
    victim, victim_bytes = _put_blob(seaweed, bucket, 256 * 1024)
    other = f"/{bucket}/{PREFIX}access/batch-other-00000001.json"
    assert seaweed.request("PUT", other, b"{}").status_code == 200
    await trio.sleep(GRACE + 1.1)
    store = await S3Store.connect(tmp_path, _settings(seaweed, bucket).cache)
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    a = _evictor(seaweed, bucket, client, "a", lease_ttl=1.0)
    b = _evictor(seaweed, bucket, client, "b", lease_ttl=1.0, max_size=0)
    try:
        assert await a.leases.take(EVICT_LEASE) is LeaseState.MINE
        state = await a.plan()
        assert victim in state.victims
        await a.mark(state)
        await trio.sleep(2.5)  # A freezes: its lease lapses (whole seconds in the store)

        assert await b.run_pass() == []  # takes over, clears A's tombstones, folds
        assert _tombstones(seaweed, bucket) == {}
        store.index.add(victim, Obj(len(victim_bytes), time.time(), "blob"))
        assert await store.locate(victim, fill=False, read=True) is not None  # reads
        await b.run_pass()  # folds the node's record and deletes its batch
        assert _batches(seaweed, bucket) == {}

        await a.last_look(state)  # A thaws
        assert state.victims == []
        state.victims = [victim]  # had it missed that, its deletes are still refused
        with pytest.raises(LeaseLapsed):
            await a.delete_victims(state)
        assert state.deleted == []
        assert _in_bucket(seaweed, bucket, victim)
        reader = store.open(victim)
        assert reader is not None
        assert await reader.read(0, len(victim_bytes)) == victim_bytes
        reader.close()
    finally:
        with trio.CancelScope(shield=True):
            await a.unmark(state)
            await client.aclose()
            await store.aclose()


@pytest.mark.integration
async def test_planted_access_batches_do_not_stop_eviction(seaweed: Seaweed, bucket: str) -> None:
    """A bucket writer plants a batch over `MAX_BATCH`, one that is not JSON and one that
    says an object was read at Infinity: the pass ignores them, evicts the old object
    and deletes the three (main: the pass failed at the big one, every pass after it)."""
    old, _ = _put_blob(seaweed, bucket, 64 * 1024)
    await trio.sleep(GRACE + 1.1)
    planted = {
        "batch-zz-00000001.json": b"{" + b" " * MAX_BATCH + b"}",
        "batch-zz-00000002.json": b"not json",
        "batch-zz-00000003.json": f'{{"{old}": Infinity}}'.encode(),
    }
    for name, body in planted.items():
        answer = seaweed.request("PUT", f"/{bucket}/{PREFIX}access/{name}", body)
        assert answer.status_code == 200
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    try:
        deleted = await _evictor(seaweed, bucket, client).run_pass()
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
    assert deleted == [old]
    assert not _in_bucket(seaweed, bucket, old)
    assert _batches(seaweed, bucket) == {}


class _MergedFailsOnce(S3Client):
    """The real client, whose first read of `merged.json` fails as a timeout would (a fault
    injected at the client's edge; SeaweedFS cannot fail one key's GET)."""

    failed = False

    async def get_small(self, key: str, limit: int) -> bytes | None:
        if key.endswith("merged.json") and not self.failed:
            self.failed = True
            raise S3Error(f"GET {key}: deadline")
        return await super().get_small(key, limit)


@pytest.mark.integration
async def test_one_failed_read_of_the_history_does_not_wipe_it(
    seaweed: Seaweed, bucket: str
) -> None:
    """`merged.json` holds a recent read of an old object; the pass cannot read it once:
    it evicts nothing and keeps the history as it is (it used to rewrite `merged.json`
    from the batches alone, so the next pass took the object for unread and deleted it,
    perhaps under a read). The next pass reads it, spares the object, evicts the other."""
    read_lately, _ = _put_blob(seaweed, bucket, 4096)
    unread, _ = _put_blob(seaweed, bucket, 4096)
    await trio.sleep(GRACE + 1.1)  # both uploaded before the grace
    merged = f"/{bucket}/{PREFIX}access/merged.json"
    history = json.dumps({read_lately: time.time()}).encode()
    assert seaweed.request("PUT", merged, history).status_code == 200
    client = _MergedFailsOnce(seaweed.endpoint, bucket, seaweed.signer)
    try:
        evictor = _evictor(seaweed, bucket, client)
        assert await evictor.run_pass() == []
        assert client.failed
        assert seaweed.request("GET", merged).content == history  # kept as it was
        assert await evictor.run_pass() == [unread]
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
    assert _in_bucket(seaweed, bucket, read_lately)


@pytest.mark.integration
async def test_a_tombstone_found_is_remembered_until_the_next_batch(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """While a tombstone stands, a node's reads of its object cost one access record per
    batch, not one each (main: 15 records for 15 requests): sequential and concurrent
    requests pass through on the first look's answer."""
    digest, data = _put_blob(seaweed, bucket, 64 * 1024)
    store = await S3Store.connect(tmp_path, _settings(seaweed, bucket).cache)
    store.index.add(digest, Obj(len(data), time.time(), "blob"))
    tombstone = f"/{bucket}/{store.evictor.tombstone_key(digest)}"
    assert seaweed.request("PUT", tombstone, b"").status_code == 200
    looks: list[object] = []

    async def look() -> None:
        looks.append(await store.locate(digest, fill=False, read=True))

    try:
        for _ in range(10):
            await look()
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(look)
        assert looks == [None] * 15  # passed through
        assert len(_batches(seaweed, bucket)) == 1
        await store.evictor.write_batch(set())  # the next batch: look again
        assert await store.locate(digest, fill=False, read=True) is None
        assert len(_batches(seaweed, bucket)) == 2
        assert seaweed.request("DELETE", tombstone).status_code == 204
        await store.evictor.write_batch(set())
        hit = await store.locate(digest, fill=False, read=True)
        assert hit is not None  # the pass is over: a hit again
        assert store.bucket_ok
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


@pytest.mark.integration
async def test_a_record_the_bucket_does_not_answer_passes_through_once_for_all(
    seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """The bucket does not answer the access record's PUT in time (the store goes silent,
    timeout 1 s): the requests for that blob pass through after one deadline, not one each
    (5 concurrent requests, one PUT: they wait for the first and take its outcome), and
    the bucket is marked failing, as for any request it does not answer."""
    digest, data = _put_blob(seaweed, bucket, 1024)
    with FaultProxy((seaweed.host, seaweed.s3_port)) as proxy:
        settings = _settings(seaweed, bucket, s3__endpoint=proxy.endpoint, s3__timeout="1")
        store = await S3Store.connect(tmp_path, settings.cache)
        try:
            assert store.bucket_ok
            store.index.add(digest, Obj(len(data), time.time(), "blob"))
            proxy.set_mode("hang")
            written_before = store.evictor._batches  # numbers every record PUT it sends
            found: list[object] = []

            async def request() -> None:
                found.append(await store.locate(digest, fill=False, read=True))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for _ in range(5):
                        nursery.start_soon(request)
            assert found == [None] * 5
            # one record PUT for all five, and no retry (the proxy's count of reads is no
            # measure: a PUT's headers and body may reach it in two)
            assert store.evictor._batches - written_before == 1
            assert store.bucket_state() == "failing: deadline"
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()


@pytest.mark.integration
def test_two_nodes_pulling_while_eviction_runs(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Cap 2.5 MiB, three images of a 1 MiB layer, passes every half second: each image
    is pulled through one node and at once through the other (a hit: streamed by A, a
    redirect to the bucket by B); once they are all older than the grace, the first two
    again, twice, while the passes evict the oldest. Every pull is byte-exact, nothing
    vanishes under a read, and the bucket ends under its cap."""
    images = [push_unique(clean_hub, tmp_path, f"someuser/churn{i}", 1 * MiB) for i in range(3)]
    cap = int(2.5 * MiB)
    env = {"s3__max_size": str(cap), **FAST_EVICTION}
    redirect = {"s3__redirect": "true", "s3__redirect_min_size": "1", "s3__redirect_expiry": "2"}

    def total() -> int:
        return sum(seaweed.keys(bucket, f"{PREFIX}blobs/").values())

    with (
        node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a,
        node(tmp_path / "b", clean_hub, seaweed, bucket, **env, **redirect) as b,
    ):
        pulls = 0
        for turn in range(3):  # bounded: 14 pulls
            if turn == 1:
                time.sleep(GRACE_OF_NODES + 1)  # all older than the grace: victims now
            # after the first turn the third image is never read again: it goes for good
            for i, image in enumerate(images if turn == 0 else images[:2]):
                for relay in (a, b) if turn % 2 == 0 else (b, a):
                    out = sub(tmp_path / f"pull-{turn}-{i}-{relay.port}")
                    skopeo_copy(out, f"{host(relay)}/someuser/churn{i}:1")
                    assert_blobs_pulled(out, image)
                    pulls += 1
        assert pulls == 14
        assert wait_until(lambda: total() <= cap, 15), total()
        assert wait_until(lambda: _tombstones(seaweed, bucket) == {}, 5)
        logs = a.log_text() + b.log_text()
    assert "evicted" in logs
    for vanished in ("ended early", "does not match", "Traceback"):
        assert vanished not in logs, vanished
    layers = [_layer(image)[0] for image in images]
    streamed = [line for d in layers for line in _log_lines(a, d) if "cache=hit" in line]
    # The relay follows an upstream's redirects itself: a 307 is a presigned URL (its
    # access line may lack `cache=hit`: it is logged as the answer ends, maybe first).
    redirected = [line for d in layers for line in _log_lines(b, d) if "status=307" in line]
    assert streamed, "node A streamed no layer from the bucket"
    assert redirected, "node B redirected no layer to the bucket"


@pytest.mark.integration
async def test_a_dead_evictors_tombstones_hold_an_object_back_one_pass_at_most(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """An evictor writes its tombstones and dies (its lease is never renewed nor
    released): node A passes the object through while they stand, and its next pass,
    once the lease lapsed (3 s), removes them; the object is a hit again."""
    image = push_unique(clean_hub, tmp_path, "someuser/orphaned", 1 * MiB)
    digest, data = _layer(image)
    env = {"s3__evict_interval": "1", "s3__evict_grace": "100"}  # no max_size: no eviction
    client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
    dead = _evictor(seaweed, bucket, client)
    try:
        with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
            out = sub(tmp_path / "fill")
            await trio.to_thread.run_sync(skopeo_copy, out, f"{host(a)}/someuser/orphaned:1")
            await trio.sleep(GRACE + 1.1)
            taken = await dead.leases.take(EVICT_LEASE)
            for _ in range(50):  # node A may hold it for a pass: bounded, 5 s
                if taken is not LeaseState.OTHER:
                    break
                await trio.sleep(0.1)
                taken = await dead.leases.take(EVICT_LEASE)
            assert taken is not LeaseState.OTHER
            state = await dead.plan()
            assert digest in state.victims
            await dead.mark(state)  # and dies here
            marked = time.monotonic()
            held = await trio.to_thread.run_sync(_get, a, "someuser/orphaned", digest)
            assert held.status_code == 200
            assert held.content == data
            assert held.headers.get("x-vpsrelay-cache") is None  # passed through
            cleared = await trio.to_thread.run_sync(
                lambda: wait_until(lambda: _tombstones(seaweed, bucket) == {}, 15)
            )
            took = time.monotonic() - marked
            assert cleared, a.log_text()[-2000:]
            assert took < 12, took  # lease_ttl 3 s + the store's clock + a pass, with slack
            again = await trio.to_thread.run_sync(_get, a, "someuser/orphaned", digest)
            assert again.status_code == 200
            assert again.content == data
            assert again.headers.get("x-vpsrelay-cache") == "hit"
            assert "removed" in a.log_text()
            assert "tombstone" in a.log_text()
            assert _in_bucket(seaweed, bucket, digest)
            # without a cap of its own, node A still folds the access records (another
            # node may evict): they do not pile up in the bucket
            folded = await trio.to_thread.run_sync(
                lambda: wait_until(lambda: not seaweed.keys(bucket, f"{PREFIX}access/batch-"), 10)
            )
            assert folded, seaweed.keys(bucket, f"{PREFIX}access/")
            assert f"{PREFIX}access/merged.json" in seaweed.keys(bucket, f"{PREFIX}access/")
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


@pytest.mark.integration
def test_clients_cannot_make_a_node_write_access_records(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Refused clients (anonymous, a wrong token) reach no bucket write; an authorized
    client's GETs of one cached object cost one access record per `evict_grace / 2`,
    however many it sends."""
    image = push_unique(clean_hub, tmp_path, "someuser/recorded", 1 * MiB)
    digest, data = _layer(image)

    def records() -> int:
        return len(seaweed.keys(bucket, f"{PREFIX}access/batch-"))

    # batches every 600 s: the count below sees the GETs' records only
    quiet = {"s3__evict_interval": "600", "s3__evict_grace": "3600"}
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **quiet) as a:
        skopeo_copy(sub(tmp_path / "fill"), f"{host(a)}/someuser/recorded:1")
        url = f"{a.url}/v2/someuser/recorded/blobs/{digest}"
        before = records()
        with httpx.Client(timeout=10) as client:
            for _ in range(20):  # bounded
                assert client.get(url).status_code == 401
                wrong = client.get(url, headers={"authorization": "Bearer not-a-token"})
                assert wrong.status_code == 401
            assert records() == before
            token = anonymous_token(a, "someuser/recorded")
            for _ in range(20):  # bounded
                answer = client.get(url, headers={"authorization": f"Bearer {token}"})
                assert answer.status_code == 200
                assert answer.content == data
                assert answer.headers.get("x-vpsrelay-cache") == "hit"
        assert records() == before + 1


def test_the_grace_covers_two_batch_gaps_with_the_upkeep() -> None:
    """A node writes its batch every interval, cut after `timeout` (apart from its
    passes): batches come at most interval + timeout apart, and a record covers a read
    for half the grace. Interval 60 s, timeout 30 s: grace over 180 s."""
    env = {
        "VPSRELAY_CACHE__BACKEND": "s3",
        "VPSRELAY_CACHE__S3__ENDPOINT": "http://127.0.0.1:9",
        "VPSRELAY_CACHE__S3__BUCKET": "relay-cache",
        "VPSRELAY_CACHE__S3__ACCESS_KEY": "k",
        "VPSRELAY_CACHE__S3__SECRET_KEY": "s",
        "VPSRELAY_CACHE__S3__EVICT_INTERVAL": "60",
    }
    for grace in ("121", "180"):  # 121: accepted before (twice the interval only)
        with pytest.raises(ConfigError, match="evict_grace: must be more than 180 s") as caught:
            config.load(None, {**env, "VPSRELAY_CACHE__S3__EVICT_GRACE": grace})
        assert "\n" not in str(caught.value)
    loaded = config.load(None, {**env, "VPSRELAY_CACHE__S3__EVICT_GRACE": "181"})
    assert loaded.cache.s3.evict_grace == 181
    short = {**env, "VPSRELAY_CACHE__S3__TIMEOUT": "5", "VPSRELAY_CACHE__S3__EVICT_GRACE": "131"}
    assert config.load(None, short).cache.s3.evict_grace == 131  # 2 x (60 + 5)


def test_a_pass_error_reaches_the_store_as_an_s3_error() -> None:
    """trio groups the errors of a nursery's tasks; the store catches `S3Error`."""
    error = S3Error("LIST relay/evicting/: deadline")
    assert _first_s3_error(BaseExceptionGroup("pass", [ExceptionGroup("each", [error])])) is error
    assert _first_s3_error(BaseExceptionGroup("pass", [error, KeyError("x")])) is None
    assert _first_s3_error(BaseExceptionGroup("pass", [KeyError("x")])) is None
