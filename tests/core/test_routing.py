"""Request routing: every path form, the read-only refusals and name validation."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vpsrelay import errors
from vpsrelay.core import grammar, routing
from vpsrelay.core.routing import Kind, Route

DIGEST = "sha256:" + "0123456789abcdef" * 4
OTHER_DIGEST = "sha512:" + "f" * 128


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v2/", Route(Kind.BASE)),
        ("GET", "/v2", Route(Kind.BASE)),
        ("HEAD", "/v2/", Route(Kind.BASE)),
        ("GET", "/token", Route(Kind.TOKEN, "")),  # the app picks the registry from scopes
        ("GET", "/token/docker.io", Route(Kind.TOKEN)),
        ("POST", "/token", Route(Kind.TOKEN, "")),
        (
            "GET",
            "/v2/alpine/manifests/latest",
            Route(Kind.MANIFEST, "docker.io", "alpine", "library/alpine", "latest"),
        ),
        (
            "HEAD",
            "/v2/alpine/manifests/3.20",
            Route(Kind.MANIFEST, "docker.io", "alpine", "library/alpine", "3.20"),
        ),
        (
            "GET",
            f"/v2/library/alpine/manifests/{DIGEST}",
            Route(Kind.MANIFEST, "docker.io", "library/alpine", "library/alpine", DIGEST),
        ),
        (
            "GET",
            f"/v2/grafana/grafana/blobs/{DIGEST}",
            Route(Kind.BLOB, "docker.io", "grafana/grafana", "grafana/grafana", DIGEST),
        ),
        (
            "HEAD",
            f"/v2/alpine/blobs/{OTHER_DIGEST}",
            Route(Kind.BLOB, "docker.io", "alpine", "library/alpine", OTHER_DIGEST),
        ),
        (
            "GET",
            "/v2/alpine/tags/list",
            Route(Kind.TAGS, "docker.io", "alpine", "library/alpine", ""),
        ),
        (
            "GET",
            "/v2/a/b/c/tags/list",
            Route(Kind.TAGS, "docker.io", "a/b/c", "a/b/c", ""),
        ),
        (
            "GET",
            f"/v2/alpine/referrers/{DIGEST}",
            Route(Kind.REFERRERS, "docker.io", "alpine", "library/alpine", DIGEST),
        ),
        # A name whose components look like operations: the *last* marker wins.
        (
            "GET",
            "/v2/blobs/manifests/latest",
            Route(Kind.MANIFEST, "docker.io", "blobs", "library/blobs", "latest"),
        ),
        (
            "GET",
            f"/v2/x/manifests/y/blobs/{DIGEST}",
            Route(Kind.BLOB, "docker.io", "x/manifests/y", "x/manifests/y", DIGEST),
        ),
        (
            "GET",
            "/v2/tags/list/tags/list",
            Route(Kind.TAGS, "docker.io", "tags/list", "tags/list", ""),
        ),
    ],
)
def test_routes(method, path, expected):
    assert routing.route(method, path) == expected


@pytest.mark.parametrize(
    ("name", "upstream_name"),
    [
        ("alpine", "library/alpine"),
        ("library/alpine", "library/alpine"),
        ("bitnami/redis", "bitnami/redis"),
        ("a/b/c", "a/b/c"),
    ],
)
def test_library_shorthand_only_for_one_segment_names(name, upstream_name):
    assert routing.to_upstream_name("docker.io", name) == upstream_name
    assert routing.route("GET", f"/v2/{name}/manifests/latest").upstream_name == upstream_name


def test_library_shorthand_only_on_docker_hub():
    assert routing.to_upstream_name("ghcr.io", "alpine") == "alpine"


@pytest.mark.parametrize("name", ["Alpine", "..", "", "-x", "a//b"])
def test_to_upstream_name_rejects_invalid_names(name):
    with pytest.raises(errors.NameInvalid):
        routing.to_upstream_name("docker.io", name)


@pytest.mark.parametrize(
    ("route", "path"),
    [
        (Route(Kind.BASE), "/v2/"),
        (Route(Kind.MANIFEST, name="alpine", upstream_name="library/alpine", reference="latest"),
         "/v2/library/alpine/manifests/latest"),
        (Route(Kind.BLOB, name="x/y", upstream_name="x/y", reference=DIGEST),
         f"/v2/x/y/blobs/{DIGEST}"),
        (Route(Kind.TAGS, name="alpine", upstream_name="library/alpine"),
         "/v2/library/alpine/tags/list"),
        (Route(Kind.REFERRERS, name="alpine", upstream_name="library/alpine", reference=DIGEST),
         f"/v2/library/alpine/referrers/{DIGEST}"),
        (Route(Kind.TOKEN), ""),
    ],
)  # fmt: skip
def test_upstream_path(route, path):
    assert route.upstream_path == path


@pytest.mark.parametrize(("reference", "is_digest"), [("latest", False), (DIGEST, True)])
def test_reference_is_digest(reference, is_digest):
    assert Route(Kind.MANIFEST, reference=reference).reference_is_digest is is_digest


@pytest.mark.parametrize(
    ("method", "path"),
    [
        # uploads, whatever the method
        ("POST", "/v2/alpine/blobs/uploads/"),
        ("GET", "/v2/alpine/blobs/uploads/"),
        ("GET", "/v2/alpine/blobs/uploads"),
        ("PATCH", "/v2/alpine/blobs/uploads/0f1e-uuid"),
        ("PUT", "/v2/alpine/blobs/uploads/0f1e-uuid?digest=x"),
        ("HEAD", "/v2/library/alpine/blobs/uploads/0f1e-uuid"),
        # writes and deletes
        ("PUT", "/v2/alpine/manifests/latest"),
        ("DELETE", "/v2/alpine/manifests/latest"),
        ("DELETE", f"/v2/alpine/blobs/{DIGEST}"),
        ("PATCH", "/v2/alpine/manifests/latest"),
        ("POST", "/v2/alpine/manifests/latest"),
        ("POST", "/v2/"),
        ("PUT", "/v2"),
        ("OPTIONS", "/v2/"),
        ("POST", "/v2/not/even/a/route"),  # the method is refused before the path is parsed
        # /token takes GET and POST only
        ("PUT", "/token"),
        ("DELETE", "/token"),
        ("HEAD", "/token"),
    ],
)
def test_unsupported_is_405(method, path):
    with pytest.raises(errors.Unsupported) as info:
        routing.route(method, path)
    assert info.value.status == 405
    assert info.value.code == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", ""),
        ("GET", "/v1/_ping"),
        ("GET", "/v2x"),
        ("GET", "/v22/"),
        ("GET", "/token/"),
        ("GET", "/tokens"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v2/alpine"),
        ("GET", "/v2/alpine/"),
        ("GET", "/v2/alpine/manifests"),
        ("GET", "/v2/alpine/manifests/"),
        ("GET", "/v2/alpine/tags"),
        ("GET", "/v2/alpine/tags/list/"),
        ("GET", "/v2/alpine/unknown/latest"),
        ("PUT", "/anything"),  # an unknown path is 404 before the method is looked at
        ("DELETE", "/"),
    ],
)
def test_unknown_paths_are_404(method, path):
    with pytest.raises(errors.NotFound) as info:
        routing.route(method, path)
    assert info.value.status == 404


@pytest.mark.parametrize(
    ("path", "error", "code"),
    [
        ("/v2/Alpine/manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/../manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/a/../b/manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        ("/v2//alpine/manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/-alpine/manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/.alpine/tags/list", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/alpine./tags/list", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/ALPINE/tags/list", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/host:5000/x/tags/list", errors.NameInvalid, "NAME_INVALID"),
        (f"/v2/{'a' * 256}/manifests/latest", errors.NameInvalid, "NAME_INVALID"),
        (f"/v2/{'a' * 256}/blobs/{DIGEST}", errors.NameInvalid, "NAME_INVALID"),
        ("/v2/alpine/manifests/.latest", errors.ManifestUnknown, "MANIFEST_UNKNOWN"),
        (f"/v2/alpine/manifests/{'a' * 129}", errors.ManifestUnknown, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/latest/extra", errors.ManifestUnknown, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/sha256:abc", errors.DigestInvalid, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:../x", errors.DigestInvalid, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:../x", errors.DigestInvalid, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:../../../etc/passwd", errors.DigestInvalid, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/latest", errors.DigestInvalid, "DIGEST_INVALID"),
        (f"/v2/alpine/blobs/sha256:{'0' * 63}", errors.DigestInvalid, "DIGEST_INVALID"),
        (f"/v2/alpine/blobs/sha256:{'A' * 64}", errors.DigestInvalid, "DIGEST_INVALID"),
        ("/v2/alpine/referrers/latest", errors.DigestInvalid, "DIGEST_INVALID"),
    ],
)
def test_malformed_names_and_references_are_refused(path, error, code):
    with pytest.raises(error) as info:
        routing.route("GET", path)
    # A malformed tag names a manifest that can never exist: 404, as the spec answers.
    assert info.value.status == (404 if code == "MANIFEST_UNKNOWN" else 400)
    assert info.value.code == code


def test_name_of_255_characters_is_accepted():
    name = "a" * 255
    assert routing.route("GET", f"/v2/{name}/tags/list").name == name


PATH_ALPHABET = st.sampled_from(
    [
        *"abcAZ09-._/:@%?#\n ",
        *("/v2/", "manifests", "blobs", "tags/list", "uploads", "referrers", "sha256:", ".."),
        *("0123456789abcdef" * 4, "é"),
    ]
)
PATHS = st.one_of(
    st.text(),
    st.lists(PATH_ALPHABET, max_size=20).map("".join),
    st.lists(PATH_ALPHABET, max_size=12).map(lambda parts: "/v2/" + "".join(parts)),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]), st.text()
)


@given(METHODS, PATHS)
def test_route_raises_only_relay_errors_and_names_are_valid(method, path):
    try:
        result = routing.route(method, path)
    except errors.RelayError as exc:
        status = exc.status
        assert 400 <= status < 500
        return
    if result.kind in (Kind.BASE, Kind.TOKEN):
        assert result.name == ""
        return
    assert method in routing.READ_METHODS
    assert grammar.is_valid_name(result.name)
    assert grammar.is_valid_name(result.upstream_name)
    if result.kind is Kind.TAGS:
        assert result.reference == ""
    elif result.kind is Kind.MANIFEST and not result.reference_is_digest:
        assert grammar.is_valid_tag(result.reference)
    else:
        assert grammar.is_valid_digest(result.reference)


@pytest.mark.parametrize("path", ["/download", "/download/alpine:3", "/download/a/b@sha256:x"])
def test_downloads_route_to_their_handler(path):
    assert routing.route("GET", path) == Route(Kind.DOWNLOAD, "")
    assert routing.route("HEAD", path).upstream_path == ""


def test_downloads_are_read_only():
    with pytest.raises(errors.Unsupported):
        routing.route("POST", "/download/alpine")
    with pytest.raises(errors.NotFound):
        routing.route("GET", "/downloads/alpine")
