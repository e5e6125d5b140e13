from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core.acme_http import answer, https_location

TOKENS = {"tok_EN-1": "tok_EN-1.thumb"}


def test_a_pending_challenge_is_answered_with_its_key_authorization() -> None:
    response = answer("GET", "/.well-known/acme-challenge/tok_EN-1", "relay.test", 443, TOKENS)
    assert (response.status, response.body) == (200, b"tok_EN-1.thumb")
    assert ("content-type", "text/plain; charset=utf-8") in response.headers


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/.well-known/acme-challenge/unknown"),
        ("GET", "/.well-known/acme-challenge/"),
        ("GET", "/.well-known/acme-challenge/../etc/passwd"),
        ("POST", "/.well-known/acme-challenge/tok_EN-1"),
    ],
)
def test_anything_else_under_the_challenge_path_is_404(method: str, target: str) -> None:
    assert answer(method, target, "relay.test", 443, TOKENS).status == 404


@pytest.mark.parametrize(
    ("host", "port", "target", "location"),
    [
        ("relay.test", 443, "/v2/", "https://relay.test/v2/"),
        ("relay.test:80", 443, "/v2/x?n=1", "https://relay.test/v2/x?n=1"),
        ("Relay.Test:8080", 8443, "/", "https://relay.test:8443/"),
        ("[::1]:80", 443, "/v2/", "https://[::1]/v2/"),
        ("192.0.2.1", 443, "/a", "https://192.0.2.1/a"),
    ],
)
def test_everything_else_is_a_308_to_https(
    host: str, port: int, target: str, location: str
) -> None:
    response = answer("PUT", target, host, port, TOKENS)
    assert response.status == 308
    assert ("location", location) in response.headers


@pytest.mark.parametrize(
    ("host", "target"),
    [
        (None, "/"),
        ("", "/"),
        ("evil.test\r\nset-cookie: x", "/"),
        ("relay.test", "//evil.test/"),
        ("relay.test", "http://evil.test/"),
        ("user@relay.test", "/"),
    ],
)
def test_a_missing_or_odd_host_or_target_gets_400_not_a_redirect(
    host: str | None, target: str
) -> None:
    response = answer("GET", target, host, 443, TOKENS)
    assert response.status == 400
    assert all(name != "location" for name, _ in response.headers)


@given(st.text(), st.text())
def test_https_location_never_emits_control_characters(host: str, target: str) -> None:
    location = https_location(host, 443, target)
    if location is not None:
        assert location.startswith("https://")
        authority = location[len("https://") :].split("/", 1)[0]
        assert all(c.isalnum() or c in ".-:[]" for c in authority), location
