"""The one token client: Bearer tokens from a registry's token service.

The relay, the cache and client authentication ask `TokenClient.pull_token` for the
relay's own pull tokens (anonymous, or earned with the operator's Basic credentials),
kept per registry, repository and credential until shortly before they expire. An
open relay's `/token` passes a client's own token request on with
`TokenClient.relay_request`. `fetch_token_blocking` is the same conversation for the
command-line tools that talk to a relay as a client (`check`, `warm`).

Token URLs are built by `core.auth.token_url` (a realm's own query survives) and answers
read by `core.auth.parse_token_answer`; every transport error, body reads included,
goes through `client`'s boundary and comes out a `RelayError`.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from vpsrelay.core import auth, ratelimit
from vpsrelay.core.credpool import CredentialPool
from vpsrelay.core.redirects import UpstreamRequest
from vpsrelay.errors import TokenRefused, UpstreamError, UpstreamProtocolError
from vpsrelay.upstream.client import (
    MAX_TOKEN_ANSWER_BYTES,
    USER_AGENT,
    map_httpx_errors,
    read_body,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import httpx

    from vpsrelay.config import RegistryConfig
    from vpsrelay.core.credpool import CredentialState
    from vpsrelay.core.headers import Headers
    from vpsrelay.upstream.client import Upstream

log = logging.getLogger("vpsrelay.upstream")

# A token is used until this many seconds before it expires.
TOKEN_MARGIN = 10.0
# Tokens kept at most (one per registry, repository and credential; least recently used go).
MAX_TOKENS = 1024
ANONYMOUS = "anonymous"
OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class TokenRelayed:
    """A token service's answer to a client's request, passed on as it came."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class TokenClient:
    """Fetches and keeps the relay's own upstream pull tokens; relays clients' requests."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        # (registry, repository, credential) -> (token, good until): least recently used first.
        self._tokens: collections.OrderedDict[tuple[str, str, str], tuple[str, float]] = (
            collections.OrderedDict()
        )
        # The operator's credentials per registry, chosen in turn (`core.credpool`).
        self.pools = {
            registry.name: CredentialPool([c.username for c in registry.credentials])
            for registry in upstream.settings.registries
            if registry.has_credentials
        }

    def choose_credential(self, registry: RegistryConfig, avoid: Sequence[str] = ()) -> str:
        """The operator credential (its username) the next request to `registry` uses.
        The registry has credentials: the caller checked."""
        return self.pools[registry.name].choose(trio.current_time(), avoid)

    def holder(self, registry: RegistryConfig, authorization: str | None) -> str | None:
        """Which operator credential an `Authorization` the relay sent stands for: a
        Bearer token it fetched with it, or its Basic pair; None for anything else."""
        if authorization is None or registry.name not in self.pools:
            return None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            for (name, _, credential), (token, _) in self._tokens.items():
                if name == registry.name and token == value and credential.startswith(OPERATOR):
                    return credential.removeprefix(OPERATOR + ":")
            return None
        for pair in registry.credentials:
            if authorization == basic(registry, pair.username):
                return pair.username
        return None

    def credential_answered(
        self, registry: RegistryConfig, username: str, response: httpx.Response
    ) -> CredentialState | None:
        """Record the registry's answer to a request made with `username`'s credential
        (429, `ratelimit-*`): a spent credential rests until its window passes."""
        pool = self.pools.get(registry.name)
        if pool is None:
            return None
        retry = response.headers.get("retry-after")
        return pool.answered(
            username,
            trio.current_time(),
            status=response.status_code,
            budget=ratelimit.parse((k.lower(), v) for k, v in response.headers.multi_items()),
            retry_after=ratelimit.retry_after(retry) if retry is not None else None,
        )

    def may_retry_elsewhere(self, registry: RegistryConfig, tried: Sequence[str]) -> bool:
        """Whether another operator credential, not yet `tried`, is not resting."""
        pool = self.pools.get(registry.name)
        return pool is not None and pool.has_ready(trio.current_time(), tried)

    def __len__(self) -> int:
        return len(self._tokens)

    async def pull_token(
        self,
        registry: RegistryConfig,
        names: Sequence[str],
        *,
        operator: bool,
        username: str | None = None,
    ) -> str | None:
        """A token from `registry`'s token service that may pull `names`.

        `operator`: ask with the operator's Basic credentials when they are configured
        (`username`'s, else the pool's next: `choose_credential`); otherwise
        anonymously. No names: a token for the base endpoint (`/v2/`).

        Returns:
            The token, or None when the registry wants no Bearer token.

        Raises:
            TokenRefused: the token service answered 401 or 403.
            UpstreamError: the token service could not be asked (504 for a timeout), or
                answered something other than a token, or announced a realm that is not
                an http(s) URL (502).
        """
        credential = ANONYMOUS
        if operator and registry.has_credentials:
            username = username or self.choose_credential(registry)
            credential = f"{OPERATOR}:{username}"
        keys = [(registry.name, name, credential) for name in (sorted(set(names)) or [""])]
        now = trio.current_time()
        cached = {self._tokens.get(key) for key in keys}
        if len(cached) == 1 and (known := cached.pop()) is not None and known[1] > now:
            for key in keys:
                self._tokens.move_to_end(key)
            return known[0]
        challenge = await self.upstream.challenge(registry)
        if challenge is None or not challenge.realm:
            return None
        params = pull_params(challenge, names)
        headers: list[tuple[str, str]] = [("user-agent", USER_AGENT)]
        if credential != ANONYMOUS:
            headers.append(("authorization", basic(registry, username)))
        what = f"{registry.name} token"
        request = UpstreamRequest("GET", _url(what, challenge.realm, params), tuple(headers))
        async with self.upstream.open(request, what=what, registry=registry.name) as response:
            body = await read_body(response, what=what, limit=MAX_TOKEN_ANSWER_BYTES)
        try:
            answer = _answer(what, response.status_code, body)
        except UpstreamError as exc:  # the client sees a 502; the operator, why
            log.warning("%s", exc.message)
            raise
        until = now + max(1.0, answer.expires_in - TOKEN_MARGIN)
        for key in keys:
            self._tokens[key] = (answer.token, until)
            self._tokens.move_to_end(key)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)  # expired or not: the least used
        return answer.token

    def forget(self, registry: str, names: Sequence[str], *, anonymous_only: bool = False) -> None:
        """Drop the tokens kept for `names` (any credential, or only the anonymous one):
        the upstream refused one."""
        dropped = set(names or [""])
        for key in [k for k in self._tokens if k[0] == registry and k[1] in dropped]:
            if not anonymous_only or key[2] == ANONYMOUS:
                del self._tokens[key]

    async def relay_request(
        self,
        registry: RegistryConfig,
        challenge: auth.Challenge,
        method: str,
        params: Sequence[tuple[str, str]],
        headers: Headers,
        *,
        answered: Callable[[httpx.Response], None] | None = None,
    ) -> TokenRelayed:
        """Pass a client's token request (GET, or the OAuth2 POST form) to the realm.

        `params` and `headers` go as given (the caller chose them); the answer comes
        back whole and as sent (raw), at most `MAX_TOKEN_ANSWER_BYTES`, so a token
        service that fails mid-body is a clean 504 or 502, not a 200 cut short.
        `answered` sees the response head before its body is read.

        Raises:
            UpstreamError: the token service could not be asked, or its realm is not an
                http(s) URL.
        """
        what = f"{registry.name} token"
        content = None
        if method == "POST":
            content, form_type = auth.token_form(params)
            url = _url(what, challenge.realm or "", ())
            headers = (*headers, form_type)
        else:
            url = _url(what, challenge.realm or "", params)
        request = UpstreamRequest(method, url, tuple(headers))
        async with self.upstream.open(
            request, what=what, content=content, registry=registry.name
        ) as response:
            if answered is not None:
                answered(response)
            body = await read_body(response, what=what, limit=MAX_TOKEN_ANSWER_BYTES, raw=True)
        return TokenRelayed(response.status_code, tuple(response.headers.multi_items()), body)


def fetch_token_blocking(
    client: httpx.Client,
    challenge: auth.Challenge,
    scopes: Sequence[str],
    credentials: tuple[str, str] | None = None,
) -> str:
    """A token from `challenge`'s realm for `scopes`, over a blocking client (the CLI
    tools that talk to a relay as its clients do). Logs nothing: the caller prints
    the error.

    Raises:
        TokenRefused: the token service answered 401 or 403.
        UpstreamError: the realm is not an http(s) URL, could not be reached, timed
            out, or answered something other than a token.
    """
    params = [("service", challenge.service)] if challenge.service else []
    params += [("scope", scope) for scope in scopes]
    url = _url("token service", challenge.realm or "", params)
    what = f"token service at {challenge.realm}"
    body = bytearray()
    with (
        map_httpx_errors(what, quiet=True),
        client.stream("GET", url, auth=credentials) as response,
    ):
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_TOKEN_ANSWER_BYTES:
                raise UpstreamProtocolError(f"{what}: answer over {MAX_TOKEN_ANSWER_BYTES} bytes")
    return _answer(what, response.status_code, bytes(body), quote=True).token


def pull_params(challenge: auth.Challenge, names: Sequence[str]) -> list[tuple[str, str]]:
    """A token request's query for pulling `names` (no names: the base endpoint)."""
    params = [("service", challenge.service)] if challenge.service else []
    return params + [("scope", f"repository:{name}:pull") for name in sorted(set(names))]


