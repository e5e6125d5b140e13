from __future__ import annotations

import datetime

from vpsrelay.core.leases import lapsed, lease_age

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
