"""One tag revalidated at a time: requests of the same process wait on a lock and go on the
moment the holder is done (review finding 9c of issue 14: they polled a claim file every
50 ms, which a single process, `workers = 1`, paid for every stale tag pulled at once);
other processes still wait on the claim, and no one waits longer than `TAG_WAIT`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from vpsrelay.cache import store as store_module
from vpsrelay.cache.store import DiskStore
from vpsrelay.config import CacheConfig

if TYPE_CHECKING:
    from pathlib import Path

KEY = ("docker.io", "library/alpine", "3")


async def test_a_waiter_in_the_same_process_goes_on_when_the_holder_is_done(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    times: dict[str, float] = {}

    async def hold() -> None:
        async with store.revalidating(*KEY):
            await trio.sleep(1.0)
            times["released"] = trio.current_time()

    async def wait() -> None:
        await trio.sleep(0.03)  # out of step with any poll interval
        async with store.revalidating(*KEY):
            times["entered"] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        nursery.start_soon(wait)
    assert times["entered"] - times["released"] < 1e-6  # no poll interval lost
    assert store._tag_locks == {}
    assert list((tmp_path / "claims").iterdir()) == []
    await store.aclose()


async def test_a_waiter_in_the_same_process_waits_at_most_tag_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = DiskStore.open_dir(tmp_path, CacheConfig())
    entered: list[float] = []
    done = trio.Event()

    async def hold() -> None:
        async with store.revalidating(*KEY):
            await trio.sleep(100.0)  # a holder that hangs

    async def wait() -> None:
        async with store.revalidating(*KEY):
            entered.append(trio.current_time())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.sleep(0.01)
        start = trio.current_time()
        nursery.start_soon(wait)
        with trio.fail_after(store_module.TAG_WAIT * 2):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert store_module.TAG_WAIT - 0.1 <= entered[0] - start <= store_module.TAG_WAIT + 0.1
    assert store._tag_locks == {}
    await store.aclose()
