"""When to renew a certificate, and how long to wait after a failed attempt.

Pure arithmetic on datetimes and attempt counts; the caller owns the clock.

Let's Encrypt's integration guide: renew when a third of the lifetime is left
(day 60 of a 90-day certificate). RFC 9773 (ACME Renewal Information): "the
client SHOULD attempt renewal at a time of its choosing within the window" the
CA suggests; a CA moves the window earlier ahead of a mass revocation, so the
earlier of the two times wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime

DEFAULT_RENEW_BEFORE = 1 / 3
CHECK_INTERVAL = 12 * 60 * 60.0
"""Seconds between renewal checks (certbot's timer runs twice a day too)."""

RETRY_BASE = 60.0
RETRY_CAP = 6 * 60 * 60.0
"""Failed attempts back off 1, 2, 4 ... minutes up to 6 hours. Let's Encrypt allows
5 failed validations per account, hostname and hour; the first five retries
take 31 minutes, so a broken setup never trips that limit."""


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> datetime.timedelta:
        return self.not_after - self.not_before


def renewal_time(
    validity: Validity,
    renew_before: float = DEFAULT_RENEW_BEFORE,
    ari_time: datetime.datetime | None = None,
) -> datetime.datetime:
    """The moment renewal becomes due.

    Args:
        validity: the certificate's notBefore/notAfter.
        renew_before: renew when this fraction of the lifetime is left (0 < f <= 1).
        ari_time: the time the CA's renewal information suggests, if it offers one.

    Returns:
        The earlier of "`renew_before` of the lifetime left" and `ari_time`.

    Raises:
        ValueError: `renew_before` outside (0, 1].
    """
    if not 0 < renew_before <= 1:
        raise ValueError(f"renew_before must be in (0, 1], got {renew_before!r}")
    by_lifetime = validity.not_after - validity.lifetime * renew_before
    return by_lifetime if ari_time is None else min(by_lifetime, ari_time)


def renewal_due(
    now: datetime.datetime,
    validity: Validity,
    renew_before: float = DEFAULT_RENEW_BEFORE,
    ari_time: datetime.datetime | None = None,
) -> bool:
    """Whether a certificate should be renewed at `now` (see `renewal_time`).

    Raises:
        ValueError: `renew_before` outside (0, 1].
    """
    return now >= renewal_time(validity, renew_before, ari_time)


def retry_delay(failures: int, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds to wait after the `failures`-th consecutive failed attempt (1-based).

    Raises:
        ValueError: `failures` below 1.
    """
    if failures < 1:
        raise ValueError(f"failures counts from 1, got {failures!r}")
    # min() before the power keeps huge counts from overflowing a float.
    return min(cap, base * 2.0 ** min(failures - 1, 64))


def next_check_delay(
    now: datetime.datetime,
    due: datetime.datetime,
    interval: float = CHECK_INTERVAL,
) -> float:
    """Seconds until the next check: the regular interval, or sooner if renewal falls due."""
    return max(0.0, min(interval, (due - now).total_seconds()))
