"""Spec grammar: names, tags, digests and quoted-strings."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import grammar

SHA256 = "a" * 64
SHA512 = "b" * 128


@pytest.mark.parametrize(
    "name",
    [
        "alpine",
        "library/alpine",
        "a",
        "0",
        "my-image",
        "my--image",
        "my.image",
        "my_image",
        "my__image",
        "a/b/c/d",
        "org/team.sub/image-x_y__z",
        "a" * 255,
        "/".join(["ab"] * 85),  # 254 characters
    ],
)
def test_valid_names(name):
    assert grammar.is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alpine",
        "library/Alpine",
        "..",
        "a/../b",
        "../a",
        "/alpine",
        "alpine/",
        "a//b",
        "-alpine",
        ".alpine",
        "_alpine",
        "alpine-",
        "alpine.",
        "a___b",
        "a..b",
        "a._b",
        "host:5000/x",
        "a b",
        "a\nb",
        "alpine\n",
        "a" * 256,
        "/".join(["ab"] * 85) + "c/d",  # 257 characters
    ],
)
def test_invalid_names(name):
    assert not grammar.is_valid_name(name)


def test_name_length_limit_is_exactly_255():
    assert grammar.NAME_MAX_LENGTH == 255
    assert grammar.is_valid_name("x" * 255)
    assert not grammar.is_valid_name("x" * 256)


@pytest.mark.parametrize(
    "tag",
    ["latest", "3.20", "v1.0.0-rc1", "_private", "A", "UPPER_lower.9-x", "a" * 128],
)
def test_valid_tags(tag):
    assert grammar.is_valid_tag(tag)


@pytest.mark.parametrize(
    "tag",
    ["", ".hidden", "-dash", "a" * 129, "a/b", "a:b", "a b", "tag\n", "ümlaut"],
)
def test_invalid_tags(tag):
    assert not grammar.is_valid_tag(tag)


@pytest.mark.parametrize(
    "digest",
    [
        f"sha256:{SHA256}",
        f"sha512:{SHA512}",
        "md5:abc",  # unregistered algorithms need only the generic shape
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    ],
)
def test_valid_digests(digest):
    assert grammar.is_valid_digest(digest)


@pytest.mark.parametrize(
    "digest",
    [
        "",
        "sha256",
        "sha256:",
        ":abc",
        f"sha256:{SHA256[:-1]}",  # 63 hex digits
        f"sha256:{SHA256}0",  # 65 hex digits
        f"sha256:{SHA256.upper()}",
        f"sha256:{'g' * 64}",
        f"sha512:{SHA256}",  # right shape, wrong length for sha512
        "sha256:../x",
        "sha256:..",
        f"SHA256:{SHA256}",
        f"sha256:{SHA256}\n",
        f"sha256:{SHA256}/x",
        "md5:a/b",
        "sha-:abc",
        "sha256::abc",
    ],
)
def test_invalid_digests(digest):
    assert not grammar.is_valid_digest(digest)


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("", '""'),
        ("plain", '"plain"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("a,b=c", '"a,b=c"'),
    ],
)
def test_quote_string(value, quoted):
    assert grammar.quote_string(value) == quoted
    assert grammar.unquote_string(quoted) == value


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("token", "token"),
        ('"', '"'),  # too short to be quoted: a bare token
        ('"abc', '"abc'),
        (r'"\a\b"', "ab"),  # any quoted-pair unescapes
    ],
)
def test_unquote_string_edge_cases(raw, value):
    assert grammar.unquote_string(raw) == value


@given(st.text())
def test_quote_unquote_round_trip(value):
    assert grammar.unquote_string(grammar.quote_string(value)) == value