def _url(what: str, realm: str, params: Sequence[tuple[str, str]]) -> str:
    try:
        return auth.token_url(realm, params)
    except ValueError as exc:
        raise UpstreamProtocolError(f"{what}: {exc}") from None


def _answer(what: str, status: int, body: bytes, *, quote: bool = False) -> auth.TokenAnswer:
    """The token in a token service's answer; `quote`: errors quote its message.

    Raises:
        TokenRefused, UpstreamProtocolError: with `detail` {"status": status}.
    """
    said = f": {_said(body)}" if quote and status != 200 else ""
    if status in (401, 403):
        raise TokenRefused(f"{what}: refused ({status}){said}", detail={"status": status})
    if status != 200:
        raise UpstreamProtocolError(f"{what}: answered {status}{said}", detail={"status": status})
    try:
        return auth.parse_token_answer(body)
    except ValueError as exc:
        raise UpstreamProtocolError(f"{what}: {exc}", detail={"status": status}) from None


def _said(body: bytes) -> str:
    """An error answer's message (an OCI error's, else its text), short, on one line."""
    text = body[:2000].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, LookupError, TypeError):
        text = str(json.loads(text)["errors"][0]["message"])
    return " ".join(text.split())[:200]


def basic(registry: RegistryConfig, username: str | None = None) -> str:
    """The operator's Basic credentials for `registry` (configured: the caller checked):
    `username`'s, or the first configured."""
    credential = next(c for c in registry.credentials if username in (None, c.username))
    pair = f"{credential.username}:{credential.password.reveal()}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


__all__ = ["TokenClient", "TokenRefused", "TokenRelayed", "basic", "fetch_token_blocking"]
