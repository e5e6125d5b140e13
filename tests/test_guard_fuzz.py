"""Property-based fuzzing of the whole ASGI app (guard, routing, auth) with raw ASGI scopes.

Raw scopes, not httpx, in front: httpx normalizes paths (`..` segments go) and refuses
odd headers, and the point is to send what an attacker would. Behind the app, an
`httpx.MockTransport` upstream records every request it is asked.

Properties: the relay answers every request, never with a 5xx (the upstream stand-in
never fails, so a 5xx could only come from the relay's own code), and never asks the
upstream for a repository name that is not valid. `test_fuzz_with_the_cache_on` holds
them with the blob cache on, warmed before every request (hits, grants, ranges, HEAD).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

import bcrypt
import httpx
import trio
from hypothesis import (
    HealthCheck,
    event,
    example,
    given,
    settings as hypothesis_settings,
    strategies as st,
)

from tests.test_app import reply
from vpsrelay import config
from vpsrelay.app import RelayApp
from vpsrelay.cache.store import DiskStore
from vpsrelay.core import grammar
from vpsrelay.upstream import Upstream

if TYPE_CHECKING:
    from pathlib import Path

HUB = "http://hub.test"
_UPSTREAM_PATH = re.compile(
    r"/v2/(?P<name>.+)/(?:manifests|blobs|referrers)/[^/]+|/v2/(?P<tname>.+)/tags/list"
)

SEGMENTS = st.sampled_from(
    ["v2", "library", "alpine", "..", ".", "", "%2e%2e", "%2f", "manifests", "blobs", "tags",
     "list", "uploads", "referrers", "latest", "sha256:" + "a" * 64, "sha256:..", "ghcr.io",
     "ghcr", "127.0.0.1:9", "A", "a" * 300, "token", "v1", "search", "..;", "\x00", "é", "_x"]
)  # fmt: skip
NAME_PARTS = st.sampled_from(
    ["library", "alpine", "ghcr", "ghcr.io", "docker.io", "a.b", "x-y", "app", "org", "..",
     ".", "", "A",
     "a__b", "-x", "%2e%2e", "127.0.0.1:9", "evil.test", "quay"]
)  # fmt: skip
REFERENCES = st.sampled_from(
    ["latest", "v1.0", "sha256:" + "a" * 64, "sha256:" + "A" * 64, "md5:abc", "..", "-bad", ""]
)
API_PATHS = st.builds(
    lambda name, op, ref: f"/v2/{'/'.join(name)}/{op}/{ref}" if op != "tags" else
    f"/v2/{'/'.join(name)}/tags/list",
    st.lists(NAME_PARTS, min_size=1, max_size=4),
    st.sampled_from(["manifests", "blobs", "tags", "referrers"]),
    REFERENCES,
)  # fmt: skip
PATHS = st.one_of(
    API_PATHS,
    API_PATHS,
    API_PATHS,
    st.lists(SEGMENTS, min_size=0, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    st.lists(SEGMENTS, min_size=1, max_size=6).map(lambda p: "/v2/" + "/".join(p)),
    st.text(max_size=60),
    st.sampled_from(["http://evil.test/v2/", "evil.test:443", "*", "//evil.test/v2/"]),
)
QUERIES = st.one_of(
    st.just(""),
    st.sampled_from(["ns=docker.io", "ns=127.0.0.1:9", "ns=", "n=2&last=a", "q=alp",
                     "scope=repository:x:pull", "service=x&scope=repository:../x:pull"]),
    st.text(st.characters(codec="latin-1"), max_size=40),
)  # fmt: skip
HEADER_NAMES = st.sampled_from(
    ["host", "user-agent", "authorization", "x-forwarded-for", "x-forwarded-host",
     "x-forwarded-proto", "accept", "range", "content-length", "x-junk"]
)  # fmt: skip
HEADER_VALUES = st.one_of(
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=60),
    st.sampled_from(["zgrab", "Bearer x.y.z", "Basic YWxpY2U6cHc=", "Basic !!", "127.0.0.1",
                     "relay.test", "evil.test", "ghcr.relay.test", "bytes=0-1"]),
)  # fmt: skip
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD"]),
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "get"]),
)


# What the stand-in holds for every repository, so that the cache fills and hits.
CACHED_BLOB = b"cached layer " * 1000
CACHED_BLOB_DIGEST = "sha256:" + hashlib.sha256(CACHED_BLOB).hexdigest()
CACHED_MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
CACHED_MANIFEST_DIGEST = "sha256:" + hashlib.sha256(CACHED_MANIFEST).hexdigest()
WARM_PATHS = (f"/v2/alpine/blobs/{CACHED_BLOB_DIGEST}", "/v2/alpine/manifests/latest")
# Flat choices (hypothesis draws them evenly) of what the cache holds, under names the
# relay accepts (odd names are the other fuzz tests' part), and the headers it reads.
CACHE_API_PATHS = st.sampled_from(
    [
        f"/v2/{name}/{kind}/{reference}"
        for name in ("alpine", "library/alpine", "org/app")
        for kind, reference in (
            ("blobs", CACHED_BLOB_DIGEST),
            ("blobs", "sha256:" + "a" * 64),
            ("manifests", CACHED_MANIFEST_DIGEST),
            ("manifests", "latest"),
            ("manifests", "v1"),
        )
    ]
)


def upstream_handler(seen: list[httpx.Request], *, images: bool) -> httpx.MockTransport:
    """Answers `/v2/`, and 404 to everything else, unless it holds `images` (the cached
    blob and manifest in every repository)."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path
        if path == "/v2/":
            return reply(200, {"content-type": "application/json"}, b"{}")
        if images and path.endswith(f"/blobs/{CACHED_BLOB_DIGEST}"):
            length = {"content-length": str(len(CACHED_BLOB))}
            return reply(200, length, b"" if request.method == "HEAD" else CACHED_BLOB)
        if images and path.endswith(("/manifests/latest", f"/manifests/{CACHED_MANIFEST_DIGEST}")):
            headers = {
                "content-type": "application/vnd.oci.image.manifest.v1+json",
                "docker-content-digest": CACHED_MANIFEST_DIGEST,
                "content-length": str(len(CACHED_MANIFEST)),
            }
            return reply(200, headers, b"" if request.method == "HEAD" else CACHED_MANIFEST)
        body = b'{"errors": [{"code": "NOT_FOUND", "message": "x"}]}'
        return reply(404, {"content-type": "application/json"}, body)

    return httpx.MockTransport(handle)


