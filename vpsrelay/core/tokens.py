"""Relay-issued tokens and client credentials.

With client authentication on, the relay is its own token service: `/token` checks
a client's Basic credentials and answers an HS256 JWT that names the user, the
repositories asked for (`<registry>/<upstream name>`, pull only) and a short expiry.
Every `/v2/` request presents it; the relay checks signature, audience, expiry and
that the token covers the repository before anything is sent upstream. Upstream
tokens never reach the client: the relay fetches and keeps them itself.

Refresh tokens (`offline_token=true`, `docker login`) are long-lived JWTs of their own
type that only `/token` accepts. The key is the shell's business (a file in the data
dir); `now` is always passed in.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jwt

from vpsrelay.errors import Unauthorized

if TYPE_CHECKING:
    from collections.abc import Iterable

ALGORITHM = "HS256"
ISSUER = "vpsrelay"
ACCESS = "access"
REFRESH = "refresh"


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: `repositories` are `<registry>/<upstream name>`."""

    subject: str
    repositories: frozenset[str]
    expires: float
    everything: bool = False  # a static pull token: every repository

    def covers(self, registry: str, name: str) -> bool:
        return self.everything or f"{registry}/{name}" in self.repositories


def issue(
    key: bytes,
    *,
    subject: str,
    service: str,
    repositories: Iterable[str],
    now: float,
    ttl: float,
) -> str:
    """Sign an access token for pulling `repositories` (`<registry>/<name>`)."""
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "iat": int(now),
        "nbf": int(now) - 1,
        "exp": int(now + ttl),
        "jti": secrets.token_hex(8),
        "typ": ACCESS,
        "access": [
            {"type": "repository", "name": name, "actions": ["pull"]}
            for name in sorted(set(repositories))
        ],
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def issue_refresh(key: bytes, *, subject: str, service: str, now: float, ttl: float) -> str:
    """Sign a refresh token: it can only be traded at `/token` for access tokens."""
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": secrets.token_hex(8),
        "typ": REFRESH,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def _decode(key: bytes, token: str, service: str, now: float, kind: str) -> dict[str, Any]:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=service,
            issuer=ISSUER,
            # Time is checked here against the caller's clock, not PyJWT's.
            options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise Unauthorized("invalid token", reason="token_invalid") from exc
    if claims.get("typ") != kind or not isinstance(claims.get("sub"), str):
        raise Unauthorized("invalid token", reason="token_invalid")
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or now >= expires:
        raise Unauthorized("token expired", reason="token_expired")
    return claims


def verify(key: bytes, token: str, *, service: str, now: float) -> Grant:
    """Check an access token.

    Raises:
        Unauthorized: bad signature, audience, type or shape (`token_invalid`), or expired
            (`token_expired`).
    """
    claims = _decode(key, token, service, now, ACCESS)
    names = set()
    access = claims.get("access")
    for entry in access if isinstance(access, list) else ():
        if (
            isinstance(entry, dict)
            and entry.get("type") == "repository"
            and isinstance(entry.get("name"), str)
            and "pull" in (entry.get("actions") or ())
        ):
            names.add(entry["name"])
    return Grant(claims["sub"], frozenset(names), float(claims["exp"]))


def verify_refresh(key: bytes, token: str, *, service: str, now: float) -> str:
    """The user a refresh token was issued to.

    Raises:
        Unauthorized: as `verify`.
    """
    subject: str = _decode(key, token, service, now, REFRESH)["sub"]
    return subject


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """`Basic base64(user:password)` to (user, password); None if absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def parse_bearer(header: str | None) -> str | None:
    """The token of `Bearer <token>`, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def parse_htpasswd(text: str) -> dict[str, str]:
    """`user:hash` lines (Apache htpasswd with bcrypt hashes) to a mapping.

    Blank lines and `#` comments are skipped.

    Raises:
        ValueError: a line without a colon, or a hash that is not bcrypt (`$2a$`, `$2b$`,
            `$2y$`): other htpasswd schemes (MD5, SHA1, crypt) are too weak to accept.
    """
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"line {number}: expected USER:BCRYPT-HASH")
        if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ValueError(f"line {number}: user {user!r} has no bcrypt hash ($2b$...)")
        users[user] = hashed
    return users
