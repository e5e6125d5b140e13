"""Client authentication: the relay as its own token service.

With `[auth] enabled = true`, every registry API request needs a relay token.
`/v2/` answers `401` with the relay's own challenge (realm: its `/token`, service:
`auth.service`); `/token` checks the client's Basic credentials (or a refresh
token, or a static pull token) against the relay's users and answers a short-lived
token scoped to the repositories asked for (`core.tokens`).

Password checks (bcrypt) run in threads of their own, a few at a time: when all are
busy a check is refused at once (429). Failed checks cost the next ones
(`core.tokens.PasswordBackoff`): the same address, and the same user from that address,
are refused for a while; the same user from elsewhere is checked in turn, a few times a
minute (`auth.guesses_per_minute`), so guessing stays slow but cannot lock a user out.
Pull tokens are recognised without bcrypt and without a turn, but an address refused
for failures is refused whatever it sends, and a wrong pull token (Basic or Bearer) counts as
a failure of its address. With several workers (`server.workers` > 1) the backoff is one for
the relay, in `<data_dir>/limits.db` (`SharedBackoff`): a guesser spreading its tries over
the workers gets the tries one process gives; the only process of a relay keeps it in
memory. The password check slots (`auth.password_checks`) stay per process: they bound
that process's CPU and memory. The users file
and the pull tokens file are re-read when they change; a refresh token stays good only
while the credential that earned it does.

The client's credentials are the relay's, so they never go upstream. Upstream the
relay speaks for itself: anonymously or with the operator's credentials, it gets
Bearer tokens from the registry's own token service, keeps them until they expire,
and sends them along; clients never see them.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

import bcrypt
import trio

from vpsrelay import private_files, worker_identity
from vpsrelay.access.shared import LimitsUnavailable, SharedLimits
from vpsrelay.core import auth, headers as header_policy, tokens
from vpsrelay.errors import ConfigError, TooManyRequests, Unauthorized
from vpsrelay.upstream import USER_AGENT
from vpsrelay.upstream.tokens import TokenClient, basic

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from vpsrelay.config import RegistryConfig, Settings
    from vpsrelay.core import routing

log = logging.getLogger("vpsrelay.auth")
_T = TypeVar("_T")

KEY_FILE = "token.key"
# Good credentials are remembered this long, so a pull's many /token calls cost one bcrypt.
CREDENTIAL_CACHE_SECONDS = 60.0
# The bcrypt cost `vpsrelay user add` hashes with.
BCRYPT_ROUNDS = 12
# bcrypt reads no more of a password than this.
BCRYPT_MAX_PASSWORD_BYTES = 72
# Good credentials remembered at most.
MAX_GOOD_CREDENTIALS = 10_000
# Password checks that may wait for a busy slot, per slot; past them the answer is 429.
PASSWORD_QUEUE_PER_SLOT = 4
# The users and pull tokens files are looked at (stat) at most this often.
RELOAD_CHECK_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TokenReply:
    body: bytes


@dataclass(frozen=True, slots=True)
class Credential:
    """Who passed a password check, and what a refresh token for them is bound to."""

    subject: str
    binding: tokens.Binding


@dataclass(slots=True)
class WatchedFile:
    """A file re-read when it changes: its inode (an atomic replace), size, or
    modification or change time (a same-size edit within one mtime tick)."""

    path: Path | None
    stamp: tuple[int, int, int, int] | None = None
    text: str = ""
    checked: float = -math.inf
    warned: object = None  # what the last "cannot read" warning was about

    async def changed(self, now: float) -> bool:
        """Whether the text changed since the last call (looks at most once a second).

        A missing file reads as empty: removing it revokes what it held. A file that
        cannot be read (permissions, not UTF-8) keeps the text read before, with one
        warning per change of the file: a request never fails for it.
        """
        if self.path is None or now - self.checked < RELOAD_CHECK_SECONDS:
            return False
        self.checked = now
        try:
            stamp = _stamp(await trio.Path(self.path).stat())
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            return self._unreadable(("stat", exc.errno), exc)
        if stamp == self.stamp:
            return False
        try:
            text = await trio.Path(self.path).read_text(encoding="utf-8") if stamp else ""
        except FileNotFoundError:
            stamp, text = None, ""
        except (OSError, UnicodeDecodeError) as exc:
            return self._unreadable(stamp, exc)
        self.stamp, self.text, self.warned = stamp, text, None
        return True

    def _unreadable(self, about: object, exc: Exception) -> bool:
        """Keep the text read before; warn once per change of the file (read again later)."""
        if about != self.warned:
            self.warned = about
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("%s: cannot read it (%s); keeping what was read before", self.path, reason)
        return False


def _stamp(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(slots=True)
class _PasswordChecks:
    """bcrypt off the event loop, in a few threads of its own (not Trio's shared pool),
    behind a short queue (a burst of logins waits a moment; a flood is refused)."""

    slots: trio.CapacityLimiter
    dummies: dict[int, bytes] = field(default_factory=dict)
    pending: int = 0  # running or waiting for a slot

    async def check(self, password: str, hashed: str | None, dummy_cost: int) -> bool:
        """Whether `password` matches `hashed`; with no hash, as slow a check that fails.

        Raises:
            TooManyRequests: every slot is busy and the queue full (answered at once).
        """
        if self.pending >= self.slots.total_tokens * (1 + PASSWORD_QUEUE_PER_SLOT):
            raise TooManyRequests(
                "too many password checks at once; retry shortly",
                headers=(("retry-after", "1"),),
            )
        self.pending += 1
        try:
            return await self._check(password, hashed, dummy_cost)
        finally:
            self.pending -= 1

    async def _check(self, password: str, hashed: str | None, dummy_cost: int) -> bool:
        encoded = password.encode("utf-8", "surrogatepass")
        # bcrypt reads 72 bytes at most (bcrypt 5 refuses more): a longer password is
        # wrong, after as slow a check as any other.
        if hashed is None or len(encoded) > BCRYPT_MAX_PASSWORD_BYTES:
            dummy = self.dummies.get(dummy_cost)
            if dummy is None:
                salt = bcrypt.gensalt(rounds=dummy_cost)
                dummy = await trio.to_thread.run_sync(
                    bcrypt.hashpw, b"vpsrelay-dummy", salt, limiter=self.slots
                )
                self.dummies[dummy_cost] = dummy
            await trio.to_thread.run_sync(
                bcrypt.checkpw, encoded[:BCRYPT_MAX_PASSWORD_BYTES], dummy, limiter=self.slots
            )
            return False
        try:
            return await trio.to_thread.run_sync(
                bcrypt.checkpw, encoded, hashed.encode(), limiter=self.slots
            )
        except ValueError:  # a hash with a bcrypt prefix that bcrypt cannot read
            log.warning("a user's password hash is not a valid bcrypt hash")
            return False


class Backoff(Protocol):
    """What failed logins cost the next ones (`core.tokens.PasswordBackoff`'s methods)."""

    def start(
        self, address: str, user: str, now: float, *, pull_token: bool = False
    ) -> tokens.Start: ...
    def failed(self, address: str, user: str, now: float) -> None: ...
    def succeeded(self, address: str, user: str) -> None: ...
    def abandoned(self, address: str, user: str) -> None: ...
    def address_wait(self, address: str, now: float) -> float: ...
    def wrong_pull_token(self, address: str, now: float) -> float: ...


class SharedBackoff:
    """The backoff of every process of one relay, kept in `limits.db`.

    Each call is one transaction: the slice of the state its address and user concern is
    loaded into an empty `PasswordBackoff`, the policy runs on it, and what it changed is
    saved. Times are wall clock (`time.time()`): every process reads the same clock.
    """

    def __init__(self, shared: SharedLimits, policy: Callable[[], tokens.PasswordBackoff]) -> None:
        self.shared = shared
        self.policy = policy
        sample = policy()
        self.quiet = 2 * sample.cap  # a key is forgiven `cap` after a wait of `cap` at most
        self.limit = sample.limit

    def _run(
        self, address: str, user: str, now: float, action: Callable[[tokens.PasswordBackoff], _T]
    ) -> _T:
        backoff = self.policy()
        keys = backoff.keys(address, user)
        with self.shared.login_state(keys, now, quiet=self.quiet, limit=self.limit) as part:
            backoff.put_slice(keys, part)
            result = action(backoff)
            after = backoff.take_slice(keys)
            part.failures, part.line, part.trusted = after.failures, after.line, after.trusted
        return result

    def start(
        self, address: str, user: str, now: float, *, pull_token: bool = False
    ) -> tokens.Start:
        return self._run(
            address, user, now, lambda b: b.start(address, user, now, pull_token=pull_token)
        )

    def wait(self, address: str, user: str, now: float) -> float:
        return self._run(address, user, now, lambda b: b.wait(address, user, now))

    def pace(self, address: str, user: str, now: float) -> float | None:
        return self._run(address, user, now, lambda b: b.pace(address, user, now))

    def begin(self, address: str, user: str, now: float) -> None:
        self._run(address, user, now, lambda b: b.begin(address, user, now))

    def failed(self, address: str, user: str, now: float) -> None:
        self._run(address, user, now, lambda b: b.failed(address, user, now))

    def succeeded(self, address: str, user: str) -> None:
        self._run(address, user, time.time(), lambda b: b.succeeded(address, user))

    def abandoned(self, address: str, user: str) -> None:
        self._run(address, user, time.time(), lambda b: b.abandoned(address, user))

    def address_wait(self, address: str, now: float) -> float:
        # Asked on every request with a right pull token as Bearer: read, no transaction.
        backoff = self.policy()
        keys = backoff.keys(address, "")
        backoff.put_slice(keys, self.shared.login_snapshot(keys, now))
        return backoff.address_wait(address, now)

    def failed_address(self, address: str, now: float) -> None:
        self._run(address, "", now, lambda b: b.failed_address(address, now))

    def wrong_pull_token(self, address: str, now: float) -> float:
        return self._run(address, "", now, lambda b: b.wrong_pull_token(address, now))


class ClientAuth:
    """Users, the signing key, the relay's `/token`, and the relay's own upstream tokens."""

    def __init__(
        self, settings: Settings, token_client: TokenClient, shared: SharedLimits | None = None
    ) -> None:
        cfg = settings.auth
        self.enabled = cfg.enabled
        self.settings = settings
        self.upstream = token_client.upstream
        # The relay's own upstream tokens (shared with the app and the cache).
        self.token_client = token_client  # the relay's own upstream tokens, shared
        self.service = cfg.service
        self.key_path = settings.data_dir / KEY_FILE
        self._key: bytes | None = None
        self._static_users = tokens.parse_htpasswd("\n".join(u.reveal() for u in cfg.users))
        self._pull_tokens = [t.reveal() for t in cfg.pull_tokens]
        self._users_file = WatchedFile(cfg.users_file)
        self._file_users: dict[str, str] = {}
        self._tokens_file = WatchedFile(cfg.pull_tokens_file)
        self._file_tokens: list[str] = []
        self._dummy_cost = tokens.usual_cost(self._static_users.values(), BCRYPT_ROUNDS)
        self._good: collections.OrderedDict[bytes, tuple[Credential, float]] = (
            collections.OrderedDict()
        )
        # Bumped whenever the users or pull tokens change: a check that began before a
        # change must not remember its (maybe no longer) good credentials.
        self._generation = 0
        self._checking: dict[bytes, trio.Event] = {}  # credentials being checked now
        self._reloading = trio.Lock()
        self._checks = _PasswordChecks(trio.CapacityLimiter(cfg.password_checks))

        def policy() -> tokens.PasswordBackoff:
            return tokens.PasswordBackoff(
                free=cfg.failures_before_backoff, cap=cfg.max_backoff,
                per_minute=cfg.guesses_per_minute, ipv6_prefix=settings.limits.ipv6_prefix_length,
            )  # fmt: skip

        self._backoff: Backoff
        if worker_identity.current().count > 1:
            # Workers share one backoff, or a guesser would get a try per worker.
            shared = shared or SharedLimits(settings.data_dir)
            self._backoff, self._backoff_clock = SharedBackoff(shared, policy), time.time
        else:
            self._backoff, self._backoff_clock = policy(), trio.current_time
        self._lock = trio.Lock()

    # -- start-up state ------------------------------------------------------------------------

    async def _signing_key(self) -> bytes:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    self._key = await trio.to_thread.run_sync(load_or_create_key, self.key_path)
        return self._key

    async def _users(self) -> dict[str, str]:
        """Users from the config and the users file; both files re-read when they change."""
        async with self._reloading:  # callers during a reload wait for its result
            await self._reload(trio.current_time())
        return {**self._static_users, **self._file_users}

    async def _reload(self, now: float) -> None:
        if await self._users_file.changed(now):
            try:
                self._file_users = tokens.parse_htpasswd(self._users_file.text)
            except ValueError as exc:
                log.error(
                    "users file %s: %s; keeping the users read before", self._users_file.path, exc
                )
            users = {**self._static_users, **self._file_users}
            self._dummy_cost = tokens.usual_cost(users.values(), BCRYPT_ROUNDS)
            self._forget_good_credentials()
        if await self._tokens_file.changed(now):
            self._file_tokens, problems = tokens.parse_pull_tokens(self._tokens_file.text)
            for problem in problems:
                log.error("pull tokens file %s: %s; left out", self._tokens_file.path, problem)
            self._forget_good_credentials()

    def _forget_good_credentials(self) -> None:
        self._good.clear()
        self._generation += 1

    def _find_pull_token(self, value: str) -> str | None:
        """`value`, if it is one of the pull tokens (constant time over the list)."""
        found: str | None = None
        for token in [*self._pull_tokens, *self._file_tokens]:  # no early exit
            if secrets.compare_digest(token.encode(), value.encode()):
                found = token
        return found

    def _is_pull_token(self, value: str) -> bool:
        return self._find_pull_token(value) is not None

    async def _still_good(self, grant: tokens.RefreshGrant) -> bool:
        """Whether the credential a refresh token is bound to is still configured."""
        users = await self._users()
        key = await self._signing_key()
        if grant.binding.kind == tokens.BY_PULL_TOKEN:
            current = [*self._pull_tokens, *self._file_tokens]
            bindings = [tokens.Binding.of_pull_token(key, t) for t in current]
        else:
            hashed = users.get(grant.subject)
            bindings = [] if hashed is None else [
                tokens.Binding.of_password(key, grant.subject, hashed)
            ]  # fmt: skip
        return any(grant.binding.matches(b) for b in bindings)

    # -- who is asking -------------------------------------------------------------------------

    async def check_password(self, user: str, password: str, client_ip: str) -> Credential:
        """Who good credentials are (a user, or `token` for a static pull token).

        The backoff (`core.tokens.PasswordBackoff`) first: an address, or a user from an
        address, that failed too often is refused, whatever it sends (a pull token too:
        else an address refused for guessing could go on guessing pull tokens). A pull
        token is then recognised without bcrypt and without waiting in a user's line; a
        user that failed too often from anywhere is checked in turn, a few times a
        minute, never refused for that alone.

        Raises:
            Unauthorized: wrong user or password (reason `bad_credentials`).
            TooManyRequests: `client_ip` (or `user` from it) failed too often lately,
                `user`'s turn is too far away, or every password check slot is busy (with
                Retry-After).
        """
        users = await self._users()
        key = await self._signing_key()  # the bindings are keyed hashes
        pair = f"{user}\0{password}".encode("utf-8", "surrogatepass")
        fingerprint = hashlib.sha256(pair).digest()
        while (running := self._checking.get(fingerprint)) is not None:
            # The same credentials are being checked (a burst of one client's requests):
            # one bcrypt answers them all. Each wait ends with that (bounded) check.
            await running.wait()
        now = trio.current_time()
        remembered = self._good.get(fingerprint)
        if remembered is not None and now - remembered[1] < CREDENTIAL_CACHE_SECONDS:
            return remembered[0]  # known good: no guess, so no backoff
        is_pull_token = self._find_pull_token(password) is not None
        start = self._backoff.start(
            client_ip, user, self._backoff_clock(), pull_token=is_pull_token
        )
        if start.refused > 0:
            raise _too_many_failures(start.refused)
        if is_pull_token:
            return Credential("token", tokens.Binding.of_pull_token(key, password))
        generation = self._generation
        hashed = users.get(user)
        self._checking[fingerprint] = done = trio.Event()
        decided = False
        try:
            await trio.sleep(start.turn)  # the user's turn (0 unless it is being guessed at)
            good = await self._checks.check(password, hashed, self._dummy_cost)
            if not good or hashed is None:
                decided = True
                self._backoff.failed(client_ip, user, self._backoff_clock())
                raise Unauthorized("incorrect username or password", reason="bad_credentials")
            decided = True
            self._backoff.succeeded(client_ip, user)
        finally:
            del self._checking[fingerprint]
            done.set()
            if not decided:  # no answer (a full queue, cancelled): the check did not count
                with contextlib.suppress(LimitsUnavailable):
                    self._backoff.abandoned(client_ip, user)
        credential = Credential(user, tokens.Binding.of_password(key, user, hashed))
        if generation != self._generation and (await self._users()).get(user) != hashed:
            # The users changed during the check, and this password with them.
            raise Unauthorized("incorrect username or password", reason="bad_credentials")
        if generation == self._generation:  # else remembered only by a later check
            self._good[fingerprint] = (credential, now)
            while len(self._good) > MAX_GOOD_CREDENTIALS:
                self._good.popitem(last=False)
        return credential

    def challenge(self, realm: str, scope: str | None) -> str:
        params = [("realm", realm), ("service", self.service)]
        if scope:
            params.append(("scope", scope))
        return auth.Challenge("Bearer", tuple(params)).format()

    async def verify(
        self, headers: header_policy.Headers, route: routing.Route, realm: str, client_ip: str
    ) -> str:
        """The user behind a request's relay token (or `token`, a static pull token), if
        it covers the route.

        A presented token that is neither a relay token nor a pull token counts as a
        failure for `client_ip`, like a wrong password: pull tokens are guessed no
        faster than passwords.

        Raises:
            Unauthorized: no token, a bad or expired one, or one for other repositories;
                with the relay's challenge for this route.
            TooManyRequests: not a relay token, and `client_ip` failed too often lately.
        """
        scope = f"repository:{route.upstream_name}:pull" if route.upstream_name else None
        challenge = (("www-authenticate", self.challenge(realm, scope)),)
        presented = tokens.parse_bearer(header_policy.get(headers, "authorization"))
        if presented is None:
            raise Unauthorized(
                "authentication required", reason="no_credentials", headers=challenge
            )
        key = await self._signing_key()
        try:
            grant = tokens.verify(key, presented, service=self.service, now=time.time())
        except Unauthorized as exc:
            if exc.reason == "token_invalid" and await self._pull_token_presented(
                presented, client_ip
            ):
                return "token"
            raise Unauthorized(exc.message, reason=exc.reason, headers=challenge) from None
        if route.upstream_name and not grant.covers(route.registry, route.upstream_name):
            raise Unauthorized(
                f"token does not cover {route.upstream_name!r}",
                reason="token_scope",
                headers=challenge,
            )
        return grant.subject

    async def _pull_token_presented(self, presented: str, client_ip: str) -> bool:
        """Whether `presented` (not a relay token) is a pull token; if not, a failure of
        `client_ip`'s.

        Raises:
            TooManyRequests: `client_ip` failed too often lately (nothing is compared).
        """
        if not self._pull_tokens and not self.settings.auth.pull_tokens_file:
            return False  # no pull token to guess
        await self._users()  # (re)loads the token file
        now = self._backoff_clock()
        good = self._is_pull_token(presented)
        if good:
            wait = self._backoff.address_wait(client_ip, now)
        else:  # refused, or counted: one step, so no other process's guess comes between
            wait = self._backoff.wrong_pull_token(client_ip, now)
        if wait > 0:
            raise _too_many_failures(wait)
        return good

    # -- /token ---------------------------------------------------------------------------------

    async def token(
        self,
        *,
        method: str,
        params: list[tuple[str, str]],
        headers: header_policy.Headers,
        registry: RegistryConfig,
        to_upstream: Callable[[str], str],
        realm: str,
        client_ip: str,
    ) -> bytes:
        """Answer a token request: GET with Basic credentials, or the OAuth2 POST form.

        Raises:
            Unauthorized: no or wrong credentials, or a bad refresh token.
            RelayError: a malformed scope, or the upstream token service failed.
        """
        challenge = (("www-authenticate", f'Basic realm="{self.service}"'),)
        key = await self._signing_key()
        now = time.time()
        form = dict(params)
        offline = False
        if method == "POST":
            grant_type = form.get("grant_type", "")
            if grant_type == "password":
                credential = await self.check_password(
                    form.get("username", ""), form.get("password", ""), client_ip
                )
                offline = form.get("access_type") == "offline"
            elif grant_type == "refresh_token":
                grant = tokens.verify_refresh(
                    key, form.get("refresh_token", ""), service=self.service, now=now
                )
                if not await self._still_good(grant):
                    raise Unauthorized(
                        "the credential this refresh token was issued for is no longer valid",
                        reason="bad_credentials",
                    )
                credential = Credential(grant.subject, grant.binding)
                offline = True
            else:
                raise Unauthorized("unsupported grant_type", reason="bad_credentials")
        else:
            credentials = tokens.parse_basic(header_policy.get(headers, "authorization"))
            if credentials is None:
                raise Unauthorized(
                    "credentials required", reason="no_credentials", headers=challenge
                )
            credential = await self.check_password(*credentials, client_ip)
            offline = form.get("offline_token", "").lower() == "true"
        subject = credential.subject
        names = auth.pull_scopes([v for k, v in params if k == "scope"], to_upstream, _any)
        scopes = [f"repository:{name}:pull" for name in names]
        # The upstream's token is fetched when a pull needs it (`upstream_headers`), not
        # here: naming repositories costs the relay no upstream request.
        ttl = self.settings.auth.token_ttl
        access_token = tokens.issue(
            key, subject=subject, service=self.service,
            repositories=[f"{registry.name}/{name}" for name in names], now=now, ttl=ttl,
        )  # fmt: skip
        issued = dt.datetime.fromtimestamp(now, dt.UTC).isoformat().replace("+00:00", "Z")
        reply: dict[str, object] = {
            "token": access_token,
            "access_token": access_token,
            "expires_in": int(ttl),
            "issued_at": issued,
        }
        if method == "POST":
            reply["scope"] = " ".join(scopes)
        if offline:
            reply["refresh_token"] = tokens.issue_refresh(
                key, subject=subject, service=self.service, binding=credential.binding,
                now=now, ttl=self.settings.auth.refresh_ttl,
            )  # fmt: skip
        log.info("token for user=%s repositories=%s", subject, ",".join(names) or "-")
        return json.dumps(reply).encode()

    # -- upstream, as the relay itself ------------------------------------------------------------

    async def upstream_headers(
        self,
        client_headers: header_policy.Headers,
        registry: RegistryConfig,
        name: str,
        avoid: Sequence[str] = (),
    ) -> header_policy.Headers:
        """The headers for the upstream: the client's without its (relay) credentials, plus
        the relay's own: a Bearer token it got, or the operator's Basic credentials, with
        a pool credential that is not one of `avoid` (those this request already tried)."""
        headers = tuple(
            (k, v)
            for k, v in header_policy.upstream_request_headers(client_headers, USER_AGENT)
            if k != "authorization"
        )
        challenge = await self.upstream.challenge(registry)
        username = (
            self.token_client.choose_credential(registry, avoid)
            if registry.has_credentials
            else None
        )
        if challenge is not None and name:
            token = await self.token_client.pull_token(
                registry, [name], operator=True, username=username
            )
            if token is not None:
                return (*headers, ("authorization", f"Bearer {token}"))
            return headers
        if self.upstream.known_scheme(registry.name) == "basic" and username is not None:
            return (*headers, ("authorization", basic(registry, username)))
        return headers


def _too_many_failures(retry: float) -> TooManyRequests:
    return TooManyRequests(
        "too many failed logins; retry later",
        headers=(("retry-after", str(max(1, math.ceil(retry)))),),
    )


def _any(name: str) -> bool:
    return True


def load_or_create_key(path: Path) -> bytes:
    """The token signing key: 32 random bytes, made once, readable by the owner only."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        _create_key(path)
        text = path.read_text(encoding="ascii").strip()  # ours, or the one that won
    try:
        key_bytes = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: not a token key (64 hex digits)") from None
    if len(key_bytes) < 32:
        raise ConfigError(f"{path}: token key too short (64 hex digits)")
    return key_bytes


def _create_key(path: Path) -> None:
    """Make the key file whole, or leave the one another process made.

    Workers start at once: the key is written and fsynced under a name of its own, then
    linked to `path`, which fails if `path` exists; so `path` is never seen empty or
    half-written, and every process reads the one key that won.
    """
    private_files.make_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = private_files.open_file(temporary, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def add_user(path: Path, user: str, password: str, *, rounds: int = BCRYPT_ROUNDS) -> bool:
    """Add or replace `user` in an htpasswd file (bcrypt); True if it was new.

    Raises:
        ValueError: a user name with `:` or whitespace, or an empty password.
    """
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"not a user name (no ':' or spaces): {user!r}")
    if not password:
        raise ValueError("empty password")
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    tokens.parse_htpasswd("\n".join(lines))  # refuse to rewrite a file we cannot read
    kept = [line for line in lines if line.partition(":")[0].strip() != user]
    new = len(kept) == len(lines)
    kept.append(f"{user}:{hashed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(kept) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return new
