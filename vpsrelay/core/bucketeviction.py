"""Which objects of a shared cache bucket to delete to keep it under its cap.

Least recently accessed first (the latest access any node recorded, else the object's
own upload time), never an object accessed within `grace` seconds: nodes record the
objects they are serving in every batch, so an object being read stays young.

A read that begins while a pass runs is covered by a handshake (`cache/s3/evict.py`): the
evictor writes a tombstone per victim, then reads the batches once more (the last look);
a node writes an access record, then looks for the tombstone. On a store with
read-after-write consistency one of the two sees the other's write, so a victim is either
spared (`last_look`) or not read by the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping

MAX_SKEW = 300.0  # seconds a recorded access may lie ahead of the evictor's clock


def longest_batch_gap(interval: float, timeout: float) -> float:
    """The most time between two access batches of one node: it sleeps `interval`, then
    writes its batch, cut after `timeout` (`S3Store._write_batches`, apart from the
    passes). A record covers a read for `grace / 2` without a new one, so the grace must
    be more than twice this (config.py)."""
    return interval + timeout


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    size: int
    last_access: float  # seconds since the epoch


def plan(
    objects: list[Stored], *, max_size: int, now: float, grace: float, limit: int
) -> list[str]:
    """The keys to delete, oldest access first, until the rest fit in `max_size`; at most
    `limit` (one pass's work is bounded: the next pass goes on)."""
    total = sum(item.size for item in objects)
    victims: list[str] = []
    for item in sorted(objects, key=lambda o: (o.last_access, o.key)):
        if total <= max_size or len(victims) >= limit:
            break
        if now - item.last_access < grace:
            continue  # in use, or just used: kept even over the cap
        victims.append(item.key)
        total -= item.size
    return victims


def merge(into: dict[str, float], batch: object, *, now: float) -> None:
    """Fold one node's batch (`{digest: time}` as JSON) into `into` (latest wins);
    anything malformed in it is ignored (the bucket is another trust domain), and a time
    more than `MAX_SKEW` ahead of `now` counts as `now + MAX_SKEW` (a future time would
    keep an object forever)."""
    if not isinstance(batch, dict):
        return
    for digest, when in batch.items():
        valid = isinstance(digest, str) and isinstance(when, int | float)
        if not valid or isinstance(when, bool):
            continue
        try:
            seconds = float(when)
        except OverflowError:  # an integer of hundreds of digits
            continue
        if math.isfinite(seconds) and (latest := min(seconds, now + MAX_SKEW)) > into.get(
            digest, 0.0
        ):
            into[digest] = latest


def last_look(
    victims: list[str],
    *,
    late: Collection[str],
    accessed: Mapping[str, float],
    now: float,
    grace: float,
) -> list[str]:
    """The victims (digests) still to delete after the last look: not those named in a
    batch that appeared after the first fold (`late`: a node began to read them, whatever
    its clock says), nor those accessed within `grace`."""
    return [
        digest
        for digest in victims
        if digest not in late and now - accessed.get(digest, 0.0) >= grace
    ]


def record_is_fresh(written_at: float | None, now: float, grace: float) -> bool:
    """Whether a node's own access record of an object, written at `written_at` (its
    monotonic clock), still covers a read that begins `now` without a new record and a
    look for a tombstone: for `grace / 2`, which leaves the other half for the node's
    next batch (it names the objects it is reading) to reach the bucket."""
    return written_at is not None and 0.0 <= now - written_at < grace / 2


class RecentRecords:
    """When this node last wrote an access record of each digest (its monotonic clock),
    for `record_is_fresh`; at most `limit` digests (forgetting one only costs a new record
    at its next read)."""

    def __init__(self, grace: float, limit: int = 100_000) -> None:
        self._grace = grace
        self._limit = limit
        self._written: dict[str, float] = {}  # in the order written

    def __len__(self) -> int:
        return len(self._written)

    def fresh(self, digest: str, now: float) -> bool:
        return record_is_fresh(self._written.get(digest), now, self._grace)

    def forget(self, digest: str) -> None:
        self._written.pop(digest, None)

    def remember(self, digest: str, written_at: float, now: float) -> None:
        self._written.pop(digest, None)
        if len(self._written) >= self._limit:
            for old, when in list(self._written.items()):
                if not record_is_fresh(when, now, self._grace):
                    del self._written[old]
        if len(self._written) >= self._limit:
            # Still full: forget the oldest half, so the sweep runs once per limit / 2
            # (rebuilt in one go: deleting from a dict's front one by one is quadratic).
            kept = list(self._written.items())[len(self._written) - self._limit // 2 :]
            self._written = dict(kept)
        self._written[digest] = written_at
