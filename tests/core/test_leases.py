from __future__ import annotations

import datetime

from vpsrelay.core.leases import UnchangedSince, lapsed, lease_age

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_age_is_the_stores_now_minus_the_write() -> None:
    assert lease_age(T0 + datetime.timedelta(seconds=31), T0) == 31.0
    assert lease_age(None, T0) is None
    assert lease_age(T0, None) is None


def test_only_a_lease_older_than_its_ttl_lapses() -> None:
    assert lapsed(31.0, 30.0)
    assert not lapsed(30.0, 30.0)
    assert not lapsed(-5.0, 30.0)
    assert not lapsed(None, 30.0)


def test_a_lease_without_store_times_lapses_after_unchanged_for_its_ttl() -> None:
    watch = UnchangedSince()
    assert watch.age("k", '"a"', now=100.0) == 0.0
    assert watch.age("k", '"a"', now=120.0) == 20.0
    assert lapsed(watch.age("k", '"a"', now=131.0), 30.0)
    # its holder rewrote it: young again
    assert watch.age("k", '"b"', now=132.0) == 0.0
    assert not lapsed(watch.age("k", '"b"', now=150.0), 30.0)
    # no ETag: nothing to tell renewals apart by, never aged
    assert watch.age("n", "", now=0.0) == 0.0
    assert watch.age("n", "", now=99.0) == 0.0


def test_the_watch_is_bounded() -> None:
    watch = UnchangedSince(limit=3)
    for n in range(10):
        watch.age(f"k{n}", '"e"', now=float(n))
    assert watch.age("k9", '"e"', now=20.0) == 11.0
    assert watch.age("k0", '"e"', now=20.0) == 0.0  # dropped: seen afresh
