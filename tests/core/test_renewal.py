from __future__ import annotations

import datetime

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core.renewal import (
    CHECK_INTERVAL,
    RETRY_CAP,
    Validity,
    next_check_delay,
    renewal_due,
    renewal_time,
    retry_delay,
)

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
NINETY = Validity(T0, T0 + 90 * DAY)


@pytest.mark.parametrize(
    ("fraction", "due_after_days"),
    [(1 / 3, 60), (0.5, 45), (1.0, 0), (0.1, 81)],
)
def test_renewal_time_is_a_fraction_of_the_lifetime_before_the_end(
    fraction: float, due_after_days: int
) -> None:
    assert renewal_time(NINETY, fraction) == T0 + due_after_days * DAY


def test_due_one_third_before_expiry_by_default() -> None:
    assert not renewal_due(T0 + 59 * DAY, NINETY)
    assert renewal_due(T0 + 60 * DAY, NINETY)
    assert renewal_due(T0 + 100 * DAY, NINETY)  # expired: certainly due


def test_an_earlier_ari_window_wins_and_a_later_one_does_not_delay() -> None:
    early = T0 + 10 * DAY  # the CA plans a revocation
    assert renewal_time(NINETY, ari_time=early) == early
    assert renewal_due(T0 + 11 * DAY, NINETY, ari_time=early)
    late = T0 + 80 * DAY
    assert renewal_time(NINETY, ari_time=late) == T0 + 60 * DAY


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_renew_before_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="renew_before"):
        renewal_time(NINETY, fraction)


def test_retry_delays_double_from_a_minute_up_to_six_hours() -> None:
    assert [retry_delay(n) for n in range(1, 6)] == [60, 120, 240, 480, 960]
    assert retry_delay(9) == 60 * 256
    assert retry_delay(10) == RETRY_CAP == 6 * 3600
    assert retry_delay(10**6) == RETRY_CAP
    with pytest.raises(ValueError, match="failures"):
        retry_delay(0)


@given(st.integers(min_value=1, max_value=10**9))
def test_retry_delay_is_bounded_and_never_shrinks(failures: int) -> None:
    assert 60 <= retry_delay(failures) <= RETRY_CAP
    assert retry_delay(failures + 1) >= retry_delay(failures)


def test_next_check_is_the_interval_or_sooner_when_due() -> None:
    now = T0
    assert next_check_delay(now, now + 30 * DAY) == CHECK_INTERVAL
    assert next_check_delay(now, now + datetime.timedelta(hours=1)) == 3600
    assert next_check_delay(now, now - DAY) == 0
