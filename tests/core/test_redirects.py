"""Redirect policy: resolve Location, limit hops, refuse what is not http(s)."""

from __future__ import annotations

import pytest

from vpsrelay import errors
from vpsrelay.core import headers
from vpsrelay.core.redirects import RedirectPolicy, UpstreamRequest, next_hop

HUB = "https://registry.test/v2/library/alpine/blobs/sha256:" + "0" * 64
HEADERS = headers.upstream_request_headers(
    [("authorization", "Bearer t"), ("range", "bytes=0-9"), ("accept", "*/*")], "vpsrelay/test"
)
FIRST = UpstreamRequest("GET", HUB, HEADERS)
POLICY = RedirectPolicy()


@pytest.mark.parametrize(
    ("location", "url"),
    [
        ("https://cdn.test/blob?sig=abc", "https://cdn.test/blob?sig=abc"),
        ("/other/path", "https://registry.test/other/path"),
        ("relative", "https://registry.test/v2/library/alpine/blobs/relative"),
        ("?x=1", HUB + "?x=1"),
        ("//cdn.test/p", "https://cdn.test/p"),
        ("  https://cdn.test/blob  ", "https://cdn.test/blob"),
        ("http://cdn.test:8080/b", "http://cdn.test:8080/b"),
    ],
)
def test_location_is_resolved(location, url):
    assert next_hop(FIRST, location, 0, POLICY).url == url


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_method_is_kept(method):
    request = UpstreamRequest(method, HUB, HEADERS)
    assert next_hop(request, "https://cdn.test/b", 0, POLICY).method == method


def test_cross_origin_hop_drops_authorization():
    hop = next_hop(FIRST, "https://cdn.test/b", 0, POLICY)
    assert headers.get(hop.headers, "authorization") is None
    assert headers.get(hop.headers, "range") == "bytes=0-9"
    assert headers.get(hop.headers, "accept-encoding") == "identity"


@pytest.mark.parametrize("location", ["/v2/elsewhere", "https://registry.test:443/x"])
def test_same_origin_hop_keeps_headers(location):
    assert next_hop(FIRST, location, 0, POLICY).headers == HEADERS


def test_scheme_change_is_cross_origin():
    hop = next_hop(FIRST, "http://registry.test/x", 0, POLICY)
    assert headers.get(hop.headers, "authorization") is None


@pytest.mark.parametrize("hops_done", [0, 1, 4])
def test_hops_within_the_limit(hops_done):
    assert next_hop(FIRST, "https://cdn.test/b", hops_done, RedirectPolicy(max_hops=5)).url == (
        "https://cdn.test/b"
    )


@pytest.mark.parametrize(("max_hops", "hops_done"), [(5, 5), (5, 6), (1, 1), (0, 0)])
def test_too_many_redirects(max_hops, hops_done):
    with pytest.raises(errors.TooManyRedirects) as info:
        next_hop(FIRST, "https://cdn.test/b", hops_done, RedirectPolicy(max_hops=max_hops))
    assert info.value.status == 502


@pytest.mark.parametrize("location", [None, "", "   ", "\t"])
def test_missing_or_blank_location_is_refused(location):
    # a blank Location must not resolve to the request's own URL (a self-redirect)
    with pytest.raises(errors.RedirectRefused):
        next_hop(FIRST, location, 0, POLICY)


@pytest.mark.parametrize(
    "location",
    [
        "ftp://cdn.test/blob",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "gopher://cdn.test/",
        "http:///path-only",
        "https://:443/no-host",
    ],
)
def test_non_http_locations_are_refused(location):
    with pytest.raises(errors.RedirectRefused) as info:
        next_hop(FIRST, location, 0, POLICY)
    assert info.value.status == 502


@pytest.mark.parametrize(
    "location", ["https://cdn.test:abc/b", "https://cdn.test:99999/b", "http://[::1/b"]
)
def test_location_with_bad_port_is_refused(location):
    with pytest.raises(errors.RedirectRefused):
        next_hop(FIRST, location, 0, POLICY)


def test_default_policy():
    assert RedirectPolicy().max_hops == 5


@pytest.mark.parametrize(
    "location",
    [
        "http://127.0.0.1\\evil/blob",
        "http://cdn.test\\@127.0.0.1/blob",
        "http://cdn test/blob",
        "http://cdn%2etest/blob",
        "http://-cdn.test/blob",
        "http://" + "a" * 64 + ".test/blob",
    ],
)
def test_a_location_whose_host_is_no_dns_name_is_refused_before_any_lookup(location):
    """A host a resolver must never be asked about (issue 12, finding 13)."""
    with pytest.raises(errors.RedirectRefused):
        next_hop(FIRST, location, 0, POLICY)


@pytest.mark.parametrize(
    "location",
    [
        "http://xn--bcher-kva.test/b",
        "http://[2001:db8::1]:8080/b",
        "http://10.0.0.1/b",
        "http://cdn.test./b",
    ],
)
def test_ip_literals_and_idna_names_are_followed(location):
    assert next_hop(FIRST, location, 0, POLICY).url.startswith(location.split("/b")[0])
