"""Authentication challenges and token scopes.

Registries answer `401` with `WWW-Authenticate: Bearer realm=...,service=...`.
The relay points `realm` at its own `/token` so that clients fetch tokens
through it, and rewrites `scope=repository:<name>:<actions>` between the names
clients use (`alpine`) and the upstream's (`library/alpine`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vpsrelay.core import grammar
from vpsrelay.errors import BadRequest, UpstreamProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable


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
