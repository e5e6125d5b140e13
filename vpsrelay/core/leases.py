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


class UnchangedSince:
    """For a store whose answers carry no `Date` or `Last-Modified`: how long this node
    has seen each lease unchanged (the same ETag; a holder's every write changes it), on
    this node's own clock. A lease seen unchanged for longer than its ttl has lapsed."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: dict[str, tuple[str, float]] = {}  # key -> (etag, first seen)
        self._limit = limit

    def age(self, key: str, etag: str, now: float) -> float:
        """Seconds this node has seen `etag` at `key` (0 on the first look)."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != etag or not etag:
            if len(self._seen) >= self._limit:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = (etag, now)
            return 0.0
        return now - seen[1]

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)
