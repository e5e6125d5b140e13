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

Failed password checks make the next ones wait (`PasswordBackoff`): refused per client
address and per (user, address), paced per user, so guessing is slow but cannot lock a
user out.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt

from vpsrelay.core import access
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


# Pull tokens are compared before any password is checked and open every repository:
# shorter ones could be guessed. 20 characters of `openssl rand -hex 20` are 80 bits.
MIN_PULL_TOKEN_LENGTH = 20


def weak_pull_token(token: str) -> str | None:
    """Why `token` is no good as a pull token (never quoting it), or None."""
    if len(token) < MIN_PULL_TOKEN_LENGTH:
        return (
            f"a pull token shorter than {MIN_PULL_TOKEN_LENGTH} characters"
            " (make one with `openssl rand -hex 20`)"
        )
    return None


def parse_pull_tokens(text: str) -> tuple[list[str], list[str]]:
    """The pull tokens of a pull tokens file (one a line; blank lines skipped), and what
    is wrong with the lines left out (`line 3: ...`, never the token itself)."""
    found: list[str] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token:
            continue
        if (weakness := weak_pull_token(token)) is not None:
            problems.append(f"line {number}: {weakness}")
        else:
            found.append(token)
    return found, problems


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


def address_key(address: str, ipv6_prefix: int = access.DEFAULT_IPV6_PREFIX) -> str:
    """Whose failures count together: the key the guard limits a client by (an IPv4
    address, an IPv6 network of `ipv6_prefix` bits: `limits.ipv6_prefix_length`)."""
    return access.limit_key(address, ipv6_prefix)


@dataclass(slots=True)
class Failures:
    count: int
    last: float
    next_start: float = -math.inf  # a paced user's checks (either line) start no sooner
    pending: int = 0  # checks begun and not yet decided: counted as failures meanwhile


# The share of a paced user's turns kept for newcomers (addresses that have not failed for
# it): guessers reclaim every freed turn of their own line at once, but need a new address
# for each newcomer's turn, so the user, from an address of its own, soon has that line to
# itself; in all, the user is still checked at most `per_minute` times a minute.
NEWCOMERS_SHARE = 2 / 3
# What the lines of a user guessed at remember of the addresses that failed for it, at most:
# past this the oldest are forgotten (and would be newcomers again).
MAX_SUSPECTS_PER_USER = 4096


@dataclass(slots=True)
class UserLine:
    """The turns of one user guessed at: one line for the addresses that failed for it
    (`suspects`), one for newcomers; and the turn each address has waiting (`queued`)."""

    suspects: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    suspect_next: float = -math.inf
    newcomer_next: float = -math.inf
    queued: dict[str, float] = field(default_factory=dict)  # address key -> turn start


@dataclass(frozen=True, slots=True)
class Start:
    """May a password check start: `refused` > 0, no (wait that long); else yes, after
    `turn` seconds (0 for a pull token, which needs no check)."""

    refused: float = 0.0
    turn: float = 0.0


@dataclass(frozen=True, slots=True)
class BackoffKeys:
    """The keys one check of (address, user) reads and writes."""

    address: str
    pair: str
    user: str
    client: str  # the address's key in the user's line


@dataclass(slots=True)
class BackoffSlice:
    """What one check of (address, user) reads and writes of a `PasswordBackoff`'s state:
    the failures of its three keys, the user's line (with this client's place only: its
    being a suspect, its turn waiting) and whether the pair is trusted. A store shared by
    several processes loads it before the check and saves it after (`access.shared`)."""

    failures: dict[str, Failures] = field(default_factory=dict)
    line: UserLine | None = None
    trusted: bool = False


