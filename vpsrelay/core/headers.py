"""Header policy: what crosses the relay in each direction.

Allowlists, not denylists: a relay that forwarded everything would leak the
client's cookies upstream and the upstream's internals back. Headers are
`tuple[tuple[str, str], ...]` with lower-case names, as ASGI gives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from vpsrelay.core.digest import Digest, Verifier, manifest_verifier
from vpsrelay.core.routing import Kind
from vpsrelay.errors import DigestInvalid

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vpsrelay.core.routing import Route

Headers = tuple[tuple[str, str], ...]

# Sent upstream on the first hop (the registry itself).
REQUEST_ALLOWLIST = frozenset(
    {
        "accept",
        "authorization",
        "range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "if-range",
        "user-agent",
    }
)

# Sent on a redirect to another origin (the CDN): no credentials, no cookies.
# Docker Hub's storage answers 400 to a request that carries Authorization.
CROSS_ORIGIN_ALLOWLIST = frozenset(
    {"range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since", "if-range"}
)

# Passed back to the client. `www-authenticate` and `link` are rewritten by the caller.
RESPONSE_ALLOWLIST = frozenset(
    {
        "content-type",
        "content-length",
        "content-range",
        "content-encoding",
        "accept-ranges",
        "docker-content-digest",
        "docker-distribution-api-version",
        "docker-ratelimit-source",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "etag",
        "last-modified",
        "retry-after",
        "oci-subject",
        "oci-filters-applied",
        "oci-chunk-min-length",
    }
)


def get(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of header `name` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def get_all(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of header `name` (lower case), in order."""
    return [value for key, value in headers if key == name]


def select(headers: Iterable[tuple[str, str]], allowed: frozenset[str]) -> Headers:
    """Keep the headers whose (lower-case) name is in `allowed`."""
    return tuple((key.lower(), value) for key, value in headers if key.lower() in allowed)


def upstream_request_headers(client_headers: Iterable[tuple[str, str]], user_agent: str) -> Headers:
    """Headers for the first upstream hop.

    The client's User-Agent is kept (registries log it) with the relay's added;
    `accept-encoding: identity` because blobs are already compressed and the
    relay forwards bytes as they come.
    """
    kept = [(k, v) for k, v in select(client_headers, REQUEST_ALLOWLIST) if k != "user-agent"]
    client_agent = get(client_headers, "user-agent")
    agent = f"{client_agent} {user_agent}" if client_agent else user_agent
    return (*kept, ("user-agent", agent), ("accept-encoding", "identity"))


def redirect_headers(previous: Headers, same_origin: bool) -> Headers:
    """Headers for a redirect hop: everything on the same origin, else no credentials."""
    if same_origin:
        return previous
    kept = select(previous, CROSS_ORIGIN_ALLOWLIST)
    extra = tuple((k, v) for k, v in previous if k in ("user-agent", "accept-encoding"))
    return (*kept, *extra)


def client_response_headers(upstream_headers: Iterable[tuple[str, str]]) -> Headers:
    """The upstream response headers a client may see."""
    return select(upstream_headers, RESPONSE_ALLOWLIST)


DIGEST_HEADER = "docker-content-digest"


def checked_digest(
    route: Route, method: str, status: int, headers: Headers
) -> tuple[Headers, Verifier | None]:
    """The headers to send with a relayed answer, and what checks its body's digest.

    A blob, or a manifest asked for by digest, must hash to that digest, which is then the
    only `Docker-Content-Digest` sent. A manifest asked for by tag must hash to the digest
    its upstream announces (the client has nothing else to check it by); an announcement
    the relay cannot check is dropped. The caller ends a body that does not match short,
    so no client gets a whole body with a digest that the body contradicts.

    Raises:
        DigestInvalid: the client asked for a digest the relay cannot verify.
    """
    if method != "GET" or status != 200 or route.kind not in (Kind.BLOB, Kind.MANIFEST):
        return headers, None
    expected: Digest | None = None
    if route.kind is Kind.BLOB or route.reference_is_digest:
        expected = Digest.parse(route.reference)
    elif (announced := get(headers, DIGEST_HEADER)) is not None:
        try:
            expected = Digest.parse(announced.strip())
        except DigestInvalid:
            expected = None
    kept = tuple((key, value) for key, value in headers if key != DIGEST_HEADER)
    if expected is None:
        return kept, None
    if route.kind is Kind.BLOB:
        verifier = Verifier(expected)
    else:
        verifier = manifest_verifier(expected, get(headers, "content-type"))
    return (*kept, (DIGEST_HEADER, str(expected))), verifier


def same_origin(url_a: str, url_b: str) -> bool:
    """Whether two absolute URLs share scheme, host and port (RFC 6454)."""
    a, b = urlsplit(url_a), urlsplit(url_b)
    return (a.scheme, a.hostname, _port(a.scheme, a.port)) == (
        b.scheme,
        b.hostname,
        _port(b.scheme, b.port),
    )


def _port(scheme: str, port: int | None) -> int | None:
    if port is not None:
        return port
    return {"http": 80, "https": 443}.get(scheme)


def rewrite_link(value: str, upstream_name: str, client_name: str) -> str:
    """Point a pagination `Link` (RFC 8288) back at the relay, under the client's name.

    Registries send `</v2/library/x/tags/list?last=a&n=2>; rel="next"`; absolute
    upstream URLs lose their origin, so the client asks the relay again.
    """
    target, sep, params = value.partition(">")
    if not sep or not target.lstrip().startswith("<"):
        return value
    try:
        parts = urlsplit(target.lstrip()[1:])
    except ValueError:  # not a URL (e.g. a broken IPv6 literal): leave it alone
        return value
    path = parts.path
    upstream_prefix = f"/v2/{upstream_name}/"
    if path.startswith(upstream_prefix):
        path = f"/v2/{client_name}/" + path[len(upstream_prefix) :]
    query = f"?{parts.query}" if parts.query else ""
    return f"<{path}{query}>{params}"
