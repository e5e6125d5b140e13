"""Header policy: allowlists in each direction, same-origin, Link rewriting."""

from __future__ import annotations

import pytest
from hypothesis import example, given, strategies as st

from vpsrelay import errors
from vpsrelay.core import headers, routing
from vpsrelay.core.digest import SCHEMA1_SIGNED, ManifestVerifier

AGENT = "vpsrelay/test"

CLIENT_HEADERS = (
    ("accept", "application/vnd.oci.image.index.v1+json"),
    ("authorization", "Bearer client-token"),
    ("range", "bytes=0-99"),
    ("if-match", '"a"'),
    ("if-none-match", '"b"'),
    ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("if-unmodified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ("if-range", '"c"'),
    ("user-agent", "docker/27.0"),
    ("cookie", "session=secret"),
    ("host", "relay.example"),
    ("x-forwarded-for", "1.2.3.4"),
    ("accept-encoding", "gzip"),
    ("connection", "keep-alive"),
    ("proxy-authorization", "Basic c2VjcmV0"),
    ("content-length", "0"),
)


def test_get_and_get_all():
    hs = (("a", "1"), ("b", "2"), ("a", "3"))
    assert headers.get(hs, "a") == "1"
    assert headers.get(hs, "c") is None
    assert headers.get_all(hs, "a") == ["1", "3"]
    assert headers.get_all(hs, "c") == []


def test_select_lower_cases_names():
    assert headers.select(
        [("Content-Type", "x"), ("X-Other", "y")], frozenset({"content-type"})
    ) == (("content-type", "x"),)


def test_upstream_request_headers_allowlist():
    sent = headers.upstream_request_headers(CLIENT_HEADERS, AGENT)
    names = [name for name, _ in sent]
    assert set(names) == headers.REQUEST_ALLOWLIST | {"accept-encoding"}
    for dropped in ("cookie", "host", "x-forwarded-for", "connection", "proxy-authorization"):
        assert dropped not in names
    assert headers.get(sent, "authorization") == "Bearer client-token"
    assert headers.get(sent, "range") == "bytes=0-99"
    for conditional in ("if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
                        "if-range"):  # fmt: skip
        assert headers.get(sent, conditional) == headers.get(CLIENT_HEADERS, conditional)
    # the client's accept-encoding is replaced: the relay forwards bytes as they come
    assert headers.get_all(sent, "accept-encoding") == ["identity"]
    assert headers.get_all(sent, "user-agent") == [f"docker/27.0 {AGENT}"]


def test_upstream_request_headers_without_client_agent():
    sent = headers.upstream_request_headers([("accept", "*/*")], AGENT)
    assert sent == (("accept", "*/*"), ("user-agent", AGENT), ("accept-encoding", "identity"))


def test_upstream_request_headers_keeps_repeated_accept():
    sent = headers.upstream_request_headers([("accept", "a"), ("accept", "b")], AGENT)
    assert headers.get_all(sent, "accept") == ["a", "b"]


def test_redirect_headers_same_origin_keeps_everything():
    previous = headers.upstream_request_headers(CLIENT_HEADERS, AGENT)
    assert headers.redirect_headers(previous, same_origin=True) == previous


def test_redirect_headers_cross_origin_drops_credentials():
    previous = headers.upstream_request_headers(CLIENT_HEADERS, AGENT)
    sent = headers.redirect_headers(previous, same_origin=False)
    names = {name for name, _ in sent}
    assert "authorization" not in names
    assert "accept" not in names
    assert names == headers.CROSS_ORIGIN_ALLOWLIST | {"user-agent", "accept-encoding"}
    assert headers.get(sent, "range") == "bytes=0-99"
    assert headers.get(sent, "accept-encoding") == "identity"
    assert headers.get(sent, "user-agent") == f"docker/27.0 {AGENT}"


def test_client_response_headers_allowlist():
    upstream = [
        ("Content-Type", "application/vnd.oci.image.manifest.v1+json"),
        ("Content-Length", "123"),
        ("Docker-Content-Digest", "sha256:" + "0" * 64),
        ("Docker-Distribution-Api-Version", "registry/2.0"),
        ("RateLimit-Limit", "100;w=21600"),
        ("RateLimit-Remaining", "99;w=21600"),
        ("Docker-RateLimit-Source", "1.2.3.4"),
        ("ETag", '"x"'),
        ("Retry-After", "60"),
        ("Set-Cookie", "tracking=1"),
        ("Strict-Transport-Security", "max-age=1"),
        ("Www-Authenticate", 'Bearer realm="x"'),
        ("Link", "</v2/x>"),
        ("Location", "https://cdn/x"),
        ("Server", "internal"),
        ("Connection", "close"),
        ("Transfer-Encoding", "chunked"),
    ]
    kept = headers.client_response_headers(upstream)
    assert [name for name, _ in kept] == [
        "content-type",
        "content-length",
        "docker-content-digest",
        "docker-distribution-api-version",
        "ratelimit-limit",
        "ratelimit-remaining",
        "docker-ratelimit-source",
        "etag",
        "retry-after",
    ]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("https://r/v2/x", "https://r/other?y", True),
        ("https://r/x", "https://r:443/y", True),
        ("http://r/x", "http://r:80/y", True),
        ("https://R/x", "https://r/x", True),
        ("https://r/x", "http://r/x", False),
        ("https://r/x", "https://r:8443/x", False),
        ("https://r/x", "https://cdn/x", False),
        ("https://r/x", "https://sub.r/x", False),
        ("http://a:5000/x", "http://a:5000/y", True),
        ("ftp://a/x", "ftp://a/y", True),  # no default port, but the same
    ],
)
def test_same_origin(a, b, same):
    assert headers.same_origin(a, b) is same
    assert headers.same_origin(b, a) is same


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            '</v2/library/alpine/tags/list?last=3.19&n=2>; rel="next"',
            '</v2/alpine/tags/list?last=3.19&n=2>; rel="next"',
        ),
        (
            '<https://registry-1.docker.io/v2/library/alpine/tags/list?n=2&last=b>; rel="next"',
            '</v2/alpine/tags/list?n=2&last=b>; rel="next"',
        ),
        ("</v2/library/alpine/tags/list>", "</v2/alpine/tags/list>"),
        # another repository's path is only stripped of its origin
        ('<https://r/v2/library/busybox/tags/list?n=1>; rel="next"',
         '</v2/library/busybox/tags/list?n=1>; rel="next"'),
        # a prefix match on the name only, never on a longer name
        ("</v2/library/alpine2/tags/list>", "</v2/library/alpine2/tags/list>"),
        ('  </v2/library/alpine/tags/list?n=1>; rel="next"',
         '</v2/alpine/tags/list?n=1>; rel="next"'),
        # not a Link value at all: unchanged
        ("", ""),
        ("garbage", "garbage"),
        ("/v2/library/alpine/tags/list", "/v2/library/alpine/tags/list"),
        ('x</v2/library/alpine/tags/list>; rel="next"',
         'x</v2/library/alpine/tags/list>; rel="next"'),
    ],
)  # fmt: skip
def test_rewrite_link(value, expected):
    assert headers.rewrite_link(value, "library/alpine", "alpine") == expected


