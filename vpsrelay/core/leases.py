"""When a fill lease in a shared bucket has lapsed: judged on the store's clock only.

The age is the store's `Date` when it answered minus the lease's `Last-Modified` (both
written by the store, at one-second resolution), so the nodes' clocks never matter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datetime


def lease_age(
    store_now: datetime.datetime | None, written: datetime.datetime | None
) -> float | None:
    """Seconds since the lease was last written, or None without both times."""
    if store_now is None or written is None:
        return None
    return (store_now - written).total_seconds()


def lapsed(age: float | None, ttl: float) -> bool:
    """A lease older than `ttl` belongs to a node that stopped renewing it; one whose age
    cannot be told is never taken over (its holder may be alive)."""
    return age is not None and age > ttl
