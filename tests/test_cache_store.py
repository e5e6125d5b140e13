"""The blob store on a real directory: commit only verified bytes, crash leftovers, index."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
import trio
import trio.lowlevel

from tests.infra.tmpfs import fill_up, mounted_tmpfs
from vpsrelay.cache.storage import FillState, StoreSpill
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig
from vpsrelay.errors import DigestMismatch, UpstreamError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

BODY = b"0123456789abcdef" * 200_000  # 3.2 MB: several write batches
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


async def chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await trio.lowlevel.checkpoint()


async def test_verified_fill_is_committed_and_indexed(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, lead = store.claim(DIGEST)
    assert lead
    assert store.claim(DIGEST) == (fill, False)  # a second client joins
    assert await store.begin(fill, len(BODY), ())
    await store.pump(fill, chunks(BODY))
    assert fill.state is FillState.COMMITTED
    assert store.path(DIGEST).read_bytes() == BODY
    assert store.get(DIGEST) is not None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.reserved == 0
    await store.aclose()
    reopened = DiskStore.open_dir(tmp_path, CacheConfig())
    obj = reopened.get(DIGEST)
    assert obj is not None
    assert obj.size == len(BODY)
    assert reopened.index.counters["bytes_from_upstream"] == len(BODY)
    await reopened.aclose()


async def test_mismatch_is_never_committed(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, _ = store.claim(DIGEST)
    assert await store.begin(fill, len(BODY), ())
    bad = bytes([BODY[0] ^ 1]) + BODY[1:]
    with pytest.raises(DigestMismatch):
        await store.pump(fill, chunks(bad))
    assert fill.state is FillState.FAILED
    assert not store.path(DIGEST).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.index.counters["digest_mismatches"] == 1
    assert DIGEST not in store.fills
    await store.aclose()


async def test_short_body_is_never_committed(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, _ = store.claim(DIGEST)
    assert await store.begin(fill, len(BODY) + 1, ())
    with pytest.raises(UpstreamError):
        await store.pump(fill, chunks(BODY))
    assert not store.path(DIGEST).exists()
    await store.aclose()


async def test_cancelled_fill_leaves_nothing(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, _ = store.claim(DIGEST)
    assert await store.begin(fill, len(BODY), ())

    async def slow() -> AsyncIterator[bytes]:
        yield BODY[: 2 * 1024 * 1024]
        await trio.sleep_forever()

    with trio.move_on_after(0.5):
        await store.pump(fill, slow())
    assert fill.state is FillState.FAILED
    assert not store.path(DIGEST).exists()
    assert list((tmp_path / "tmp").iterdir()) == []
    await store.aclose()


async def test_open_removes_partials_and_reconciles(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    await store.aclose()
    (tmp_path / "tmp" / "deadbeef.1.1").write_bytes(b"partial")
    # A verified file whose index row was lost (crash between rename and index write).
    path = store.path(DIGEST)
    path.parent.mkdir(parents=True)
    path.write_bytes(BODY)
    reopened = DiskStore.open_dir(tmp_path, CacheConfig())
    assert list((tmp_path / "tmp").iterdir()) == []
    assert reopened.get(DIGEST) is not None
    await reopened.aclose()
    path.unlink()  # and the other way round: a row whose file is gone
    again = DiskStore.open_dir(tmp_path, CacheConfig())
    assert again.get(DIGEST) is None
    await again.aclose()


async def test_no_room_means_pass_through(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig(max_size=1024))
    fill, _ = store.claim(DIGEST)
    assert not await store.begin(fill, len(BODY), ())
    assert fill.state is FillState.DROPPED
    assert DIGEST not in store.fills
    assert store.index.counters["passthrough_no_space"] == 1
    await store.aclose()


async def test_small_objects_and_eviction(tmp_path: Path) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig(max_size=100, min_free=0))
    bodies = [bytes([i]) * 40 for i in range(3)]
    digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in bodies]
    for digest, body in zip(digests, bodies, strict=True):
        await store.put_small(digest, body, "manifest", "application/json")
        await trio.sleep(0.01)
    assert store.get(digests[0]) is None  # evicted, least recently used
    assert store.index.used <= 100
    assert await store.read_small(digests[2]) == bodies[2]
    with store.pinned(digests[1]):
        assert not await store.remove(digests[1])
    assert await store.remove(digests[1])
    assert await store.read_small(digests[1]) is None
    await store.aclose()


def test_index_keeps_the_used_total_through_changes_and_reloads(tmp_path: Path) -> None:
    from vpsrelay.cache.index import Database, Index, Obj

    index = Index()
    index.add("sha256:a", Obj(100, 1.0, "blob", ""))
    index.add("sha256:b", Obj(50, 1.0, "manifest", "x"))
    index.add("sha256:a", Obj(120, 2.0, "blob", ""))  # replaced, not added twice
    index.remove("sha256:b")
    index.remove("sha256:missing")
    assert index.used == 120 == sum(o.size for o in index.objects.values())
    database = Database(tmp_path / "cache.db")
    try:
        database.write(index.take_writes())
        assert database.load().used == 120
    finally:
        database.close()


async def test_a_full_disk_mid_fill_hands_the_rest_back(tmp_path: Path) -> None:
    """A real ENOSPC (a tmpfs filled by another writer mid-fill): nothing is committed, and
    what the disk did not take comes back to be passed through, in order, hashed."""
    with mounted_tmpfs(tmp_path / "small", "6m") as root:
        store = DiskStore.open_dir(root, CacheConfig(min_free=0))
        fill, _ = store.claim(DIGEST)
        assert await store.begin(fill, len(BODY), ())
        rest = BODY[:]

        async def body_then_disk_full() -> AsyncIterator[bytes]:
            nonlocal rest
            while rest:
                piece, rest = rest[: 64 * 1024], rest[64 * 1024 :]
                yield piece
                if fill.written and not (root / "filler").exists():
                    fill_up(root)  # another process takes the disk

        source = body_then_disk_full()
        with pytest.raises(StoreSpill) as spilled:
            await store.pump(fill, source)
        assert fill.state is FillState.FAILED
        assert fill.spilled
        written = fill.written
        assert 0 < written < len(BODY)
        unwritten = b"".join(spilled.value.pieces)
        remaining = b"".join([piece async for piece in source])
        assert unwritten + remaining == BODY[written:]  # nothing lost, nothing twice
        verifier = spilled.value.verifier
        verifier.update(remaining)
        verifier.finish()  # the pieces handed back were hashed in order
        assert not store.path(DIGEST).exists()
        assert list((root / "tmp").iterdir()) == []
        assert store.index.counters["write_errors"] == 1
        assert store.reserved == 0
        assert DIGEST not in store.fills
        (root / "filler").unlink()
        await store.aclose()