def test_rewrite_link_same_names():
    link = '</v2/bitnami/redis/tags/list?n=5&last=7>; rel="next"'
    assert headers.rewrite_link(link, "bitnami/redis", "bitnami/redis") == link


def test_rewrite_link_with_invalid_ipv6_host_is_left_alone():
    value = '<http://[oops/v2/library/alpine/tags/list>; rel="next"'
    assert headers.rewrite_link(value, "library/alpine", "alpine") == value


LINK_PIECES = st.sampled_from(
    ["<", ">", ";", " ", "/v2/", "library/alpine/", "tags/list", "?", "n=1", "&", "http://",
     "https://", "[", "]", ":", "x", "rel=\"next\"", "%", "#", "é", "\n"]
)  # fmt: skip
LINKS = st.one_of(st.text(), st.lists(LINK_PIECES, max_size=20).map("".join))


@given(LINKS)
@example("<http://[>")  # urlsplit raises ValueError on this one
@example("<http://[::1>; rel=next")
def test_rewrite_link_never_raises(value):
    rewritten = headers.rewrite_link(value, "library/alpine", "alpine")
    assert isinstance(rewritten, str)


# --- the digest a relayed body must hash to (issue 12, finding 10)

BODY_DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


def _route(kind: routing.Kind, reference: str) -> routing.Route:
    return routing.Route(kind, name="library/x", upstream_name="library/x", reference=reference)


