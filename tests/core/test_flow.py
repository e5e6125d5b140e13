"""The pull flow, driven by hand: yield a request, send back a head."""

from __future__ import annotations

import pytest

from vpsrelay import errors
from vpsrelay.core import headers
from vpsrelay.core.flow import UpstreamHead, pull_flow
from vpsrelay.core.redirects import RedirectPolicy, UpstreamRequest

HUB = "https://registry.test/v2/library/alpine/blobs/sha256:" + "0" * 64
CDN = "https://cdn.test/blob?sig=abc"
FIRST = UpstreamRequest(
    "GET",
    HUB,
    (("authorization", "Bearer t"), ("user-agent", "ua"), ("accept-encoding", "identity")),
)


def head(status: int, url: str, *extra: tuple[str, str]) -> UpstreamHead:
    return UpstreamHead(status, tuple(extra), url)


def finish(flow, answer: UpstreamHead) -> UpstreamHead:
    with pytest.raises(StopIteration) as stop:
        flow.send(answer)
    result: UpstreamHead = stop.value.value
    return result


def test_redirect_then_200():
    flow = pull_flow(FIRST, RedirectPolicy())
    assert next(flow) == FIRST
    hop = flow.send(head(307, HUB, ("location", CDN)))
    assert hop.method == "GET"
    assert hop.url == CDN
    assert headers.get(hop.headers, "authorization") is None
    assert headers.get(hop.headers, "user-agent") == "ua"
    final = head(200, CDN, ("content-length", "3"))
    assert finish(flow, final) is final


@pytest.mark.parametrize("status", [200, 206, 304, 401, 404, 429, 500, 300])
def test_non_redirect_answer_is_final(status):
    flow = pull_flow(FIRST, RedirectPolicy())
    next(flow)
    answer = head(status, HUB, ("location", CDN))
    assert finish(flow, answer) is answer


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_follow_false_returns_the_redirect_head(status):
    flow = pull_flow(FIRST, RedirectPolicy(), follow=False)
    assert next(flow) == FIRST
    answer = head(status, HUB, ("location", CDN))
    assert finish(flow, answer) is answer


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_is_followed(status):
    flow = pull_flow(FIRST, RedirectPolicy())
    next(flow)
    assert flow.send(head(status, HUB, ("location", CDN))).url == CDN


def test_relative_location_chain():
    flow = pull_flow(FIRST, RedirectPolicy())
    next(flow)
    first_hop = flow.send(head(302, HUB, ("location", "/v2/moved")))
    assert first_hop.url == "https://registry.test/v2/moved"
    assert headers.get(first_hop.headers, "authorization") == "Bearer t"  # same origin
    second_hop = flow.send(head(307, first_hop.url, ("location", CDN)))
    assert second_hop.url == CDN
    assert headers.get(second_hop.headers, "authorization") is None


@pytest.mark.parametrize("max_hops", [1, 3, 5])
def test_too_many_redirects(max_hops):
    flow = pull_flow(FIRST, RedirectPolicy(max_hops=max_hops))
    request = next(flow)
    for n in range(max_hops):
        request = flow.send(head(307, request.url, ("location", f"/hop/{n}")))
        assert request.url == f"https://registry.test/hop/{n}"
    with pytest.raises(errors.TooManyRedirects):
        flow.send(head(307, request.url, ("location", "/one/too/many")))


def test_redirect_without_location_is_refused():
    flow = pull_flow(FIRST, RedirectPolicy())
    next(flow)
    with pytest.raises(errors.RedirectRefused):
        flow.send(head(302, HUB))


def test_redirect_to_other_scheme_is_refused():
    flow = pull_flow(FIRST, RedirectPolicy())
    next(flow)
    with pytest.raises(errors.RedirectRefused):
        flow.send(head(307, HUB, ("location", "ftp://cdn.test/blob")))
