"""Client authentication: the relay as its own token service.

With `[auth] enabled = true`, every registry API request needs a relay token.
`/v2/` answers `401` with the relay's own challenge (realm: its `/token`, service:
`auth.service`); `/token` checks the client's Basic credentials (or a refresh
token, or a static pull token) against the relay's users and answers a short-lived
token scoped to the repositories asked for (`core.tokens`).

The client's credentials are the relay's, so they never go upstream. Upstream the
relay speaks for itself: anonymously or with the operator's credentials, it gets
Bearer tokens from the registry's own token service, keeps them until they expire,
and sends them along; clients never see them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import bcrypt
import trio

from vpsrelay import private_files
from vpsrelay.core import auth, headers as header_policy, tokens
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import ConfigError, Unauthorized, UpstreamProtocolError
from vpsrelay.upstream import USER_AGENT

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from vpsrelay.config import RegistryConfig, Settings
    from vpsrelay.core import routing
    from vpsrelay.upstream import Upstream

log = logging.getLogger("vpsrelay.auth")

KEY_FILE = "token.key"
# Good credentials are remembered this long, so a pull's many /token calls cost one bcrypt.
CREDENTIAL_CACHE_SECONDS = 60.0
# An upstream token is used until this many seconds before it expires.
UPSTREAM_TOKEN_MARGIN = 10.0
DEFAULT_UPSTREAM_TOKEN_SECONDS = 60.0
# Compared against when the user does not exist, so a wrong name costs as much as a wrong
# password and the answer time does not tell which users exist.
# RFC 9110 §11.2 token68: what a Bearer credential may hold.
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_DUMMY_HASH = bcrypt.hashpw(b"vpsrelay-dummy", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True, slots=True)
class TokenReply:
    body: bytes


class ClientAuth:
    """Users, the signing key, the relay's `/token`, and the relay's own upstream tokens."""

    def __init__(self, settings: Settings, upstream: Upstream) -> None:
        cfg = settings.auth
        self.enabled = cfg.enabled
        self.settings = settings
        self.upstream = upstream
        self.service = cfg.service
        self.key_path = settings.data_dir / KEY_FILE
        self._key: bytes | None = None
        self._static_users = tokens.parse_htpasswd("\n".join(u.reveal() for u in cfg.users))
        self._pull_tokens = [t.reveal() for t in cfg.pull_tokens]
        self._file_users: dict[str, str] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._file_tokens: list[str] = []
        self._good: dict[bytes, tuple[str, float]] = {}
        self._upstream_tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = trio.Lock()

    # -- start-up state ------------------------------------------------------------------------

    async def _signing_key(self) -> bytes:
        if self._key is None:
            async with self._lock:
                if self._key is None:
                    self._key = await trio.to_thread.run_sync(load_or_create_key, self.key_path)
        return self._key

    async def _users(self) -> dict[str, str]:
        """Users from the config and the users file (re-read when it changes)."""
        path = self.settings.auth.users_file
        if path is not None:
            try:
                stat = await trio.Path(path).stat()
                stamp: tuple[float, int] | None = (stat.st_mtime, stat.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp != self._file_stamp:
                text = await trio.Path(path).read_text(encoding="utf-8") if stamp else ""
                try:
                    self._file_users = tokens.parse_htpasswd(text)
                except ValueError as exc:
                    log.error("users file %s: %s; keeping the users read before", path, exc)
                else:
                    self._file_stamp = stamp
                    self._good.clear()
        tokens_file = self.settings.auth.pull_tokens_file
        if tokens_file is not None and not self._file_tokens:
            text = await trio.Path(tokens_file).read_text(encoding="utf-8")
            self._file_tokens = [line.strip() for line in text.splitlines() if line.strip()]
        return {**self._static_users, **self._file_users}

    def _is_pull_token(self, value: str) -> bool:
        candidates = [*self._pull_tokens, *self._file_tokens]
        found = False
        for token in candidates:  # no early exit: constant time over the list
            found |= secrets.compare_digest(token.encode(), value.encode())
        return found

    # -- who is asking -------------------------------------------------------------------------

    async def check_password(self, user: str, password: str) -> str:
        """The subject for good credentials (a user, or `token` for a static pull token).

        Raises:
            Unauthorized: wrong user or password (reason `bad_credentials`).
        """
        users = await self._users()
        if self._is_pull_token(password):
            return "token"
        fingerprint = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        now = trio.current_time()
        remembered = self._good.get(fingerprint)
        if remembered is not None and now - remembered[1] < CREDENTIAL_CACHE_SECONDS:
            return remembered[0]
        hashed = users.get(user)
        check = (hashed or _DUMMY_HASH.decode()).encode()
        ok = await trio.to_thread.run_sync(bcrypt.checkpw, password.encode(), check)
        if not ok or hashed is None:
            raise Unauthorized("incorrect username or password", reason="bad_credentials")
        if len(self._good) > 10000:
            self._good.clear()
        self._good[fingerprint] = (user, now)
        return user

    def challenge(self, realm: str, scope: str | None) -> str:
        params = [("realm", realm), ("service", self.service)]
        if scope:
            params.append(("scope", scope))
        return auth.Challenge("Bearer", tuple(params)).format()

    async def verify(self, headers: header_policy.Headers, route: routing.Route, realm: str) -> str:
        """The user behind a request's relay token, if it covers the route.

        Raises:
            Unauthorized: no token, a bad or expired one, or one for other repositories;
                with the relay's challenge for this route.
        """
        scope = f"repository:{route.upstream_name}:pull" if route.upstream_name else None
        challenge = (("www-authenticate", self.challenge(realm, scope)),)
        presented = tokens.parse_bearer(header_policy.get(headers, "authorization"))
        if presented is None:
            raise Unauthorized(
                "authentication required", reason="no_credentials", headers=challenge
            )
        if self._pull_tokens or self.settings.auth.pull_tokens_file:
            await self._users()  # loads the token file
            if self._is_pull_token(presented):
                return "token"
        key = await self._signing_key()
        try:
            grant = tokens.verify(key, presented, service=self.service, now=time.time())
        except Unauthorized as exc:
            raise Unauthorized(exc.message, reason=exc.reason, headers=challenge) from None
        if route.upstream_name and not grant.covers(route.registry, route.upstream_name):
            raise Unauthorized(
                f"token does not cover {route.upstream_name!r}",
                reason="token_scope",
                headers=challenge,
            )
        return grant.subject

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
                subject = await self.check_password(
                    form.get("username", ""), form.get("password", "")
                )
                offline = form.get("access_type") == "offline"
            elif grant_type == "refresh_token":
                subject = tokens.verify_refresh(
                    key, form.get("refresh_token", ""), service=self.service, now=now
                )
                if subject not in await self._users() and subject != "token":
                    raise Unauthorized("user no longer exists", reason="bad_credentials")
                offline = True
            else:
                raise Unauthorized("unsupported grant_type", reason="bad_credentials")
        else:
            credentials = tokens.parse_basic(header_policy.get(headers, "authorization"))
            if credentials is None:
                raise Unauthorized(
                    "credentials required", reason="no_credentials", headers=challenge
                )
            subject = await self.check_password(*credentials)
            offline = form.get("offline_token", "").lower() == "true"
        names: list[str] = []
        scopes: list[str] = []
        for value in (v for k, v in params if k == "scope"):
            for text in value.split(" "):
                scope = auth.Scope.parse(text)
                if scope is None or not scope.resource_type.startswith("repository"):
                    continue
                name = to_upstream(scope.name)
                if "pull" in scope.actions.split(","):
                    names.append(name)
                    scopes.append(f"repository:{name}:pull")
        if names:
            # Get (and keep) the upstream's token now, so a failing upstream shows here.
            await self.upstream_token(registry, names)
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
                key, subject=subject, service=self.service, now=now,
                ttl=self.settings.auth.refresh_ttl,
            )  # fmt: skip
        log.info("token for user=%s repositories=%s", subject, ",".join(names) or "-")
        return json.dumps(reply).encode()

    # -- upstream, as the relay itself ------------------------------------------------------------

    async def upstream_headers(
        self, client_headers: header_policy.Headers, registry: RegistryConfig, name: str
    ) -> header_policy.Headers:
        """The headers for the upstream: the client's without its (relay) credentials, plus
        the relay's own: a Bearer token it got, or the operator's Basic credentials."""
        headers = tuple(
            (k, v)
            for k, v in header_policy.upstream_request_headers(client_headers, USER_AGENT)
            if k != "authorization"
        )
        challenge = await self.upstream.challenge(registry)
        if challenge is not None and name:
            token = await self.upstream_token(registry, [name])
            return (*headers, ("authorization", f"Bearer {token}"))
        if self.upstream.known_scheme(registry.name) == "basic" and registry.has_credentials:
            return (*headers, ("authorization", basic(registry)))
        return headers

    def forget_upstream_token(self, registry: str, name: str) -> None:
        self._upstream_tokens.pop((registry, name), None)

    async def upstream_token(self, registry: RegistryConfig, names: list[str]) -> str:
        """A token from the registry's token service that covers `names` (pull).

        Raises:
            RelayError: the token service failed or answered no token.
        """
        now = trio.current_time()
        cached = {self._upstream_tokens.get((registry.name, n)) for n in names}
        if len(cached) == 1 and (known := cached.pop()) is not None and known[1] > now:
            return known[0]
        challenge = await self.upstream.challenge(registry)
        if challenge is None or not challenge.realm:
            return ""
        query: list[tuple[str, str]] = []
        if challenge.service:
            query.append(("service", challenge.service))
        query += [("scope", f"repository:{n}:pull") for n in sorted(set(names))]
        separator = "&" if "?" in challenge.realm else "?"
        url = f"{challenge.realm}{separator}{urlencode(query)}"
        request_headers: list[tuple[str, str]] = [("user-agent", USER_AGENT)]
        if registry.has_credentials:
            request_headers.append(("authorization", basic(registry)))
        request = UpstreamRequest("GET", url, tuple(request_headers))
        async with self.upstream.open(request, what=f"{registry.name} token") as response:
            body = await response.aread()
        if response.status_code != 200:
            log.warning("%s token service answered %d", registry.name, response.status_code)
            raise UpstreamProtocolError(
                f"{registry.name}: token service answered {response.status_code}"
            )
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or DEFAULT_UPSTREAM_TOKEN_SECONDS)
        except (ValueError, AttributeError, TypeError):
            token = None
            lifetime = 0.0
        if not isinstance(token, str) or not token or not _TOKEN68.fullmatch(token):
            raise UpstreamProtocolError(f"{registry.name}: token service answered no token")
        until = now + max(1.0, lifetime - UPSTREAM_TOKEN_MARGIN)
        for name in names:
            self._upstream_tokens[(registry.name, name)] = (token, until)
        if len(self._upstream_tokens) > 10000:
            self._upstream_tokens = {k: v for k, v in self._upstream_tokens.items() if v[1] > now}
        return token


def basic(registry: RegistryConfig) -> str:
    assert registry.username is not None
    assert registry.password is not None
    pair = f"{registry.username}:{registry.password.reveal()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def load_or_create_key(path: Path) -> bytes:
    """The token signing key: 32 random bytes, made once, readable by the owner only."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        private_files.make_dir(path.parent)
        key = secrets.token_hex(32)
        try:
            fd = private_files.open_file(path, os.O_WRONLY | os.O_EXCL)
        except FileExistsError:  # another process made it first
            return load_or_create_key(path)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return bytes.fromhex(key)
    try:
        key_bytes = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: not a token key (64 hex digits)") from None
    if len(key_bytes) < 32:
        raise ConfigError(f"{path}: token key too short (64 hex digits)")
    return key_bytes


def add_user(path: Path, user: str, password: str, *, rounds: int = 12) -> bool:
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