@pytest.mark.parametrize("kind", [routing.Kind.BLOB, routing.Kind.MANIFEST])
def test_by_digest_the_reference_is_checked_and_is_the_only_digest_sent(
    kind: routing.Kind,
) -> None:
    upstream = (("content-type", "x"), ("docker-content-digest", OTHER_DIGEST))
    sent, verifier = headers.checked_digest(_route(kind, BODY_DIGEST), "GET", 200, upstream)
    assert verifier is not None
    assert str(verifier.expected) == BODY_DIGEST
    assert headers.get_all(sent, "docker-content-digest") == [BODY_DIGEST]
    assert headers.get(sent, "content-type") == "x"


def test_by_tag_the_announced_digest_is_checked() -> None:
    upstream = (("docker-content-digest", f" {OTHER_DIGEST} "),)
    route = _route(routing.Kind.MANIFEST, "latest")
    sent, verifier = headers.checked_digest(route, "GET", 200, upstream)
    assert verifier is not None
    assert str(verifier.expected) == OTHER_DIGEST
    assert sent == (("docker-content-digest", OTHER_DIGEST),)


@pytest.mark.parametrize("kind", [routing.Kind.BLOB, routing.Kind.MANIFEST])
def test_only_a_manifest_may_match_as_signed_schema_1(kind: routing.Kind) -> None:
    upstream = (("content-type", SCHEMA1_SIGNED),)
    _, verifier = headers.checked_digest(_route(kind, BODY_DIGEST), "GET", 200, upstream)
    assert isinstance(verifier, ManifestVerifier) is (kind is routing.Kind.MANIFEST)


@pytest.mark.parametrize("announced", ["sha256:short", "md5:" + "a" * 32, "garbage"])
def test_by_tag_an_announcement_that_cannot_be_checked_is_dropped(announced: str) -> None:
    route = _route(routing.Kind.MANIFEST, "latest")
    upstream = (("docker-content-digest", announced), ("etag", '"e"'))
    sent, verifier = headers.checked_digest(route, "GET", 200, upstream)
    assert verifier is None
    assert sent == (("etag", '"e"'),)


@pytest.mark.parametrize(
    ("kind", "reference", "method", "status"),
    [
        (routing.Kind.BLOB, BODY_DIGEST, "HEAD", 200),
        (routing.Kind.BLOB, BODY_DIGEST, "GET", 206),
        (routing.Kind.MANIFEST, "latest", "GET", 404),
        (routing.Kind.TAGS, "", "GET", 200),
    ],
)
def test_nothing_is_checked_without_a_whole_body(
    kind: routing.Kind, reference: str, method: str, status: int
) -> None:
    upstream = (("docker-content-digest", OTHER_DIGEST),)
    sent, verifier = headers.checked_digest(_route(kind, reference), method, status, upstream)
    assert (sent, verifier) == (upstream, None)


def test_a_digest_the_relay_cannot_verify_is_refused() -> None:
    route = _route(routing.Kind.MANIFEST, "sha384:" + "a" * 96)
    with pytest.raises(errors.DigestInvalid):
        headers.checked_digest(route, "GET", 200, ())
