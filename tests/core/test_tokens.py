"""core/tokens.py: relay tokens, credentials parsing, htpasswd."""

from __future__ import annotations

import base64
import contextlib

import jwt
import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import tokens
from vpsrelay.errors import Unauthorized

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def issue(service: str = "vpsrelay") -> str:
    repositories = ["docker.io/library/alpine", "ghcr.io/owner/app"]
    return tokens.issue(
        KEY, subject="alice", service=service, repositories=repositories, now=1000.0, ttl=300.0
    )


def test_round_trip_and_scope():
    grant = tokens.verify(KEY, issue(), service="vpsrelay", now=1000.0)
    assert grant.subject == "alice"
    assert grant.expires == 1300.0
    assert grant.covers("docker.io", "library/alpine")
    assert grant.covers("ghcr.io", "owner/app")
    assert not grant.covers("docker.io", "library/busybox")
    assert not grant.covers("ghcr.io", "library/alpine")  # same name, other registry
    everything = tokens.Grant("token", frozenset(), 0.0, everything=True)
    assert everything.covers("x", "y")


@pytest.mark.parametrize(
    ("token_of", "service", "now", "reason"),
    [
        (lambda: issue(), "vpsrelay", 1299.0, None),
        (lambda: issue(), "vpsrelay", 1300.0, "token_expired"),
        (lambda: issue(), "another-service", 1000.0, "token_invalid"),
        (lambda: issue()[:-2] + "xx", "vpsrelay", 1000.0, "token_invalid"),
        (lambda: tokens.issue(OTHER_KEY, subject="a", service="vpsrelay", repositories=[],
                              now=1000.0, ttl=300), "vpsrelay", 1000.0, "token_invalid"),
        (lambda: tokens.issue_refresh(KEY, subject="a", service="vpsrelay", now=1000.0, ttl=9),
         "vpsrelay", 1000.0, "token_invalid"),  # a refresh token is no access token
        (lambda: jwt.encode({"iss": "vpsrelay", "aud": "vpsrelay", "typ": "access", "sub": "a",
                             "exp": 2000}, KEY * 2, algorithm="HS512"), "vpsrelay", 1000.0,
         "token_invalid"),  # other algorithms are refused
        (lambda: jwt.encode({"iss": "vpsrelay", "aud": "vpsrelay", "typ": "access", "sub": "a"},
                            KEY, algorithm="HS256"), "vpsrelay", 1000.0, "token_expired"),
        (lambda: jwt.encode({"iss": "other", "aud": "vpsrelay", "typ": "access", "sub": "a",
                             "exp": 2000}, KEY, algorithm="HS256"), "vpsrelay", 1000.0,
         "token_invalid"),
        (lambda: "not a token", "vpsrelay", 1000.0, "token_invalid"),
    ],
)  # fmt: skip
def test_verify_refuses(token_of, service, now, reason):
    token = token_of()
    if reason is None:
        tokens.verify(KEY, token, service=service, now=now)
        return
    with pytest.raises(Unauthorized) as caught:
        tokens.verify(KEY, token, service=service, now=now)
    assert caught.value.reason == reason


def test_malformed_access_entries_grant_nothing():
    claims = {
        "iss": "vpsrelay", "aud": "s", "typ": "access", "sub": "a", "exp": 2000,
        "access": [
            "x", {"type": "registry", "name": "r", "actions": ["pull"]},
            {"type": "repository", "name": "docker.io/a", "actions": ["push"]},
            {"type": "repository", "name": 5, "actions": ["pull"]},
            {"type": "repository", "name": "docker.io/b", "actions": ["pull"]},
        ],
    }  # fmt: skip
    grant = tokens.verify(KEY, jwt.encode(claims, KEY), service="s", now=1000.0)
    assert grant.repositories == frozenset({"docker.io/b"})


def test_refresh_tokens():
    refresh = tokens.issue_refresh(KEY, subject="alice", service="s", now=0.0, ttl=100.0)
    assert tokens.verify_refresh(KEY, refresh, service="s", now=99.0) == "alice"
    with pytest.raises(Unauthorized):
        tokens.verify_refresh(KEY, refresh, service="s", now=100.0)
    with pytest.raises(Unauthorized):
        tokens.verify_refresh(KEY, issue(service="s"), service="s", now=1000.0)


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (basic("alice:pw"), ("alice", "pw")),
        (basic("alice:pw:with:colons"), ("alice", "pw:with:colons")),
        (basic("alice:"), ("alice", "")),
        ("basic " + base64.b64encode(b"u:p").decode(), ("u", "p")),
        (basic("no-colon"), None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"\xff:x").decode(), None),
        ("Bearer abc", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_basic(header, expected):
    assert tokens.parse_basic(header) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Bearer ", None), ("Basic x", None),
     (None, None)],
)  # fmt: skip
def test_parse_bearer(header, expected):
    assert tokens.parse_bearer(header) == expected


def test_parse_htpasswd():
    text = "# users\n\nalice:$2b$12$abc\nbob:$2y$10$def\n"
    assert tokens.parse_htpasswd(text) == {"alice": "$2b$12$abc", "bob": "$2y$10$def"}
    with pytest.raises(ValueError, match="line 1"):
        tokens.parse_htpasswd("nocolon")
    with pytest.raises(ValueError, match="bcrypt"):
        tokens.parse_htpasswd("carol:$apr1$md5hash")
    with pytest.raises(ValueError):
        tokens.parse_htpasswd(":$2b$x")


@given(st.text(max_size=60))
def test_parsers_never_crash(text):
    tokens.parse_basic(text)
    tokens.parse_bearer(text)
    with contextlib.suppress(ValueError):
        tokens.parse_htpasswd(text)
    with contextlib.suppress(Unauthorized):
        tokens.verify(KEY, text, service="s", now=0.0)