@dataclass(slots=True)
class PasswordBackoff:
    """What failed password checks cost the next ones (issue 12, findings 3 and 6, and
    the review's finding 4).

    The policy:

    - Refused, with a wait: a client address, and a (user, address) pair. After `free`
      failures each further one makes the key wait `base * 2**k` seconds, at most `cap`.
      The guesser's address is refused; the user it guesses at, from elsewhere, is not.
      A wrong pull token counts for its address too (`failed_address`).
    - Paced, not refused: a user. After `free` failures of a user, from any addresses,
      its checks start at most `per_minute` a minute, in order of arrival (`pace`), in
      two lines: a third of the turns for the addresses that failed for this user while
      it is being guessed at, two thirds for newcomers (`NEWCOMERS_SHARE`: the user, from
      an address it has not failed from). Guessers reclaim every freed turn of their own
      line, but enter the newcomers' line once per address: so online guessing of one
      user from many addresses stays slow, yet the right password gets its turn. Each
      address has at most one turn waiting; a turn more than `cap` seconds away is
      refused (so the lines, and what waits in them, stay bounded).
    - An address a user logged in from (`succeeded`) skips the user's lines: guessing
      from elsewhere does not keep the user out of its usual place.
    - A success forgets the pair's and the user's failures, not the address's (an
      attacker with one good account must not reset the address it guesses from).

    Password checks at all are bounded elsewhere (a few threads and a short queue), so
    none of this is needed to keep guessing from being a CPU lever. A key quiet for
    `cap` seconds after its wait is forgotten (a user's lines with it). Bounded: past
    `limit` keys (lines, and addresses remembered by lines), the oldest go.
    """

    free: int
    cap: float
    base: float = 1.0
    limit: int = 100_000
    per_minute: float = 10.0
    ipv6_prefix: int = access.DEFAULT_IPV6_PREFIX
    _keys: collections.OrderedDict[str, Failures] = field(default_factory=collections.OrderedDict)
    _trusted: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    _lines: collections.OrderedDict[str, UserLine] = field(default_factory=collections.OrderedDict)
    _suspects: int = 0  # addresses remembered by all the lines together

    @staticmethod
    def _digest(*parts: str) -> str:
        # Names are client-chosen and may be long; a digest keeps each key small.
        text = "\0".join(parts).encode("utf-8", "surrogatepass")
        return hashlib.sha256(text).hexdigest()[:32]

    def _client(self, address: str) -> str:
        return address_key(address, self.ipv6_prefix)

    def _address_key(self, address: str) -> str:
        return "addr:" + self._client(address)

    def _pair_key(self, address: str, user: str) -> str:
        return "pair:" + self._digest(self._client(address), user)

    def _user_key(self, user: str) -> str:
        return "user:" + self._digest(user)

    def _delay(self, failures: Failures) -> float:
        over = failures.count + failures.pending - self.free
        if over <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(over - 1, 62))

    def _current(self, key: str, now: float) -> Failures | None:
        """The failures of `key`, unless it has been quiet long enough to be forgiven."""
        failures = self._keys.get(key)
        if failures is None:
            return None
        quiet_from = max(failures.last + self._delay(failures), failures.next_start)
        if now >= quiet_from + self.cap:
            del self._keys[key]
            self._drop_line(key)
            return None
        return failures

    def wait(self, address: str, user: str, now: float) -> float:
        """Seconds until `user` may be checked again from `address` (0: now); a refusal."""
        longest = self.address_wait(address, now)
        failures = self._current(self._pair_key(address, user), now)
        if failures is not None:
            longest = max(longest, failures.last + self._delay(failures) - now)
        return longest

    def address_wait(self, address: str, now: float) -> float:
        """Seconds until anything may be checked from `address` (0: now); a refusal."""
        failures = self._current(self._address_key(address), now)
        if failures is None:
            return 0.0
        return max(0.0, failures.last + self._delay(failures) - now)

    def pace(self, address: str, user: str, now: float) -> float | None:
        """Seconds this check of `user` waits for its turn (0: now), its turn now taken;
        None when its address has a turn waiting already, or the turn would be more than
        `cap` seconds away (refuse it)."""
        user_key = self._user_key(user)
        failures = self._current(user_key, now)
        if failures is None or failures.count < self.free:
            return 0.0
        if self._pair_key(address, user) in self._trusted:
            return 0.0
        line = self._line(user_key)
        client = self._client(address)
        line.queued = {key: start for key, start in line.queued.items() if start > now}
        if client in line.queued:
            return None
        suspect = client in line.suspects
        start = max(now, line.suspect_next if suspect else line.newcomer_next)
        if start - now > self.cap:
            return None
        share = 1.0 - NEWCOMERS_SHARE if suspect else NEWCOMERS_SHARE
        following = start + 60.0 / (self.per_minute * share)
        if suspect:
            line.suspect_next = following
        else:
            line.newcomer_next = following
        failures.next_start = max(failures.next_start, following)
        if start > now:
            line.queued[client] = start
        return start - now

    def failed(self, address: str, user: str, now: float) -> None:
        user_key = self._user_key(user)
        self._count(self._address_key(address), now)
        self._count(self._pair_key(address, user), now)
        self._count(user_key, now)
        line = self._line(user_key)
        client = self._client(address)
        if client in line.suspects:
            line.suspects.move_to_end(client)  # the newest
        else:
            line.suspects[client] = None
            self._suspects += 1
        if len(line.suspects) > MAX_SUSPECTS_PER_USER:
            line.suspects.popitem(last=False)
            self._suspects -= 1
        self._trim()

    def failed_address(self, address: str, now: float) -> None:
        """A failure of no user's (a wrong pull token): only the address pays for it."""
        self._count(self._address_key(address), now, ends=False)
        self._trim()

    def _count(self, key: str, now: float, *, begun: bool = False, ends: bool = True) -> None:
        """A failure of `key` (`ends`: one of its checks begun, if any, ended so), or with
        `begun` a check that begins. A key forgiven meanwhile counts from zero again."""
        self._current(key, now)  # drops it if forgiven (whether anyone asked since or not)
        failures = self._keys.pop(key, None) or Failures(0, now)
        if begun:
            failures.pending += 1
        else:
            failures.count += 1
            if ends:
                failures.pending = max(0, failures.pending - 1)
        failures.last = now
        self._keys[key] = failures  # to the end: the newest

    def _end_pending(self, key: str) -> None:
        failures = self._keys.get(key)
        if failures is not None:
            failures.pending = max(0, failures.pending - 1)
            if failures.count == 0 and failures.pending == 0:
                del self._keys[key]

    def start(self, address: str, user: str, now: float, *, pull_token: bool = False) -> Start:
        """Whether a check of `user`'s password from `address` may start, in one step
        (`wait`, then `pace`, then `begin`), so that no other check comes in between.

        A pull token (`pull_token`) is refused like anything else from an address that
        waits, and otherwise takes no turn and counts nothing.
        """
        wait = self.wait(address, user, now)
        if wait > 0:
            return Start(refused=wait)
        if pull_token:
            return Start()
        turn = self.pace(address, user, now)
        if turn is None:
            return Start(refused=self.cap)
        self.begin(address, user, now)
        return Start(turn=turn)

    def begin(self, address: str, user: str, now: float) -> None:
        """A check of `user` from `address` begins: until it ends (`failed`, `succeeded`,
        `abandoned`) it counts as a failure of the address and the pair, so checks running
        at once get no more tries than checks one after another."""
        self._count(self._address_key(address), now, begun=True)
        self._count(self._pair_key(address, user), now, begun=True)
        self._trim()

    def abandoned(self, address: str, user: str) -> None:
        """A check begun ended without an answer (refused for a full queue, cancelled)."""
        self._end_pending(self._address_key(address))
        self._end_pending(self._pair_key(address, user))

    def wrong_pull_token(self, address: str, now: float) -> float:
        """A wrong pull token from `address`: the seconds it waits (nothing counted), or 0
        and the failure counted; one step, so that no other check comes in between."""
        wait = self.address_wait(address, now)
        if wait <= 0:
            self.failed_address(address, now)
        return wait

    def _line(self, user_key: str) -> UserLine:
        line = self._lines.pop(user_key, None) or UserLine()
        self._lines[user_key] = line  # to the end: the newest
        return line

    def _drop_line(self, key: str) -> None:
        line = self._lines.pop(key, None)
        if line is not None:
            self._suspects -= len(line.suspects)

    def _trim(self) -> None:
        while len(self._keys) > self.limit:
            key, _ = self._keys.popitem(last=False)
            self._drop_line(key)
        while self._lines and len(self._lines) + self._suspects > self.limit:
            _, line = self._lines.popitem(last=False)
            self._suspects -= len(line.suspects)

    def keys(self, address: str, user: str) -> BackoffKeys:
        return BackoffKeys(
            self._address_key(address), self._pair_key(address, user), self._user_key(user),
            self._client(address),
        )  # fmt: skip

    def take_slice(self, keys: BackoffKeys) -> BackoffSlice:
        """The state a check of `keys` reads and writes (shared with this backoff)."""
        wanted = (keys.address, keys.pair, keys.user)
        failures = {key: self._keys[key] for key in wanted if key in self._keys}
        return BackoffSlice(failures, self._lines.get(keys.user), keys.pair in self._trusted)

    def put_slice(self, keys: BackoffKeys, part: BackoffSlice) -> None:
        """Set the state of `keys` to `part` (a backoff that holds nothing else: one
        check's worth of a shared store)."""
        for key in (keys.address, keys.pair, keys.user):
            self._keys.pop(key, None)
            if key in part.failures:
                self._keys[key] = part.failures[key]
        self._drop_line(keys.user)
        if part.line is not None:
            self._lines[keys.user] = part.line
            self._suspects += len(part.line.suspects)
        self._trusted.pop(keys.pair, None)
        if part.trusted:
            self._trusted[keys.pair] = None

    def succeeded(self, address: str, user: str) -> None:
        pair = self._pair_key(address, user)
        user_key = self._user_key(user)
        self._end_pending(self._address_key(address))
        self._keys.pop(pair, None)
        self._keys.pop(user_key, None)
        self._drop_line(user_key)
        self._trusted.pop(pair, None)
        self._trusted[pair] = None  # to the end: the newest
        while len(self._trusted) > self.limit:
            self._trusted.popitem(last=False)
