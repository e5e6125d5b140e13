from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import ratelimit
from vpsrelay.core.ratelimit import RateLimit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("100;w=21600", (100, 21600)),
        ("76;w=21600", (76, 21600)),
        (" 100 ; w = 60", (100, 60)),
        ("100", (100, None)),
        ("100, 200;w=5", (100, None)),
        ("x;w=1", None),
        ("", None),
    ],
)
def test_parse_quota(value, expected):
    assert ratelimit.parse_quota(value) == expected


def test_parse_docker_hub_headers():
    headers = [
        ("ratelimit-limit", "100;w=21600"),
        ("ratelimit-remaining", "76;w=21600"),
        ("docker-ratelimit-source", "203.0.113.7"),
    ]
    assert ratelimit.parse(headers) == RateLimit(100, 76, 21600, "203.0.113.7")


def test_parse_without_headers_is_none():
    assert ratelimit.parse([("content-type", "x"), ("docker-ratelimit-source", "1.2.3.4")]) is None
    assert ratelimit.parse([("ratelimit-limit", "lots")]) is None


def test_remaining_alone_gives_the_window():
    assert ratelimit.parse([("ratelimit-remaining", "0;w=60")]) == RateLimit(None, 0, 60, None)


@given(st.lists(st.tuples(st.sampled_from(["ratelimit-limit", "ratelimit-remaining",
                                           "docker-ratelimit-source"]), st.text())))  # fmt: skip
def test_parse_never_raises(headers):
    result = ratelimit.parse(headers)
    assert result is None or result.limit is not None or result.remaining is not None


@pytest.mark.parametrize(
    ("value", "expected"), [("60", 60), (None, 3600), ("soon", 3600), ("999999", 86400)]
)
def test_retry_after(value, expected):
    assert ratelimit.retry_after(value) == expected


def test_message_says_whose_limit():
    message = ratelimit.too_many_requests_message(
        "docker.io", RateLimit(100, 0, 21600, "203.0.113.7"), 60
    )
    assert message.startswith("docker.io refused the relay: its pull rate limit for 203.0.113.7")
    assert "(limit 100 pulls per 6 h)" in message
    assert "not on you; retry in 60 s" in message
    # Right with a pool of accounts or a CDN's 429 too: no advice to log the relay in.
    assert "log the relay in" not in message
    assert "address" not in message


@pytest.mark.parametrize(("window", "text"), [(120, "per 2 min"), (45, "per 45 s")])
def test_message_windows(window, text):
    message = ratelimit.too_many_requests_message("docker.io", RateLimit(5, 0, window, None), 1)
    assert text in message


def test_message_without_budget():
    message = ratelimit.too_many_requests_message("docker.io", None, 3600)
    assert "its pull rate limit was hit" in message
