"""Relay-issued tokens and client credentials.

With client authentication on, the relay is its own token service: `/token` checks
a client's Basic credentials and answers an HS256 JWT that names the user, the
repositories asked for (`<registry>/<upstream name>`, pull only) and a short expiry.
Every `/v2/` request presents it; the relay checks signature, audience, expiry and
that the token covers the repository before anything is sent upstream. Upstream
tokens never reach the client: the relay fetches and keeps them itself.

Refresh tokens (`offline_token=true`, `docker login`) are long-lived JWTs of their own
type that only `/token` accepts. Each is bound to the credential that earned it (a keyed
hash of the pull token, or of the user's password hash), so a revoked pull token or a
changed password ends the refresh tokens it earned. The key is the shell's business (a
file in the data dir); `now` is always passed in.

Failed password checks make the next ones wait (`PasswordBackoff`), per client address
and per user name, so guessing is slow and cannot keep the CPU busy with bcrypt.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt

from vpsrelay.errors import Unauthorized

if TYPE_CHECKING:
    from collections.abc import Iterable

ALGORITHM = "HS256"
ISSUER = "vpsrelay"
ACCESS = "access"
REFRESH = "refresh"
# What earned a refresh token: a user's password, or a static pull token.
BY_PASSWORD = "password"
BY_PULL_TOKEN = "pull_token"
_BCRYPT_COST = re.compile(r"\$2[aby]\$(\d\d)\$")


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


@dataclass(frozen=True, slots=True)
class Binding:
    """The credential a refresh token stands for: `kind` and a keyed hash of it."""

    kind: str  # BY_PASSWORD or BY_PULL_TOKEN
    digest: str

    @classmethod
    def of_password(cls, key: bytes, user: str, password_hash: str) -> Binding:
        """Bound to the user's current hash: a new password (or removal) ends it."""
        return cls(BY_PASSWORD, _keyed_hash(key, BY_PASSWORD, user, password_hash))

    @classmethod
    def of_pull_token(cls, key: bytes, token: str) -> Binding:
        """Bound to the pull token itself: removing it from the config ends it."""
        return cls(BY_PULL_TOKEN, _keyed_hash(key, BY_PULL_TOKEN, token))

    def matches(self, other: Binding) -> bool:
        return self.kind == other.kind and hmac.compare_digest(self.digest, other.digest)


def _keyed_hash(key: bytes, *parts: str) -> str:
    message = "\0".join(parts).encode("utf-8", "surrogatepass")
    return hmac.new(key, b"vpsrelay-binding\0" + message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class RefreshGrant:
    """A verified refresh token: who, and the credential it is bound to."""

    subject: str
    binding: Binding


def issue_refresh(
    key: bytes, *, subject: str, service: str, binding: Binding, now: float, ttl: float
) -> str:
    """Sign a refresh token: it can only be traded at `/token` for access tokens."""
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "aud": service,
        "iat": int(now),
        "exp": int(now + ttl),
        "jti": secrets.token_hex(8),
        "typ": REFRESH,
        "by": binding.kind,
        "bnd": binding.digest,
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


def verify_refresh(key: bytes, token: str, *, service: str, now: float) -> RefreshGrant:
    """The user a refresh token was issued to, and the credential it is bound to.

    The caller checks the binding against the credentials as they are now.

    Raises:
        Unauthorized: as `verify`, or a token without a binding (`token_invalid`): one
            issued before refresh tokens were bound, which nothing can vouch for.
    """
    claims = _decode(key, token, service, now, REFRESH)
    kind, digest = claims.get("by"), claims.get("bnd")
    if kind not in (BY_PASSWORD, BY_PULL_TOKEN) or not isinstance(digest, str):
        raise Unauthorized("invalid token", reason="token_invalid")
    return RefreshGrant(claims["sub"], Binding(kind, digest))


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


def bcrypt_cost(hashed: str) -> int | None:
    """The cost (log2 rounds) of a bcrypt hash, or None if it is not one."""
    found = _BCRYPT_COST.match(hashed)
    return int(found.group(1)) if found else None


def usual_cost(hashes: Iterable[str], default: int) -> int:
    """The cost most of `hashes` have (`default` when there are none).

    An unknown user is checked against a dummy hash of this cost, so that a wrong name
    costs what a wrong password costs and the answer time does not tell who exists.
    """
    costs = collections.Counter(c for h in hashes if (c := bcrypt_cost(h)) is not None)
    return costs.most_common(1)[0][0] if costs else default


# --- failed logins


def address_key(address: str) -> str:
    """Whose failures count together: an IPv4 address, or an IPv6 /64 (one customer)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


@dataclass(slots=True)
class PasswordBackoff:
    """Exponential backoff after failed password checks, per address and per user.

    The first `free` failures of a key cost nothing; then each failure makes the key
    wait `base * 2**k` seconds, at most `cap`, before its next check. A success
    forgets the user's failures (not the address's: an attacker with one good account
    must not reset the address he guesses from). A key quiet for `cap` seconds after
    its wait is forgotten. Bounded: past `limit` keys, the oldest go first.
    """

    free: int
    cap: float
    base: float = 1.0
    limit: int = 100_000
    _keys: collections.OrderedDict[str, _Failures] = field(default_factory=collections.OrderedDict)

    @staticmethod
    def _user_key(user: str) -> str:
        # A digest: names are client-chosen and may be long; the map stays small.
        return "user:" + hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _keys_of(self, address: str, user: str) -> tuple[str, str]:
        return "addr:" + address_key(address), self._user_key(user)

    def _delay(self, failures: _Failures) -> float:
        over = failures.count - self.free
        if over <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(over - 1, 62))

    def wait(self, address: str, user: str, now: float) -> float:
        """Seconds until `user` may be checked again from `address` (0: now)."""
        longest = 0.0
        for key in self._keys_of(address, user):
            failures = self._keys.get(key)
            if failures is None:
                continue
            until = failures.last + self._delay(failures)
            if now >= until + self.cap:
                del self._keys[key]  # quiet long enough: forgiven
                continue
            longest = max(longest, until - now)
        return longest

    def failed(self, address: str, user: str, now: float) -> None:
        for key in self._keys_of(address, user):
            failures = self._keys.pop(key, None) or _Failures(0, now)
            failures.count += 1
            failures.last = now
            self._keys[key] = failures  # to the end: the newest
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def succeeded(self, user: str) -> None:
        self._keys.pop(self._user_key(user), None)
