"""A blob another process committed is served from disk, however this process learns of
it: a small fill committed between two polls of its follower, or a verified file under
`blobs/` whose index row was never written (review finding 4 of issue 14).

Two `DiskStore`s on one directory act as two worker processes (see test_shared_store.py).
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import TYPE_CHECKING

import trio

from vpsrelay.cache.fills import RemoteFill
from vpsrelay.cache.storage import FillState
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

SMALL = b"config blob " * 150  # under one write batch: filled within one poll interval
SMALL_DIGEST = "sha256:" + hashlib.sha256(SMALL).hexdigest()
DEADLINE = 10.0


async def whole(data: bytes) -> AsyncIterator[bytes]:
    yield data


def rows(root: Path, digest: str) -> list[tuple[int, str]]:
    with sqlite3.connect(root / "cache.db") as db:
        return list(db.execute("SELECT size, kind FROM objects WHERE digest = ?", (digest,)))


async def test_a_fill_committed_between_two_polls_is_committed_for_the_joiner(
    tmp_path: Path,
) -> None:
    a = DiskStore.open_dir(tmp_path, CacheConfig())
    b = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, lead = a.claim(SMALL_DIGEST)
    joined, lead_b = b.claim(SMALL_DIGEST)
    assert lead
    assert not lead_b
    assert isinstance(joined, RemoteFill)
    assert await a.begin(fill, len(SMALL), ())
    await a.pump(fill, whole(SMALL))  # no poll of B's follower saw it streaming
    assert fill.state is FillState.COMMITTED
    with trio.fail_after(DEADLINE):
        while not joined.settled:
            await joined.wait_changed()
    assert joined.state is FillState.COMMITTED
    assert SMALL_DIGEST in b.index.objects  # known at once: the next request is a hit
    assert b.fills == {}
    await a.aclose()
    await b.aclose()


async def test_a_verified_file_without_its_row_is_adopted_not_fetched_again(
    tmp_path: Path,
) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    path = store.path(SMALL_DIGEST)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SMALL)  # renamed into place by another process, whose row was lost
    assert store.get(SMALL_DIGEST) is None
    for _ in range(3):
        fill, lead = store.claim(SMALL_DIGEST)
        assert (fill.state, lead) == (FillState.COMMITTED, False)
        obj = store.get(SMALL_DIGEST)
        assert obj is not None
        assert (obj.size, obj.kind) == (len(SMALL), "blob")
    await store.flush(force=True)
    assert rows(tmp_path, SMALL_DIGEST) == [(len(SMALL), "blob")]  # other processes see it
    assert list((tmp_path / "claims").iterdir()) == []
    await store.aclose()


async def test_an_adopted_file_does_not_replace_its_writers_row(tmp_path: Path) -> None:
    a = DiskStore.open_dir(tmp_path, CacheConfig())
    b = DiskStore.open_dir(tmp_path, CacheConfig())
    await a.put_small(SMALL_DIGEST, SMALL, "manifest", "application/vnd.oci.image.index.v1+json")
    fill, lead = b.claim(SMALL_DIGEST)
    assert (fill.state, lead) == (FillState.COMMITTED, False)
    obj = b.get(SMALL_DIGEST)
    assert obj is not None
    assert obj.kind == "manifest"  # the row's kind, not a guess
    await b.flush(force=True)
    assert rows(tmp_path, SMALL_DIGEST) == [(len(SMALL), "manifest")]
    await a.aclose()
    await b.aclose()


async def test_a_joiner_can_open_a_fill_for_as_long_as_it_is_streaming(tmp_path: Path) -> None:
    """The commit writes its index row through (an await) before the fill settles: a
    joiner of the same process that sees STREAMING meanwhile must still get a descriptor
    (it got EBADF, a 500, under 10 concurrent pulls over two workers)."""
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    fill, lead = store.claim(SMALL_DIGEST)
    assert lead
    assert await store.begin(fill, len(SMALL), ())
    seen: list[bytes] = []
    write_through = store.flush

    async def flush_while_a_joiner_opens(*, force: bool = False) -> None:
        if fill.state is FillState.STREAMING:  # what a woken joiner checks, then opens
            reader = store.open_fill(fill)
            try:
                seen.append(await reader.read(0, len(SMALL)))
            finally:
                reader.close()
        await write_through(force=force)

    store.flush = flush_while_a_joiner_opens  # type: ignore[method-assign]
    await store.pump(fill, whole(SMALL))
    assert fill.state is FillState.COMMITTED
    assert seen == [SMALL]
    await store.aclose()
