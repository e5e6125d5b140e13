"""Docker Hub's pull budget, as its `ratelimit-*` answer headers state it.

Docker Hub sends `ratelimit-limit: 100;w=21600` (pulls per window of seconds),
`ratelimit-remaining: 76;w=21600` and `docker-ratelimit-source: <ip or user>`
on manifest answers (the IETF RateLimit header draft's "quota;w=window" form).
The relay reads them to show the budget, and words a 429 so a user knows whose
limit was hit: the relay's (its address, its accounts, or a CDN's), not the user's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

# quota *( ";" param ): `100;w=21600`, `100`, `100, 100;w=21600` (first item wins).
_QUOTA = re.compile(r"\s*(?P<quota>\d{1,12})\s*(?P<params>(?:;[^,]*)?)")
_WINDOW = re.compile(r";\s*w\s*=\s*(?P<w>\d{1,12})")
# Without Retry-After, a client is told to come back in an hour: Docker Hub's window
# is rolling, so part of the budget returns well before the full window has passed.
DEFAULT_RETRY_AFTER = 3600


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One upstream's pull budget as last stated."""

    limit: int | None
    remaining: int | None
    window_seconds: int | None
    source: str | None


def parse_quota(value: str) -> tuple[int, int | None] | None:
    """`100;w=21600` to `(100, 21600)`; None if it is not a quota.

    Args:
        value: a `ratelimit-limit` or `ratelimit-remaining` header value.

    Returns:
        (quota, window seconds or None), or None for a malformed value.
    """
    found = _QUOTA.match(value)
    if found is None:
        return None
    window = _WINDOW.search(found["params"])
    return int(found["quota"]), int(window["w"]) if window else None


def parse(headers: Iterable[tuple[str, str]]) -> RateLimit | None:
    """The budget stated in an answer's headers (lower-case names), or None.

    Returns:
        A `RateLimit` when `ratelimit-limit` or `ratelimit-remaining` is present
        and well formed; None otherwise.
    """
    limit = remaining = window = None
    source = None
    for name, value in headers:
        if name == "ratelimit-limit" and limit is None:
            if (quota := parse_quota(value)) is not None:
                limit, window = quota[0], quota[1] or window
        elif name == "ratelimit-remaining" and remaining is None:
            if (quota := parse_quota(value)) is not None:
                remaining, window = quota[0], window or quota[1]
        elif name == "docker-ratelimit-source" and source is None:
            source = value.strip()[:100] or None
    if limit is None and remaining is None:
        return None
    return RateLimit(limit, remaining, window, source)


def retry_after(value: str | None) -> int:
    """Seconds from an upstream `Retry-After` (delta-seconds only), or the default."""
    if value is not None and value.strip().isdigit():
        return min(int(value.strip()), 86_400)
    return DEFAULT_RETRY_AFTER


def too_many_requests_message(registry: str, budget: RateLimit | None, retry: int) -> str:
    """The message a client sees when the upstream answered 429.

    It says whose limit it is: the upstream's on the relay (its address, the operator's
    accounts, a CDN's), so a user does not blame (or log in to) the wrong thing.
    """
    who = f" for {budget.source}" if budget is not None and budget.source else ""
    parts = [f"{registry} refused the relay: its pull rate limit{who} was hit"]
    if budget is not None and budget.limit is not None:
        window = f" per {_duration(budget.window_seconds)}" if budget.window_seconds else ""
        parts.append(f"(limit {budget.limit} pulls{window})")
    parts.append(
        # Whose limit: the relay's address, the operator's accounts or the CDN the
        # registry sent the pull to; never the client's own, whatever the operator set up.
        f"; this is a limit the upstream puts on the relay, not on you; retry in {retry} s"
    )
    return " ".join(parts[:-1]) + parts[-1]


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"
