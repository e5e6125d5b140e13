"""The cache's pure decisions: sizes, ranges, eviction, freshness, authorization."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import cachepolicy as policy
from vpsrelay.core.cachepolicy import Entry, GiB, MiB

if TYPE_CHECKING:
    from random import Random


@pytest.mark.parametrize(
    ("text", "size"),
    [("50GiB", 50 * GiB), ("500 MB", 500_000_000), ("1024", 1024), (7, 7), ("1.5GiB", 3 * GiB // 2),
     ("10mib", 10 * MiB), ("2T", 2 * 1000**4)],
)  # fmt: skip
def test_parse_size(text: object, size: int) -> None:
    assert policy.parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "GiB", "10 parsecs", "-1", True, -5, 1.5, None, "1e9"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        policy.parse_size(bad)


@given(st.text(max_size=20))
def test_parse_size_only_value_errors(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert policy.parse_size(text) >= 0


def test_format_size() -> None:
    assert policy.format_size(512) == "512 B"
    assert policy.format_size(3 * MiB // 2) == "1.5 MiB"
    assert policy.format_size(5 * 1024 * GiB) == "5.0 TiB"


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-4", 10, (0, 4)),
        ("bytes=5-", 10, (5, 9)),
        ("bytes=-3", 10, (7, 9)),
        ("bytes=-30", 10, (0, 9)),
        ("bytes=2-100", 10, (2, 9)),
        ("bytes=5-2", 10, None),  # invalid: ignored, whole body
        ("bytes=0-1,4-5", 10, None),  # multi-range: whole body
        ("items=0-1", 10, None),
        ("bytes=-", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    got = policy.parse_range(header, size)
    assert (None if got is None else (got.first, got.last)) == expected
    if got is not None:
        assert got.content_range() == f"bytes {got.first}-{got.last}/{size}"
        assert got.length == got.last - got.first + 1


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=-5", 0)])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(policy.Unsatisfiable):
        policy.parse_range(header, size)


@given(st.text(max_size=30), st.integers(min_value=0, max_value=10**12))
def test_parse_range_stays_inside(header: str, size: int) -> None:
    try:
        got = policy.parse_range(header, size)
    except policy.Unsatisfiable:
        return
    if got is not None:
        assert 0 <= got.first <= got.last < size


def _entries(*specs: tuple[str, int, float, bool]) -> list[Entry]:
    return [Entry(*spec) for spec in specs]


def test_eviction_takes_least_recently_used_first_and_skips_busy() -> None:
    entries = _entries(("a", 4, 1.0, False), ("b", 4, 0.5, True), ("c", 4, 2.0, False))
    victims, fits = policy.plan_eviction(
        entries, used=12, max_size=14, free=10**9, min_free=0, incoming=4
    )
    assert victims == ["a"]  # b is older but busy
    assert fits


def test_eviction_for_the_free_space_floor() -> None:
    entries = _entries(("a", 5, 1.0, False), ("b", 5, 2.0, False))
    victims, fits = policy.plan_eviction(
        entries, used=10, max_size=100, free=12, min_free=10, incoming=4
    )
    assert victims == ["a"]
    assert fits


def test_eviction_cannot_make_room_when_all_busy() -> None:
    entries = _entries(("a", 5, 1.0, True))
    assert policy.plan_eviction(
        entries, used=5, max_size=8, free=10**9, min_free=0, incoming=4
    ) == (["a"][:0], False)


def test_eviction_refuses_objects_larger_than_the_cap() -> None:
    assert policy.plan_eviction([], used=0, max_size=8, free=10**9, min_free=0, incoming=9) == (
        [],
        False,
    )


def test_no_eviction_when_it_fits() -> None:
    entries = _entries(("a", 5, 1.0, False))
    assert policy.plan_eviction(
        entries, used=5, max_size=100, free=10**9, min_free=0, incoming=4
    ) == ([], True)


@given(
    st.lists(st.tuples(st.integers(1, 100), st.floats(0, 100), st.booleans()), max_size=20),
    st.integers(1, 500),
    st.integers(0, 200),
)
def test_eviction_property(specs: list[tuple[int, float, bool]], cap: int, incoming: int) -> None:
    entries = [Entry(str(i), size, used, busy) for i, (size, used, busy) in enumerate(specs)]
    used = sum(e.size for e in entries)
    victims, fits = policy.plan_eviction(
        entries, used=used, max_size=cap, free=10**9, min_free=0, incoming=incoming
    )
    by_key = {e.key: e for e in entries}
    assert not any(by_key[v].busy for v in victims)
    if fits:
        assert used - sum(by_key[v].size for v in victims) + incoming <= cap


def test_tag_freshness() -> None:
    assert policy.tag_action(checked_at=100, now=150, ttl=60) is policy.TagAction.SERVE
    assert policy.tag_action(checked_at=100, now=160, ttl=60) is policy.TagAction.REVALIDATE
    # A clock that went backwards does not make a mapping fresh forever.
    assert policy.tag_action(checked_at=100, now=50, ttl=60) is policy.TagAction.REVALIDATE
    assert policy.may_serve_stale(checked_at=0, now=100, max_stale=100)
    assert not policy.may_serve_stale(checked_at=0, now=101, max_stale=100)


@pytest.mark.parametrize(
    ("status", "failing"),
    [(200, False), (401, False), (404, False), (429, True), (500, True), (503, True)],
)
def test_upstream_is_failing(status: int, failing: bool) -> None:
    assert policy.upstream_is_failing(status) is failing


def test_grants_expire_and_are_per_credential_and_repository() -> None:
    grants = policy.Grants(ttl=10, limit=2)
    alice = policy.credential_key("Bearer alice")
    anon = policy.credential_key(None)
    assert alice != anon
    assert len(alice) == 32
    grants.grant(alice, "docker.io", "private/secret", now=0)
    assert grants.allowed(alice, "docker.io", "private/secret", now=9)
    assert not grants.allowed(alice, "docker.io", "private/secret", now=10)
    assert not grants.allowed(anon, "docker.io", "private/secret", now=1)
    assert not grants.allowed(alice, "ghcr.io", "private/secret", now=1)
    assert not grants.allowed(alice, "docker.io", "library/alpine", now=1)
    grants.grant(anon, "docker.io", "a", now=1)
    grants.grant(anon, "docker.io", "b", now=2)
    assert len(grants) == 2  # bounded: the oldest went
    assert not grants.allowed(alice, "docker.io", "private/secret", now=3)


def test_blob_access_needs_grant_and_membership() -> None:
    assert policy.blob_access(granted=True, holds_blob=True) is policy.Access.SERVE
    assert policy.blob_access(granted=True, holds_blob=False) is policy.Access.CHECK
    assert policy.blob_access(granted=False, holds_blob=True) is policy.Access.CHECK


def test_offline_access() -> None:
    assert policy.offline_access(granted=False, public=True, holds_object=True)
    assert policy.offline_access(granted=True, public=False, holds_object=True)
    assert not policy.offline_access(granted=False, public=False, holds_object=True)
    assert not policy.offline_access(granted=True, public=True, holds_object=False)


OCI = "application/vnd.oci.image.manifest.v1+json"


@pytest.mark.parametrize(
    ("accept", "admitted"),
    [
        (None, True),
        ("", True),
        (" , ", True),  # empty list elements only: as good as none
        (f"application/json, {OCI}; q=0.9", True),
        ("*/*", True),
        ("application/*", True),
        (OCI.upper(), True),
        (f"{OCI};Q=1", True),
        (f'{OCI};note="a,b;c"', True),  # a parameter's quoted comma splits nothing
        (f"{OCI};q=0.001", True),
        ("application/vnd.docker.distribution.manifest.v2+json", False),
        ("text/*", False),
        # Issue 12 review: a weight of 0 means "not acceptable" (RFC 9110 §12.4.2).
        (f"{OCI};q=0", False),
        (f"{OCI} ; q=0.000", False),
        (f"{OCI};Q=0", False),
        (f"*/*, {OCI};q=0", False),  # the more specific range decides
        (f"application/*, {OCI};q=0", False),
        (f"{OCI}, {OCI};q=0", False),  # equally specific: the refusal is not outvoted
        (f"{OCI};v=1;q=0, {OCI}", False),
        (f"{OCI}, application/*;q=0", True),
        ("application/*;q=0", False),
        ("*/*;q=0", False),
        (f"{OCI};q=2", False),  # not a weight: the element names nothing
        (f"{OCI};q=abc", False),
        ("garbage", False),
        ("*/vnd.oci.image.manifest.v1+json", False),  # not a media range
    ],
)
def test_accepts(accept: str | None, admitted: bool) -> None:
    assert policy.accepts(accept, OCI) is admitted


SKOPEO_ACCEPT = ", ".join(
    [
        policy.OCI_MANIFEST,
        policy.OCI_INDEX,
        policy.DOCKER_MANIFEST,
        policy.DOCKER_LIST,
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
    ]
)
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1_JSON = "application/vnd.docker.distribution.manifest.v1+json"
LIST = policy.DOCKER_LIST
# The types a registry converts to what a client asks for, refused with q=0: an upstream
# that honours weights answers the one platform's manifest to this.
LISTS_REFUSED = (
    f"{policy.OCI_INDEX};q=0, {policy.DOCKER_LIST};q=0, {policy.OCI_MANIFEST}, "
    f"{policy.DOCKER_MANIFEST}"
)


@pytest.mark.parametrize(
    ("accept", "media_type", "recorded"),
    [
        # A client that names every type a registry converts from sees the tag's own manifest.
        (SKOPEO_ACCEPT, policy.OCI_INDEX, True),
        (SKOPEO_ACCEPT, policy.DOCKER_MANIFEST, True),
        (SKOPEO_ACCEPT.upper(), policy.DOCKER_LIST, True),
        (f"{SKOPEO_ACCEPT}, */*", "application/vnd.example.artifact+json", True),
        (SKOPEO_ACCEPT.replace(", ", ";q=0.5, ") + ";q=0.5", policy.OCI_INDEX, True),
        (f"{SKOPEO_ACCEPT.replace(', ', ';q=0.5, ')};q=0.1", policy.OCI_INDEX, True),
        (f"{SKOPEO_ACCEPT}, */*;q=0.1", policy.OCI_INDEX, True),
        # Issue 12, finding 9: the one platform's manifest chosen for a narrow Accept.
        (policy.DOCKER_MANIFEST, policy.DOCKER_MANIFEST, False),
        (f"{policy.OCI_INDEX}, {policy.DOCKER_MANIFEST}", policy.DOCKER_MANIFEST, False),
        # schema 1 converted from schema 2 for a client that named the lists only.
        (f"{policy.OCI_INDEX}, {policy.DOCKER_LIST}, {SCHEMA1}", SCHEMA1, False),
        # An answer of a type the client did not ask for.
        (SKOPEO_ACCEPT, "application/json", False),
        # No Accept, or */*: Distribution converts to schema 1.
        (None, policy.OCI_INDEX, False),
        ("", policy.OCI_INDEX, False),
        ("*/*", policy.OCI_INDEX, False),
        ("application/*", policy.OCI_INDEX, False),
        # Issue 12 review: every type named, but the lists refused with q=0 ...
        (LISTS_REFUSED, policy.DOCKER_MANIFEST, False),
        (LISTS_REFUSED.upper(), policy.DOCKER_MANIFEST, False),
        (f"{SKOPEO_ACCEPT}, {policy.DOCKER_LIST};q=0", policy.DOCKER_MANIFEST, False),
        # ... or less wanted than something a registry converts to, which an upstream
        # that honours preferences answers with. (Before: the first was recorded.)
        (SKOPEO_ACCEPT.replace(", ", ";q=0.5, "), SCHEMA1_JSON, False),
        (LISTS_REFUSED.replace(";q=0", ";q=0.1"), policy.DOCKER_MANIFEST, False),
        (f"{SKOPEO_ACCEPT.replace(', ', ';q=0.5, ')};q=0.5, */*", SCHEMA1, False),
        # Named only with parameters, or an element with a bad weight: read differently
        # by different upstreams.
        (SKOPEO_ACCEPT.replace(LIST, f"{LIST};v=2"), policy.OCI_INDEX, False),
        (f"{SKOPEO_ACCEPT}, {SCHEMA1};q=x", policy.OCI_INDEX, False),
    ],
)  # fmt: skip
def test_records_tag(accept: str | None, media_type: str, recorded: bool) -> None:
    assert policy.records_tag(accept, media_type) is recorded


MANIFEST_TYPES = [*sorted(policy.UNCONVERTED), SCHEMA1, "application/json"]
_elements = st.one_of(
    st.sampled_from([*MANIFEST_TYPES, "*/*", "application/*", "text/plain", "x"]),
    st.builds(
        "{};q={}".format,
        st.sampled_from([*MANIFEST_TYPES, "*/*", "application/*"]),
        st.sampled_from(["0", "0.0", "0.5", "1", "1.000", "0.001", "2", ""]),
    ),
)


@given(st.lists(_elements, max_size=8), st.sampled_from(MANIFEST_TYPES), st.randoms())
def test_accept_reading_ignores_order_and_case(
    elements: list[str], media_type: str, random: Random
) -> None:
    header = ", ".join(elements)
    shuffled = list(elements)
    random.shuffle(shuffled)
    for other in (", ".join(shuffled), header.upper(), " ,\t".join(elements)):
        assert policy.accepts(other, media_type) is policy.accepts(header, media_type)
        assert policy.records_tag(other, media_type) is policy.records_tag(header, media_type)


@given(st.lists(_elements, max_size=8), st.sampled_from(MANIFEST_TYPES), st.booleans())
def test_a_refused_type_is_refused_whatever_else_is_said(
    elements: list[str], media_type: str, first: bool
) -> None:
    refusal = f"{media_type};q=0"
    header = ", ".join([refusal, *elements] if first else [*elements, refusal])
    assert not policy.accepts(header, media_type)
    assert not policy.records_tag(header, media_type)
    if media_type in policy.UNCONVERTED:
        assert not any(policy.records_tag(header, answer) for answer in MANIFEST_TYPES)


@given(st.lists(_elements, max_size=8), st.sampled_from(MANIFEST_TYPES))
def test_a_recorded_answer_is_one_every_converted_from_type_admits(
    elements: list[str], media_type: str
) -> None:
    header = ", ".join(elements)
    if policy.records_tag(header, media_type):
        assert policy.accepts(header, media_type)
        assert all(policy.accepts(header, t) for t in policy.UNCONVERTED)


@given(st.text(max_size=60))
def test_parse_accept_never_fails(text: str) -> None:
    accept = policy.parse_accept(text)
    assert all(0 <= r.quality <= 1 for r in accept.ranges)
    assert isinstance(policy.accepts(text, OCI), bool)
    assert isinstance(policy.records_tag(text, OCI), bool)


def test_manifest_children() -> None:
    manifest = {
        "config": {"digest": "sha256:c"},
        "layers": [{"digest": "sha256:l1"}, {"digest": "sha256:l2"}, {"nodigest": 1}, "x"],
    }
    assert policy.manifest_children(json.dumps(manifest).encode()) == [
        "sha256:c", "sha256:l1", "sha256:l2",
    ]  # fmt: skip
    index = {"manifests": [{"digest": "sha256:m1"}]}
    assert policy.manifest_children(json.dumps(index).encode()) == ["sha256:m1"]
    assert policy.manifest_children(b"not json") == []
    assert policy.manifest_children(b"[1]") == []


@pytest.mark.parametrize(
    "header", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000]
)
def test_parse_range_of_thousands_of_digits_is_ignored(header: str) -> None:
    assert policy.parse_range(header, 1000) is None  # int() of it would raise ValueError
