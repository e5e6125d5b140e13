"""Authentication challenges and token scopes.

Registries answer `401` with `WWW-Authenticate: Bearer realm=...,service=...`.
The relay points `realm` at its own `/token` so that clients fetch tokens
through it, and rewrites `scope=repository:<name>:<actions>` between the names
clients use (`alpine`) and the upstream's (`library/alpine`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit, urlunsplit

from vpsrelay.core import grammar
from vpsrelay.errors import BadRequest, UpstreamProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence


@dataclass(frozen=True, slots=True)
class Challenge:
    """One parsed `WWW-Authenticate` challenge."""

    scheme: str
    params: tuple[tuple[str, str], ...]

    def get(self, key: str) -> str | None:
        """The value of auth-param `key` (case-insensitive), or None."""
        key = key.lower()
        for name, value in self.params:
            if name.lower() == key:
                return value
        return None

    @property
    def is_bearer(self) -> bool:
        return self.scheme.lower() == "bearer"

    @property
    def realm(self) -> str | None:
        return self.get("realm")

    @property
    def service(self) -> str | None:
        return self.get("service")

    def with_param(self, key: str, value: str) -> Challenge:
        """A copy with auth-param `key` set to `value` (kept in place if present)."""
        lowered = key.lower()
        if self.get(key) is None:
            return replace(self, params=(*self.params, (key, value)))
        params = tuple((n, value if n.lower() == lowered else v) for n, v in self.params)
        return replace(self, params=params)

    def format(self) -> str:
        """Render as a header value; every param is a quoted-string."""
        params = ",".join(f"{name}={grammar.quote_string(value)}" for name, value in self.params)
        return f"{self.scheme} {params}" if params else self.scheme


def parse_challenge(header: str) -> Challenge:
    """Parse one `WWW-Authenticate` challenge (RFC 9110 §11.6.1).

    Args:
        header: the header value, e.g. `Bearer realm="https://a/token",service="s"`.

    Returns:
        The scheme and its auth-params, values unquoted.

    Raises:
        UpstreamProtocolError: the value is not a challenge.
    """
    scheme_match = grammar.AUTH_SCHEME_RE.match(header)
    if scheme_match is None:
        raise UpstreamProtocolError(f"malformed WWW-Authenticate header: {header!r}")
    params: list[tuple[str, str]] = []
    position = scheme_match.end()
    while position < len(header):
        param = grammar.AUTH_PARAM_RE.match(header, position)
        if param is None or param.end() == position:
            raise UpstreamProtocolError(f"malformed WWW-Authenticate header: {header!r}")
        params.append((param.group(1), grammar.unquote_string(param.group(2))))
        position = param.end()
    return Challenge(scheme_match.group(1), tuple(params))


def rewrite_challenge(challenge: Challenge, relay_realm: str) -> Challenge:
    """Point a Bearer challenge's realm at the relay; other schemes pass unchanged.

    Raises:
        UpstreamProtocolError: a Bearer challenge without a realm.
    """
    if not challenge.is_bearer:
        return challenge
    if not challenge.realm:
        raise UpstreamProtocolError("upstream Bearer challenge has no realm")
    return challenge.with_param("realm", relay_realm)


@dataclass(frozen=True, slots=True)
class Scope:
    """`resourcetype[(resourceclass)]:resourcename:action[,action]*` (Distribution token spec)."""

    resource_type: str
    name: str
    actions: str

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """Parse a scope; None when it is not of that shape (passed through untouched).

        The name may itself hold colons (`repository:host:5000/x:pull`): it runs from
        the first colon to the last.
        """
        resource_type, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and resource_type and name):
            return None
        return cls(resource_type, name, actions)

    def format(self) -> str:
        return f"{self.resource_type}:{self.name}:{self.actions}"


def rewrite_scopes(scopes: list[str], to_upstream: Callable[[str], str]) -> list[str]:
    """Rewrite the repository names of `scope` query values with `to_upstream`.

    One query value may hold several space-separated scopes (the token spec allows
    both forms). Scopes of other resource types, or of other shapes, pass as they are.

    Raises:
        RelayError: whatever `to_upstream` raises for a name it rejects.
    """
    rewritten: list[str] = []
    for value in scopes:
        parts = []
        for text in value.split(" "):
            scope = Scope.parse(text)
            if scope is not None and scope.resource_type.startswith("repository"):
                text = replace(scope, name=to_upstream(scope.name)).format()
            parts.append(text)
        rewritten.append(" ".join(parts))
    return rewritten


# Token request parameters that ask for a refresh token (GET and the OAuth2 POST form).
REFRESH_PARAMS = frozenset({"offline_token", "access_type"})
# Scopes one token request may name. Clients send one or two (a pull, a cross-repository
# mount); each one named costs the relay an upstream token entry and URL length.
MAX_SCOPES = 10


def pull_scopes(
    values: list[str], to_upstream: Callable[[str], str], admits: Callable[[str], bool]
) -> list[str]:
    """The upstream names of the repositories `values` (space-separated scopes) may pull.

    Only `pull` survives: a relay hands out read access, never `push`, `delete` or `*`.
    Repositories `admits` refuses, scopes without `pull`, and scopes of other resource
    types (`registry:catalog:*`) are dropped.

    Raises:
        BadRequest: more than `MAX_SCOPES` scopes, of whatever kind (refused, not cut
            short: a token silently missing a repository would fail later, obscurely).
        RelayError: whatever `to_upstream` raises for a name it rejects.
    """
    texts = [text for value in values for text in value.split(" ") if text]
    if len(texts) > MAX_SCOPES:
        raise BadRequest(
            f"too many scopes in one token request ({len(texts)}; at most {MAX_SCOPES})",
            reason="too_many_scopes",
        )
    names: list[str] = []
    for text in texts:
        scope = Scope.parse(text)
        if scope is None or scope.resource_type != "repository":
            continue
        if "pull" not in scope.actions.split(","):
            continue
        name = to_upstream(scope.name)
        if admits(name) and name not in names:
            names.append(name)
    return names


def token_request_params(
    params: list[tuple[str, str]],
    to_upstream: Callable[[str], str],
    service: str | None,
    *,
    admits: Callable[[str], bool] = lambda name: True,
    offline: bool = False,
) -> list[tuple[str, str]]:
    """The query of a token request as the upstream's token service expects it.

    Scopes are cut down to `repository:<upstream name>:pull` for the repositories
    `admits` (`pull_scopes`), whatever the client asked for. `service` is set to the one
    the upstream advertised (clients echo the relay's challenge, which carries it
    unchanged, but an old cached value must not win). The refresh-token requests
    (`offline_token`, `access_type`) pass only with `offline`, the caller's word that the
    credentials are the client's own; everything else (`account`, `client_id`, the
    OAuth2 form's fields) passes through.

    Raises:
        RelayError: whatever `to_upstream` raises for a name it rejects.
    """
    names = pull_scopes([v for k, v in params if k == "scope"], to_upstream, admits)
    dropped = {"scope", "service"} | (set() if offline else REFRESH_PARAMS)
    others = [(k, v) for k, v in params if k not in dropped]
    upstream_service = service or next((v for k, v in params if k == "service"), None)
    head = [("service", upstream_service)] if upstream_service else []
    return [*head, *others, *(("scope", f"repository:{name}:pull") for name in names)]


# RFC 9110 §11.2 token68: what a Bearer credential may hold.
TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# A token answer without `expires_in` is good this long (the token spec's minimum).
DEFAULT_TOKEN_SECONDS = 60.0
_FORM_TYPE = ("content-type", "application/x-www-form-urlencoded")


def token_url(realm: str, params: Sequence[tuple[str, str]]) -> str:
    """The URL of a token request to `realm`: its own query kept, `params` appended.

    The one place a token request URL is built (a realm may already carry a query,
    such as `?account=x`, which must survive). The fragment, never sent, is dropped.

    Raises:
        ValueError: `realm` is not an absolute http(s) URL (the message names it).
    """
    problem = f"token realm {realm!r} is not an absolute http(s) URL"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in realm):
        raise ValueError(problem)
    try:
        parts = urlsplit(realm)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number
        raise ValueError(problem) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(problem)
    query = "&".join(q for q in (parts.query, urlencode(list(params))) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def token_form(params: Sequence[tuple[str, str]]) -> tuple[bytes, tuple[str, str]]:
    """The body of an OAuth2 POST token request, and its content-type header."""
    return urlencode(list(params)).encode("ascii"), _FORM_TYPE


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """What a token service answered: the token, how long it lasts, when it was issued."""

    token: str
    expires_in: float
    issued_at: str | None = None


def parse_token_answer(body: bytes) -> TokenAnswer:
    """Parse a token service's JSON answer (`token`, or OAuth2's `access_token`).

    A missing, non-numeric or non-positive `expires_in` means `DEFAULT_TOKEN_SECONDS`.

    Raises:
        ValueError: no JSON object, or no token that may travel as a Bearer credential.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("token service answered no JSON") from None
    if not isinstance(document, dict):
        raise ValueError("token service answered no JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not TOKEN68.fullmatch(token):
        raise ValueError("token service answered no token")
    issued_at = document.get("issued_at")
    return TokenAnswer(
        token,
        _lifetime(document.get("expires_in")),
        issued_at if isinstance(issued_at, str) else None,
    )


def _lifetime(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return DEFAULT_TOKEN_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        return DEFAULT_TOKEN_SECONDS
    return seconds if math.isfinite(seconds) and seconds > 0 else DEFAULT_TOKEN_SECONDS


def fresh_token_may_help(challenges: Iterable[str]) -> bool:
    """Whether a 401 to a token the relay holds may be healed by fetching a new one.

    RFC 6750 section 3.1: `invalid_token` is a token "expired, revoked, malformed, or
    invalid", which a new one fixes; `insufficient_scope` is a good token without the
    rights, and a new one for the same credential gets the same rights (a private
    repository): not worth a token request. Without an `error`, it may help.
    """
    for text in challenges:
        try:
            challenge = parse_challenge(text)
        except UpstreamProtocolError:
            continue  # says nothing either way
        if challenge.is_bearer and challenge.get("error") == "insufficient_scope":
            return False
    return True
