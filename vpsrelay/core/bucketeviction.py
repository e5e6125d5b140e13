"""Which objects of a shared cache bucket to delete to keep it under its cap.

Least recently accessed first (the latest access any node recorded, else the object's
own upload time), never an object accessed within `grace` seconds: nodes record the
objects they are serving in every batch, so an object being read stays young.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Stored:
    key: str
    size: int
    last_access: float  # seconds since the epoch


def plan(objects: list[Stored], *, max_size: int, now: float, grace: float) -> list[str]:
    """The keys to delete, oldest access first, until the rest fit in `max_size`."""
    total = sum(item.size for item in objects)
    victims: list[str] = []
    for item in sorted(objects, key=lambda o: (o.last_access, o.key)):
        if total <= max_size:
            break
        if now - item.last_access < grace:
            continue  # in use, or just used: kept even over the cap
        victims.append(item.key)
        total -= item.size
    return victims


def merge(into: dict[str, float], batch: object) -> None:
    """Fold one node's batch (`{digest: time}` as JSON) into `into` (latest wins);
    anything malformed in it is ignored (the bucket is another trust domain)."""
    if not isinstance(batch, dict):
        return
    for digest, when in batch.items():
        valid = isinstance(digest, str) and isinstance(when, int | float)
        if valid and not isinstance(when, bool) and when > into.get(digest, 0.0):
            into[digest] = float(when)