async def call(
    app: RelayApp, method: str, path: str, query: str, headers: list[tuple[str, str]]
) -> int:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query.encode("latin-1"),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("203.0.113.5", 40000),
        "server": ("127.0.0.1", 5000),
    }
    statuses: list[int] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    with trio.fail_after(10):
        await app(scope, receive, send)
    assert len(statuses) == 1
    return statuses[0]


def build(
    data_dir: Path, *, auth: bool, cache: bool = False
) -> tuple[RelayApp, list[httpx.Request]]:
    overrides: dict[str, object] = {
        "data_dir": str(data_dir),
        "server.allowed_hosts": ["relay.test", "127.0.0.1"],
        "server.base_domains": ["relay.test"],
        "server.trusted_proxies": ["203.0.113.0/24"],
    }
    if auth:
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
        overrides["auth.enabled"] = True
        overrides["auth.users"] = [f"alice:{hashed}"]
    settings = config.load(None, {}, overrides, upstreams={"docker.io": HUB})
    seen: list[httpx.Request] = []
    # The store is kept across examples (one tmp_path): later examples hit what earlier filled.
    store = DiskStore.open_dir(data_dir, settings.cache) if cache else None
    upstream = Upstream(settings, transport=upstream_handler(seen, images=cache))
    return RelayApp(settings, upstream, store), seen


def check_upstream_requests(seen: list[httpx.Request]) -> None:
    for request in seen:
        path = request.url.path
        if path in ("/v2/", "/v1/search"):
            continue
        found = _UPSTREAM_PATH.fullmatch(path)
        assert found is not None, path
        name = found["name"] or found["tname"]
        assert grammar.is_valid_name(name), path


