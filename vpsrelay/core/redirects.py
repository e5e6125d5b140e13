"""Redirect policy: which `Location` the relay follows itself, and how.

Docker Hub answers blob GETs with a 307 to a CDN with a signed URL. The relay
follows it server-side so that clients never need to reach the CDN, with a
fresh request: the method is kept, and credentials never cross origins.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from vpsrelay.core import headers as header_policy
from vpsrelay.core.grammar import is_valid_hostname
from vpsrelay.errors import RedirectRefused, TooManyRedirects

# RFC 9110 §15.4: the redirection codes that carry a Location to follow.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
FOLLOWED_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: header_policy.Headers


@dataclass(frozen=True, slots=True)
class RedirectPolicy:
    max_hops: int = 5


def next_hop(
    request: UpstreamRequest, location: str | None, hops_done: int, policy: RedirectPolicy
) -> UpstreamRequest:
    """The request to send for a redirect answer to `request`.

    Args:
        request: the request that was answered with a redirect.
        location: the answer's Location header (may be relative, RFC 9110 §10.2.2).
        hops_done: how many redirects were followed before this one.
        policy: the limits.

    Returns:
        The next request: same method, Location resolved against `request.url`,
        and no Authorization or client headers unless the origin stays the same.

    Raises:
        TooManyRedirects: more than `policy.max_hops` redirects.
        RedirectRefused: no Location, or one that is not an absolute http(s) URL.
    """
    if hops_done >= policy.max_hops:
        raise TooManyRedirects(f"upstream redirected more than {policy.max_hops} times")
    location = (location or "").strip()
    if not location:
        raise RedirectRefused("upstream redirect without a Location header")
    try:
        target = urljoin(request.url, location)
        parts = urlsplit(target)
        if parts.scheme not in FOLLOWED_SCHEMES or not parts.hostname:
            raise ValueError("not an absolute http(s) URL")
        if not is_valid_hostname(parts.hostname):  # never hand a resolver `127.0.0.1\\evil`
            raise ValueError("not a host name")
        if "@" in parts.netloc:  # credentials in a Location, or `cdn\\@host` parser games
            raise ValueError("user information in a redirect")
        same = header_policy.same_origin(request.url, target)  # reads the port: may raise
    except ValueError:
        raise RedirectRefused("upstream redirected to a URL the relay does not follow") from None
    return UpstreamRequest(
        request.method, target, header_policy.redirect_headers(request.headers, same)
    )
