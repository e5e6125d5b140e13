"""Two `DiskStore`s on one directory act as two worker processes of one relay.

`flock` belongs to the open file, not the process, so two stores in one test process
contend for claims exactly as two processes do; a store "dies" by closing its
descriptors without any cleanup, which is what the kernel does to a SIGKILLed process.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import TYPE_CHECKING

import pytest
import trio
import trio.lowlevel

from vpsrelay.cache import claims
from vpsrelay.cache.fills import RemoteFill
from vpsrelay.cache.index import Obj
from vpsrelay.cache.storage import FillState
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig
from vpsrelay.errors import DigestMismatch

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from vpsrelay.cache.fills import DiskFill

BODY = bytes(range(256)) * 12_000  # about 3 MB: several write batches
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()
DEADLINE = 10.0


async def gated(data: bytes, gate: trio.Event, at: int) -> AsyncIterator[bytes]:
    """`data` in 64 KiB pieces, stopping at byte `at` until `gate` is set."""
    for i in range(0, len(data), 64 * 1024):
        if i >= at and not gate.is_set():
            await gate.wait()
        yield data[i : i + 64 * 1024]
        await trio.lowlevel.checkpoint()


def two_stores(root: Path, **config: int) -> tuple[DiskStore, DiskStore]:
    settings = CacheConfig(**config)  # type: ignore[arg-type]
    return DiskStore.open_dir(root, settings), DiskStore.open_dir(root, settings)


def die(store: DiskStore, fill: DiskFill) -> None:
    """What the kernel does for a SIGKILLed leader: its descriptors close, nothing else."""
    os.close(fill.claim_fd)
    os.close(fill.fd)
    fill.claim_fd = fill.fd = -1
    store.fills.clear()


async def wait_for(fill: RemoteFill, state: FillState) -> None:
    with trio.fail_after(DEADLINE):
        while fill.state is not state:
            await fill.wait_changed()


async def read_all(store: DiskStore, fill: RemoteFill) -> bytes:
    """What a joiner may read: up to `written`, the last byte only once committed."""
    reader = store.open_fill(fill)
    data = b""
    try:
        with trio.fail_after(DEADLINE):
            while len(data) < fill.size:
                limit = fill.size if fill.state is FillState.COMMITTED else fill.size - 1
                limit = min(limit, fill.written)
                if fill.state is FillState.FAILED:
                    break
                if len(data) < limit:
                    data += await reader.read(len(data), limit - len(data))
                else:
                    await fill.wait_changed()
    finally:
        reader.close()
    return data


async def test_a_fill_led_by_one_process_is_joined_by_another(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    fill, lead = a.claim(DIGEST)
    assert lead
    joined, lead_b = b.claim(DIGEST)
    assert not lead_b
    assert isinstance(joined, RemoteFill)
    assert b.claim(DIGEST) == (joined, False)  # B's own clients share one follower
    gate = trio.Event()
    got = b""
    async with trio.open_nursery() as nursery:
        assert await a.begin(fill, len(BODY), ())
        nursery.start_soon(a.pump, fill, gated(BODY, gate, 2 * 1024 * 1024))
        await wait_for(joined, FillState.STREAMING)
        assert joined.size == len(BODY)

        async def join() -> None:
            nonlocal got
            got = await read_all(b, joined)

        nursery.start_soon(join)
        with trio.fail_after(DEADLINE):
            while joined.written < 1024 * 1024:
                await joined.wait_changed()
        assert joined.state is FillState.STREAMING  # the leader waits: nothing complete yet
        gate.set()
    assert fill.state is FillState.COMMITTED
    assert joined.state is FillState.COMMITTED  # type: ignore[comparison-overlap]
    assert got == BODY  # type: ignore[unreachable]
    assert b.fills == {}
    obj = b.get(DIGEST)  # committed by A, found by B
    assert obj is not None
    assert obj.size == len(BODY)
    assert list((tmp_path / "claims").iterdir()) == []
    await a.aclose()
    await b.aclose()


async def test_a_wrong_body_in_one_process_is_never_complete_in_the_other(
    tmp_path: Path,
) -> None:
    a, b = two_stores(tmp_path)
    fill, _ = a.claim(DIGEST)
    joined, _ = b.claim(DIGEST)
    assert isinstance(joined, RemoteFill)
    assert await a.begin(fill, len(BODY), ())
    bad = BODY[:-1] + bytes([BODY[-1] ^ 1])
    got = b""
    async with trio.open_nursery() as nursery:
        await wait_for(joined, FillState.STREAMING)

        async def join() -> None:
            nonlocal got
            got = await read_all(b, joined)

        nursery.start_soon(join)
        with pytest.raises(DigestMismatch):
            await a.pump(fill, gated(bad, trio.Event(), len(bad) + 1))
    assert joined.state is FillState.FAILED
    assert len(got) < len(BODY)  # the last byte never went out
    assert b.get(DIGEST) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    await a.aclose()
    await b.aclose()


async def test_a_leader_that_dies_mid_fill_is_taken_over(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    fill, _ = a.claim(DIGEST)
    joined, _ = b.claim(DIGEST)
    assert isinstance(joined, RemoteFill)
    assert await a.begin(fill, len(BODY), ())
    os.write(fill.fd, BODY[: 1024 * 1024])  # a megabyte in, the leader is SIGKILLed
    tmp_file = fill.tmp_path
    assert tmp_file is not None
    await wait_for(joined, FillState.STREAMING)
    die(a, fill)
    got = await read_all(b, joined)
    assert joined.state is FillState.FAILED
    assert joined.spilled  # its readers finish from the upstream (ranged, hashed again)
    assert got == BODY[: len(got)]
    assert len(got) < len(BODY)
    assert not tmp_file.exists()  # removed by the joiner that noticed; never renamed
    assert not b.path(DIGEST).exists()
    # The next client leads afresh.
    again, lead = b.claim(DIGEST)
    assert lead
    assert await b.begin(again, len(BODY), ())
    await b.pump(again, gated(BODY, trio.Event(), len(BODY) + 1))
    assert b.path(DIGEST).read_bytes() == BODY
    await a.aclose()
    await b.aclose()


async def test_a_dead_claim_never_blocks_the_next_fill(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    fill, _ = a.claim(DIGEST)
    assert await a.begin(fill, len(BODY), ())
    die(a, fill)
    assert fill.tmp_path is not None
    assert fill.tmp_path.exists()
    again, lead = b.claim(DIGEST)  # at once: the kernel let the dead claim go
    assert lead
    assert not fill.tmp_path.exists()
    b.drop(again)
    await a.aclose()
    await b.aclose()


async def test_opening_the_cache_keeps_live_fills_and_drops_dead_ones(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    live, _ = a.claim(DIGEST)
    assert await a.begin(live, len(BODY), ())
    other = "sha256:" + "ab" * 32
    dead, _ = b.claim(other)
    assert await b.begin(dead, 10, ())
    die(b, dead)
    (tmp_path / "tmp" / "deadbeef.1.1").write_bytes(b"a crash of an older version")
    third = DiskStore.open_dir(tmp_path, CacheConfig())
    assert live.tmp_path is not None
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == [live.tmp_path.name]
    await a.pump(live, gated(BODY, trio.Event(), len(BODY) + 1))
    assert live.state is FillState.COMMITTED
    for store in (a, b, third):
        await store.aclose()


async def test_the_size_cap_holds_across_processes(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path, max_size=10_000, min_free=0)
    one, two = b"1" * 6_000, b"2" * 6_000
    d1 = "sha256:" + hashlib.sha256(one).hexdigest()
    d2 = "sha256:" + hashlib.sha256(two).hexdigest()
    fill, _ = a.claim(d1)
    assert await a.begin(fill, len(one), ())
    joined, _ = b.claim(d1)  # B follows A's fill: still A's reservation, not B's
    assert isinstance(joined, RemoteFill)
    other, _ = b.claim(d2)
    # A's fill in progress is reserved: B's does not fit beside it, nor may it evict it.
    assert not await b.begin(other, len(two), ())
    await a.pump(fill, gated(one, trio.Event(), len(one) + 1))
    # Committed by A, least recently used: B evicts it to make room.
    again, lead = b.claim(d2)
    assert lead
    assert await b.begin(again, len(two), ())
    await b.pump(again, gated(two, trio.Event(), len(two) + 1))
    assert not a.path(d1).exists()
    [(digest, size, last_used)] = b.db.sizes()
    assert (digest, size) == (d2, len(two))
    assert abs(last_used - time.time()) < 60
    await a.aclose()
    await b.aclose()


async def test_counters_and_last_use_from_both_processes_add_up(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    digest = "sha256:" + "cd" * 32
    a.path(digest).parent.mkdir(parents=True)
    a.path(digest).write_bytes(b"12345")
    a.index.add(digest, Obj(5, 100.0, "blob"))
    await a.flush(force=True)
    b.index.adopt(digest, Obj(5, 100.0, "blob"))
    for _ in range(3):
        a.index.count("hits")
    b.index.count("hits", 4)
    b.index.touch(digest, 300.0)
    a.index.touch(digest, 200.0)  # written last, but older: the later use stays
    await b.flush(force=True)
    await a.flush(force=True)
    await a.aclose()
    await b.aclose()
    reopened = DiskStore.open_dir(tmp_path, CacheConfig())
    assert reopened.index.counters["hits"] == 7
    assert reopened.db.sizes() == [(digest, 5, 300.0)]
    await reopened.aclose()


async def test_a_tag_revalidated_by_one_process_is_fresh_in_the_other(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    b.index.set_tag("docker.io", "library/alpine", "3", "sha256:" + "1" * 64, 100.0)
    await b.flush(force=True)
    a.index.set_tag("docker.io", "library/alpine", "3", "sha256:" + "2" * 64, time.time())
    await a.flush(force=True)
    tag = b.reread_tag("docker.io", "library/alpine", "3")
    assert tag is not None
    assert tag.digest == "sha256:" + "2" * 64
    assert b.index.tags[("docker.io", "library/alpine", "3")] is tag
    await a.aclose()
    await b.aclose()


async def test_one_revalidation_at_a_time_and_a_bounded_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vpsrelay.cache import store as store_module

    monkeypatch.setattr(store_module, "TAG_WAIT", 0.5)
    a, b = two_stores(tmp_path)
    key = ("docker.io", "library/alpine", "3")
    order: list[str] = []
    async with a.revalidating(*key):
        start = trio.current_time()
        async with b.revalidating(*key):  # A never lets go: B goes on after the wait
            order.append("b")
        waited = trio.current_time() - start
    assert 0.4 < waited < 3
    async with trio.open_nursery() as nursery:

        async def hold(store: DiskStore, name: str) -> None:
            async with store.revalidating(*key):
                order.append(name + " in")
                await trio.sleep(0.1)
                order.append(name + " out")

        nursery.start_soon(hold, a, "a")
        await trio.sleep(0.02)
        nursery.start_soon(hold, b, "b")
    assert order == ["b", "a in", "a out", "b in", "b out"]
    await a.aclose()
    await b.aclose()


async def test_a_followed_fill_no_one_reads_is_let_go_when_it_ends(tmp_path: Path) -> None:
    a, b = two_stores(tmp_path)
    fill, _ = a.claim(DIGEST)
    joined, _ = b.claim(DIGEST)
    assert isinstance(joined, RemoteFill)
    assert await a.begin(fill, len(BODY), ())
    await wait_for(joined, FillState.STREAMING)
    # Its clients left; the leader fails: the joined file must not stay open here.
    with pytest.raises(DigestMismatch):
        await a.pump(fill, gated(b"x" * len(BODY), trio.Event(), len(BODY) + 1))
    await b.flush()
    assert b.fills == {}
    assert joined.fd == -1  # closed when it was let go
    await a.aclose()
    await b.aclose()


@pytest.mark.parametrize(
    "note", [b"../../blobs/sha256/ab/x 5\n", b".hidden 5\n", b"name\n", b"name five\n", b""]
)
async def test_a_claim_note_names_only_a_file_in_tmp(tmp_path: Path, note: bytes) -> None:
    """A torn or odd note is no note: nothing outside `tmp/` is ever removed for it."""
    outside = tmp_path / "blobs" / "sha256" / "ab" / "x"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"12345")
    claims_dir, tmp = tmp_path / "claims", tmp_path / "tmp"
    claims_dir.mkdir()
    tmp.mkdir()
    (claims_dir / ("ab" * 32)).write_bytes(note)
    assert claims.ClaimNote.decode(note) is None
    assert claims.remove_leftovers(claims_dir, tmp) == 0
    assert outside.read_bytes() == b"12345"
    assert list(claims_dir.iterdir()) == []  # the dead claim itself is gone