REQUESTS = st.tuples(
    METHODS, PATHS, QUERIES, st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6)
)


def _run(
    tmp_path: Path,
    auth: bool,
    request: tuple[str, str, str, list[tuple[str, str]]],
    *,
    cache: bool = False,
) -> None:
    method, path, query, headers = request
    app, seen = build(tmp_path, auth=auth, cache=cache)

    async def main() -> None:
        try:
            if cache:  # warm: the fuzzed request may then hit, join or revalidate
                for warm in WARM_PATHS:
                    assert await call(app, "GET", warm, "", [("host", "relay.test")]) == 200
                seen.clear()
            status = await call(app, method, path, query, headers)
        finally:
            await app.upstream.aclose()
            if app.cache is not None:
                await app.cache.store.aclose()
        event(f"status {status}")
        event("reached upstream" if any(r.url.path != "/v2/" for r in seen) else "refused")
        assert status < 500, (method, path, query, headers, status)
        check_upstream_requests(seen)
        if status == 400 and seen:
            # A refused name must not have been asked about first.
            assert all(r.url.path == "/v2/" for r in seen), seen

    trio.run(main)


FUZZ = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(request=REQUESTS)
def test_fuzz_open_relay(
    tmp_path: Path, request: tuple[str, str, str, list[tuple[str, str]]]
) -> None:
    _run(tmp_path, False, request)


@FUZZ
@given(request=REQUESTS)
def test_fuzz_with_client_auth(
    tmp_path: Path, request: tuple[str, str, str, list[tuple[str, str]]]
) -> None:
    _run(tmp_path, True, request)


API_REQUESTS = st.tuples(
    st.sampled_from(["GET", "HEAD"]),
    API_PATHS,
    QUERIES,
    st.lists(
        st.tuples(st.sampled_from(["accept", "range", "user-agent"]), HEADER_VALUES), max_size=2
    ),
)


@FUZZ
@given(request=API_REQUESTS)
def test_fuzz_api_paths(
    tmp_path: Path, request: tuple[str, str, str, list[tuple[str, str]]]
) -> None:
    _run(tmp_path, False, request)


CACHE_HEADER_VALUES = st.sampled_from(
    ["bytes=0-0", "bytes=5-", "bytes=-5", "bytes=99999999-", "bytes=9-2", "bytes=0-1,4-5",
     "bytes=-0", "bytes=x", "application/vnd.oci.image.manifest.v1+json", "*/*",
     "text/html;q=0", "Bearer x.y.z", "Bearer anonymous", "Basic YWxpY2U6cHc=", "", "\x7f"]
)  # fmt: skip
CACHE_REQUESTS = st.tuples(
    st.sampled_from(["GET", "HEAD"]),
    CACHE_API_PATHS,
    st.sampled_from(["", "ns=docker.io", "ns=127.0.0.1:9"]),
    st.lists(
        st.tuples(st.sampled_from(["accept", "range", "authorization"]), CACHE_HEADER_VALUES),
        max_size=3,
    ).map(lambda headers: [("host", "relay.test"), *headers]),
)


@FUZZ
@given(request=CACHE_REQUESTS)
@example(request=("GET", WARM_PATHS[0], "", [("host", "relay.test"), ("range", "bytes=9999999-")]))
@example(
    request=("HEAD", WARM_PATHS[1], "", [("host", "relay.test"), ("authorization", "Basic !")])
)
def test_fuzz_with_the_cache_on(
    tmp_path: Path, request: tuple[str, str, str, list[tuple[str, str]]]
) -> None:
    _run(tmp_path, False, request, cache=True)


def test_fuzz_harness_sees_upstream_requests(tmp_path: Path) -> None:
    """The properties are not vacuous: a valid request does reach the stand-in."""
    app, seen = build(tmp_path, auth=False)

    async def main() -> None:
        status = await call(app, "GET", "/v2/alpine/manifests/latest", "", [("host", "relay.test")])
        await app.upstream.aclose()
        assert status == 404
        assert [r.url.path for r in seen] == ["/v2/library/alpine/manifests/latest"]

    trio.run(main)
