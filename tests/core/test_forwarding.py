"""Client view: X-Forwarded-* believed from trusted proxies only."""

from __future__ import annotations

import ipaddress

import pytest

from vpsrelay.core.forwarding import ClientView, client_view

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
FORWARDED = (
    ("host", "relay.internal:5000"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "relay.example.com"),
)


def view(peer: str, headers=FORWARDED, *, public_url: str | None = None, scheme: str = "http",
         trusted=TRUSTED, server_host: str = "0.0.0.0:5000") -> ClientView:  # fmt: skip
    return client_view(
        peer=peer,
        scheme=scheme,
        headers=headers,
        server_host=server_host,
        trusted_proxies=trusted,
        public_url=public_url,
    )


@pytest.mark.parametrize("peer", ["198.51.100.9", "2001:db8::1", "", "not-an-ip", "unix:/sock"])
def test_untrusted_peer_forwarded_headers_ignored(peer):
    assert view(peer) == ClientView(peer, "http://relay.internal:5000", "relay.internal:5000")


def test_no_trusted_proxies_configured():
    assert view("10.0.0.1", trusted=()) == ClientView(
        "10.0.0.1", "http://relay.internal:5000", "relay.internal:5000"
    )


@pytest.mark.parametrize("peer", ["10.0.0.1", "fd00::2"])
def test_trusted_peer_forwarded_headers_honoured(peer):
    assert view(peer) == ClientView("203.0.113.7", "https://relay.example.com", "relay.example.com")


def test_no_host_header_uses_server_host():
    assert view("198.51.100.9", headers=()) == ClientView(
        "198.51.100.9", "http://0.0.0.0:5000", "0.0.0.0:5000"
    )


def test_connection_scheme_is_used():
    assert view("198.51.100.9", scheme="https").base_url == "https://relay.internal:5000"


def test_trusted_peer_without_forwarded_headers():
    assert view("10.0.0.1", headers=(("host", "h:1"),)) == ClientView(
        "10.0.0.1", "http://h:1", "h:1"
    )


@pytest.mark.parametrize(
    "public_url",
    ["https://relay.example.org", "https://relay.example.org/", "https://r.example/sub/"],
)
@pytest.mark.parametrize("peer", ["10.0.0.1", "198.51.100.9"])
def test_public_url_wins(public_url, peer):
    assert view(peer, public_url=public_url).base_url == public_url.rstrip("/")


@pytest.mark.parametrize(
    ("xff", "client"),
    [
        # the client prepends a spoofed address; the proxy appends the real one
        (["6.6.6.6, 203.0.113.7"], "203.0.113.7"),
        (["6.6.6.6", "203.0.113.7"], "203.0.113.7"),  # two header lines
        # a chain of trusted proxies is skipped from the right
        (["203.0.113.7, 10.0.0.5, 10.0.0.6"], "203.0.113.7"),
        (["6.6.6.6, 203.0.113.7, 10.0.0.5"], "203.0.113.7"),
        # all trusted: the leftmost is as far as we can see
        (["10.0.0.7, 10.0.0.5"], "10.0.0.7"),
        # junk in the chain is untrusted, so it stops the walk
        (["203.0.113.7, garbage"], "garbage"),
        ([" , ,203.0.113.7 , "], "203.0.113.7"),
        ([""], "10.0.0.1"),
    ],
)
def test_forwarded_for_chain(xff, client):
    headers = [("host", "h"), *(("x-forwarded-for", value) for value in xff)]
    assert view("10.0.0.1", headers=headers).client_ip == client


def test_untrusted_peer_cannot_spoof_forwarded_for():
    headers = [("host", "h"), ("x-forwarded-for", "10.0.0.9, 1.1.1.1")]
    assert view("198.51.100.9", headers=headers).client_ip == "198.51.100.9"


@pytest.mark.parametrize(
    ("proto", "host", "base"),
    [
        ("https, http", "a.example, b.example", "https://a.example"),
        (" https ", " a.example ", "https://a.example"),
        (None, "a.example", "http://a.example"),
        ("https", None, "https://relay.internal:5000"),
    ],
)
def test_forwarded_proto_and_host_take_first_value(proto, host, base):
    headers = [("host", "relay.internal:5000")]
    if proto is not None:
        headers.append(("x-forwarded-proto", proto))
    if host is not None:
        headers.append(("x-forwarded-host", host))
    assert view("10.0.0.1", headers=headers).base_url == base


def test_headers_may_be_an_iterator():
    assert view("10.0.0.1", headers=iter(FORWARDED)).base_url == "https://relay.example.com"
