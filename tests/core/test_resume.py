"""Which answers continue a blob body that broke off, and how often it may be tried."""

from __future__ import annotations

import pytest

from vpsrelay.core import resume
from vpsrelay.core.resume import Verdict, Window

ETAG = '"abc"'
WHOLE = Window(0, 1000, 1000, ETAG)


def test_window_of_a_whole_body_carries_a_strong_etag() -> None:
    headers = (("content-length", "1000"), ("etag", ETAG))
    assert resume.window_of(200, headers) == WHOLE


def test_window_of_a_ranged_body() -> None:
    headers = (("content-length", "10"), ("content-range", "bytes 5-14/100"))
    assert resume.window_of(206, headers) == Window(5, 15, 100, None)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, ()),  # no length: the end cannot be told from a break
        (200, (("content-length", "0"),)),
        (206, (("content-length", "10"), ("content-range", "bytes 5-15/100"))),  # 11 != 10
        (206, (("content-length", "10"), ("content-range", "bytes */100"))),
        (304, (("content-length", "10"),)),
    ],
)
def test_bodies_that_cannot_be_resumed(status: int, headers: resume.Headers) -> None:
    assert resume.window_of(status, headers) is None


def test_validator_prefers_a_strong_etag_then_last_modified() -> None:
    date = "Mon, 07 Dec 2026 10:00:00 GMT"
    assert resume.validator((("etag", 'W/"x"'), ("last-modified", date))) == date
    assert resume.validator((("etag", 'W/"x"'),)) is None
    assert resume.validator((("etag", ETAG), ("last-modified", date))) == ETAG


def test_content_range_parsing() -> None:
    assert resume.content_range("bytes 0-9/*") == (0, 9, None)
    assert resume.content_range("bytes 9-0/10") is None
    assert resume.content_range("bytes 0-10/10") is None
    assert resume.content_range(None) is None


def test_ask_headers_carry_if_range_only_with_a_validator() -> None:
    assert resume.ask_headers(WHOLE, 100) == (("range", "bytes=100-999"), ("if-range", ETAG))
    assert resume.ask_headers(Window(0, 10, 10, None), 4) == (("range", "bytes=4-9"),)


def ranged(first: int, last: int, total: str = "1000") -> resume.Headers:
    return (
        ("content-range", f"bytes {first}-{last}/{total}"),
        ("content-length", str(last - first + 1)),
    )


def test_only_the_exact_rest_continues() -> None:
    assert resume.judge(WHOLE, 100, 206, ranged(100, 999)) is Verdict.CONTINUE
    assert resume.judge(WHOLE, 100, 206, ranged(100, 999, "*")) is Verdict.CONTINUE
    assert resume.judge(WHOLE, 100, 206, ranged(0, 999)) is Verdict.RETRY  # other bytes
    assert resume.judge(WHOLE, 100, 206, ranged(100, 999, "2000")) is Verdict.RETRY
    lying = (("content-range", "bytes 100-999/1000"), ("content-length", "5"))
    assert resume.judge(WHOLE, 100, 206, lying) is Verdict.RETRY


def test_a_whole_body_restarts_only_a_whole_window() -> None:
    whole = (("content-length", "1000"),)
    assert resume.judge(WHOLE, 100, 200, whole) is Verdict.RESTART
    assert resume.judge(WHOLE, 100, 200, (("content-length", "999"),)) is Verdict.RETRY
    assert resume.judge(Window(5, 1000, 1000, None), 100, 200, whole) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 403, 410])
def test_an_expired_url_asks_for_a_fresh_redirect(status: int) -> None:
    assert resume.judge(WHOLE, 1, status, ()) is Verdict.FRESH_URL


def test_a_refused_token_asks_for_a_fresh_one_and_others_retry() -> None:
    assert resume.judge(WHOLE, 1, 401, ()) is Verdict.FRESH_TOKEN
    assert resume.judge(WHOLE, 1, 503, ()) is Verdict.RETRY


def test_attempts_are_bounded_in_a_row_and_progress_starts_them_again() -> None:
    attempts = resume.Attempts(3, 0.5)
    assert attempts.may_try(10)
    assert attempts.delay() == 0.0
    assert attempts.may_try(20)
    assert attempts.delay() == 0.5
    assert attempts.may_try(30)
    assert attempts.delay() == 1.0
    assert not attempts.may_try(40)  # three short tries in a row were all it gets
    far = 10 + resume.MIN_PROGRESS
    assert attempts.may_try(far)
    assert attempts.delay() == 0.0


def test_backoff_is_capped() -> None:
    attempts = resume.Attempts(100, 1.0)
    for _ in range(50):
        attempts.may_try(0)
    assert attempts.delay() == resume.MAX_BACKOFF
