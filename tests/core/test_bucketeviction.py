from __future__ import annotations

import time

from vpsrelay.core.bucketeviction import (
    MAX_SKEW,
    RecentRecords,
    Stored,
    last_look,
    merge,
    plan,
    record_is_fresh,
)


def test_oldest_first_until_under_the_cap() -> None:
    objects = [Stored("a", 10, 100.0), Stored("b", 10, 50.0), Stored("c", 10, 200.0)]
    assert plan(objects, max_size=20, now=1000.0, grace=10.0, limit=9) == ["b"]
    assert plan(objects, max_size=5, now=1000.0, grace=10.0, limit=9) == ["b", "a", "c"]
    assert plan(objects, max_size=30, now=1000.0, grace=10.0, limit=9) == []


def test_one_pass_picks_at_most_its_limit() -> None:
    objects = [Stored(f"k{n}", 10, float(n)) for n in range(10)]
    assert plan(objects, max_size=0, now=1000.0, grace=10.0, limit=3) == ["k0", "k1", "k2"]


def test_recently_accessed_objects_are_kept_even_over_the_cap() -> None:
    objects = [Stored("old", 10, 0.0), Stored("busy", 10, 995.0), Stored("mid", 10, 500.0)]
    assert plan(objects, max_size=0, now=1000.0, grace=10.0, limit=9) == ["old", "mid"]


def test_merge_keeps_the_latest_and_ignores_garbage() -> None:
    into = {"sha256:a": 5.0}
    merge(into, {"sha256:a": 3.0, "sha256:b": 7, "sha256:c": "x", "sha256:d": True}, now=1e3)
    assert into == {"sha256:a": 5.0, "sha256:b": 7.0}
    merge(into, ["not", "a", "dict"], now=1e3)
    merge(into, {"sha256:a": 9.5}, now=1e3)
    assert into["sha256:a"] == 9.5


def test_merge_drops_infinite_times_and_clamps_future_ones() -> None:
    """A batch cannot keep an object forever: not with Infinity, NaN or a number too big
    for a float (json.loads reads all three), nor with a time far ahead."""
    into: dict[str, float] = {}
    batch = {"sha256:inf": float("inf"), "sha256:nan": float("nan"), "sha256:big": 10**400}
    merge(into, {**batch, "sha256:far": 1e12, "sha256:near": 1000.0 + 10}, now=1000.0)
    assert into == {"sha256:far": 1000.0 + MAX_SKEW, "sha256:near": 1010.0}
    # the clamped time ages like any other: a victim once the grace has passed
    objects = [Stored("far", 10, into["sha256:far"])]
    assert plan(objects, max_size=0, now=1000.0 + MAX_SKEW + 11, grace=10.0, limit=9) == ["far"]


def test_forgetting_the_oldest_half_is_linear() -> None:
    """A full `RecentRecords` of fresh digests forgets its oldest half in one rebuild
    (deleting a dict's first key one at a time rescans the deleted slots: ~0.5 s at
    100 000)."""
    records = RecentRecords(grace=1e9, limit=100_000)
    for n in range(100_000):
        records.remember(f"sha256:{n}", 0.0, now=0.0)
    started = time.perf_counter()
    records.remember("sha256:last", 0.0, now=0.0)
    took = time.perf_counter() - started
    assert len(records) == 50_001
    assert records.fresh("sha256:99999", 0.0)
    assert not records.fresh("sha256:49999", 0.0)
    assert took < 0.25, took  # quadratic: ~0.5 s here; linear: ~0.02 s


def test_the_last_look_spares_late_batches_whatever_their_time() -> None:
    victims = ["sha256:a", "sha256:b", "sha256:c", "sha256:d"]
    accessed = {"sha256:a": 0.0, "sha256:b": 0.0, "sha256:c": 995.0, "sha256:d": 990.0}
    kept = last_look(
        victims, late={"sha256:b", "sha256:x"}, accessed=accessed, now=1000.0, grace=10.0
    )
    assert kept == ["sha256:a", "sha256:d"]  # b: a late batch (its time 0); c: in grace
    assert last_look(victims, late=(), accessed={}, now=1000.0, grace=10.0) == victims
    assert last_look([], late={"sha256:a"}, accessed={}, now=1000.0, grace=10.0) == []


def test_a_record_is_fresh_for_half_the_grace() -> None:
    assert not record_is_fresh(None, 100.0, 10.0)
    assert record_is_fresh(100.0, 100.0, 10.0)
    assert record_is_fresh(95.5, 100.0, 10.0)
    assert not record_is_fresh(95.0, 100.0, 10.0)  # grace / 2: write again
    assert not record_is_fresh(101.0, 100.0, 10.0)  # from the future: write again


def test_recent_records_are_bounded_and_forget_the_stale_first() -> None:
    records = RecentRecords(grace=10.0, limit=4)
    assert not records.fresh("a", 0.0)
    records.remember("a", 0.0, now=0.0)
    assert records.fresh("a", 4.9)
    assert not records.fresh("a", 5.0)
    records.forget("a")
    records.forget("never")
    assert not records.fresh("a", 1.0)
    for name, when in (("old", 0.0), ("b", 8.0), ("c", 9.0), ("d", 9.5)):
        records.remember(name, when, now=when)
    assert len(records) == 4
    records.remember("e", 10.0, now=10.0)  # full: "old" is stale, the rest kept
    assert len(records) == 4
    assert not records.fresh("old", 10.0)
    assert all(records.fresh(name, 10.0) for name in "bcde")
    records.remember("f", 10.0, now=10.0)  # full of fresh ones: the oldest half goes
    assert len(records) == 3
    assert [name for name in "bcdef" if records.fresh(name, 10.0)] == ["d", "e", "f"]
    records.remember("d", 11.0, now=11.0)  # again: moved to the newest
    assert len(records) == 3
