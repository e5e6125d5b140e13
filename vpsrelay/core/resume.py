"""Resuming an upstream body that ended early: what to ask and what to accept.

A blob body that breaks off (a reset, a short EOF, an idle timeout) is asked again from
the byte reached, `Range: bytes=N-` with `If-Range` (RFC 9110 §13.1.5) carrying the
validator the first answer gave, so that a changed object answers 200 (the whole body)
instead of a 206 that would splice two objects. The digest check stays with the caller,
over the joined bytes: this module only decides which answers continue the body.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

Headers = tuple[tuple[str, str], ...]

# "bytes 10-99/100" or "bytes 10-99/*" (RFC 9110 §14.4).
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# A resume that brought at least this much is progress: the failures in a row start over.
MIN_PROGRESS = 1 << 20
MAX_BACKOFF = 8.0


@dataclass(frozen=True, slots=True)
class Window:
    """The bytes of the object a body stands for: `first` up to `end` (exclusive)."""

    first: int
    end: int
    total: int | None  # the whole object's size, if known
    validator: str | None  # a strong ETag or a Last-Modified, for `If-Range`


def _get(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _length(headers: Headers) -> int | None:
    text = (_get(headers, "content-length") or "").strip()
    return int(text) if text.isdigit() else None


def validator(headers: Headers) -> str | None:
    """What `If-Range` may carry: a strong ETag (a weak one may not be used, RFC 9110
    §13.1.5), else the Last-Modified date."""
    etag = (_get(headers, "etag") or "").strip()
    if etag.startswith('"') and etag.endswith('"') and len(etag) >= 2:
        return etag
    modified = (_get(headers, "last-modified") or "").strip()
    return modified or None


def content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """(first, last, total) of a `Content-Range: bytes a-b/c` (`*` total: None)."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if last < first or (total is not None and last >= total):
        return None
    return first, last, total


def window_of(status: int, headers: Headers) -> Window | None:
    """The part of the object a 200 or 206 answer carries, or None when it cannot be
    resumed (no length, a multipart or malformed range)."""
    length = _length(headers)
    if length is None or length == 0:
        return None
    if status == 200:
        return Window(0, length, length, validator(headers))
    if status == 206:
        parsed = content_range(_get(headers, "content-range"))
        if parsed is None or parsed[1] - parsed[0] + 1 != length:
            return None
        return Window(parsed[0], parsed[1] + 1, parsed[2], validator(headers))
    return None


def ask_headers(window: Window, position: int) -> Headers:
    """The headers of a request for the rest of `window` from `position`."""
    asked: list[tuple[str, str]] = [("range", f"bytes={position}-{window.end - 1}")]
    if window.validator is not None:
        asked.append(("if-range", window.validator))
    return tuple(asked)


class Verdict(enum.Enum):
    CONTINUE = "continue"  # a 206 for exactly the rest: the body goes on
    RESTART = "restart"  # the whole object again: skip what was sent, then go on
    FRESH_URL = "fresh_url"  # the redirect URL no longer works: ask the registry again
    FRESH_TOKEN = "fresh_token"  # the registry refused the token: get a new one
    RETRY = "retry"  # anything else: wait, then try again (bounded)


def judge(window: Window, position: int, status: int, headers: Headers) -> Verdict:
    """What an answer to a resume means for the body at `position`."""
    length = _length(headers)
    if status == 206:
        parsed = content_range(_get(headers, "content-range"))
        expected = (position, window.end - 1)
        if (
            parsed is not None
            and parsed[:2] == expected
            and (window.total is None or parsed[2] in (None, window.total))
            and length == window.end - position
        ):
            return Verdict.CONTINUE
        return Verdict.RETRY  # a range other than asked: never spliced in
    if status == 200:
        # `If-Range` did not match (or ranges are not served): a whole body of the
        # object's size can still finish the window; the digest check decides.
        if window.first == 0 and length is not None and length == window.end:
            return Verdict.RESTART
        return Verdict.RETRY
    if status in (400, 403, 410):  # an expired signed URL (S3: 403, R2: 400, GCS: 410)
        return Verdict.FRESH_URL
    if status == 401:
        return Verdict.FRESH_TOKEN
    return Verdict.RETRY


class Attempts:
    """Bounds the resumes of one body: at most `limit` failed attempts in a row, where a
    resume that brought `MIN_PROGRESS` bytes starts the count again, so a body that
    breaks every 64 MiB finishes and one that breaks after every few bytes does not."""

    def __init__(self, limit: int, backoff: float) -> None:
        self.limit = limit
        self.backoff = backoff
        self.failures = 0
        self.resumes = 0
        self._since = 0  # the position when the current run of failures began

    def may_try(self, position: int) -> bool:
        """Record a failure at `position`; whether another attempt is allowed."""
        if position - self._since >= MIN_PROGRESS:
            self.failures = 0
        if self.failures == 0:
            self._since = position
        self.failures += 1
        return self.failures <= self.limit

    def delay(self) -> float:
        """Seconds to wait before the current attempt: none for the first, then doubling."""
        if self.failures <= 1:
            return 0.0
        return float(min(MAX_BACKOFF, self.backoff * 2.0 ** (self.failures - 2)))
