"""Issue 12, findings 2 and 8, and follow-ups 2, 5 and 6: tokens the relay hands out.

Finding 2: on an open relay with the operator's credentials for Docker Hub, `/token` passed
the client's scopes (`push,pull,delete`) and `offline_token=true` to the token service with
the operator's Basic credentials, and handed the client the operator's push token and
refresh token, even for a repository the deny list refuses. Here the token server grants
push to alice (the operator) as Docker Hub grants it to an account's owner, and every token
the relay hands out is tried directly against the upstream: starting a blob upload must fail.

Finding 8: a refresh token outlived the pull token (or the password) that earned it, and
the pull tokens file was read once. Here the credential changes on disk, without a
restart, and the refresh token must stop working.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess
from vpsrelay.access.clientauth import add_user

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ESCALATION = "push,pull,delete"
TIMEOUT = 20.0
# The relay looks at its users and pull tokens files about once a second.
RELOAD_WAIT = 10.0


def _secret(hub: Hub) -> BuiltImage:
    image = hub.images["private/secret:1.0"]
    assert isinstance(image, BuiltImage)
    return image


@pytest.fixture
def operator_relay(clean_hub: Hub, tmp_path: Path) -> Iterator[RelayProcess]:
    """An open relay with the operator's (alice's) Docker Hub credentials; `someuser/*` denied."""
    user, password = clean_hub.creds
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[registries."docker.io"]\nusername = "{user}"\npassword = "{password}"\n'
        'deny = ["someuser/*"]\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={clean_hub.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay:
        yield relay


@pytest.fixture
def operator_can_push(clean_hub: Hub) -> Iterator[None]:
    """The operator's account may push and delete upstream (it is an account owner)."""
    user, _ = clean_hub.creds
    clean_hub.tokens.push_users.add(user)
    try:
        yield
    finally:
        clean_hub.tokens.push_users.discard(user)


def _claims(token: str) -> dict[str, Any] | None:
    """The claims of an upstream JWT (None for a relay placeholder, which is no JWT)."""
    if token.count(".") != 2:
        return None
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _start_upload(hub: Hub, repository: str, token: str) -> int:
    """Use a token directly against the upstream, as an attacker would: start a blob upload."""
    response = httpx.post(
        f"{hub.registry_url}/v2/{repository}/blobs/uploads/",
        headers={"authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )
    return response.status_code


def _assert_pull_only(hub: Hub, reply: httpx.Response, repository: str, user: str) -> str:
    """The token in `reply` cannot push `repository` upstream, and no refresh token came."""
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "refresh_token" not in body, f"a refresh token left the relay: {sorted(body)}"
    token = body.get("token") or body.get("access_token")
    assert isinstance(token, str)
    claims = _claims(token)
    if claims is not None:
        assert claims["sub"] != user, "a token minted with the operator's credentials"
        actions = {a for entry in claims["access"] for a in entry["actions"]}
        assert actions <= {"pull"}, f"the relay handed out a token with {sorted(actions)}"
    status = _start_upload(hub, repository, token)
    assert status == 401, f"the token the relay handed out started an upload upstream: {status}"
    return token


@pytest.mark.usefixtures("operator_can_push")
def test_anonymous_token_request_never_gets_the_operators_push_or_refresh_token(
    operator_relay: RelayProcess, clean_hub: Hub
) -> None:
    user, _ = clean_hub.creds
    # The upstream does grant the operator push: the attack would work if the relay let it.
    direct, _ = clean_hub.tokens.issue(user, clean_hub.service, [f"repository:x/y:{ESCALATION}"])
    assert _start_upload(clean_hub, "x/y", direct) == 202
    clean_hub.tokens.clear()

    image = _secret(clean_hub)
    for repository in ("private/secret", "someuser/tool"):  # the second one is deny-listed
        for method in ("GET", "POST"):
            params = {
                "service": clean_hub.service,
                "scope": f"repository:{repository}:{ESCALATION}",
                "offline_token": "true",
                "access_type": "offline",
                "grant_type": "refresh_token",
                "refresh_token": "",
            }
            if method == "GET":
                reply = httpx.get(f"{operator_relay.url}/token", params=params, timeout=TIMEOUT)
            else:
                reply = httpx.post(f"{operator_relay.url}/token", data=params, timeout=TIMEOUT)
            _assert_pull_only(clean_hub, reply, repository, user)

    # What the relay itself asked the token service for: pull, never a refresh token.
    for request in clean_hub.tokens.requests():
        text = request.path + request.body.decode()
        assert "push" not in text, text
        assert "delete" not in text, text
        assert "offline" not in text, text
        assert "someuser" not in text, f"a token for a deny-listed repository: {text}"

    # The anonymous client still pulls the operator's private image through the relay ...
    reply = httpx.get(
        f"{operator_relay.url}/token",
        params={"service": clean_hub.service, "scope": "repository:private/secret:pull"},
        timeout=TIMEOUT,
    )
    token = _assert_pull_only(clean_hub, reply, "private/secret", user)
    bearer = {"authorization": f"Bearer {token}", "accept": image.manifest_media_type}
    manifest = httpx.get(
        f"{operator_relay.url}/v2/private/secret/manifests/1.0", headers=bearer, timeout=TIMEOUT
    )
    assert manifest.status_code == 200, manifest.text
    assert manifest.content == image.manifest_bytes
    layer = image.layers[0]
    blob = httpx.get(
        f"{operator_relay.url}/v2/private/secret/blobs/{layer.digest}",
        headers=bearer,
        timeout=TIMEOUT,
    )
    assert blob.status_code == 200
    assert len(blob.content) == layer.size
    # ... but not a deny-listed one.
    denied = httpx.get(
        f"{operator_relay.url}/v2/someuser/tool/manifests/1.0", headers=bearer, timeout=TIMEOUT
    )
    assert denied.status_code == 403
    assert "wonderland" not in operator_relay.log_text()


@pytest.mark.usefixtures("operator_can_push")
def test_a_clients_own_credentials_get_pull_only_tokens(
    operator_relay: RelayProcess, clean_hub: Hub
) -> None:
    """docker login through the relay: the client's own account, but still pull only. Its
    refresh token is its own (the client holds the password it stands for)."""
    user, password = clean_hub.creds
    params = {
        "service": clean_hub.service,
        "scope": f"repository:private/secret:{ESCALATION}",
        "offline_token": "true",
    }
    reply = httpx.get(
        f"{operator_relay.url}/token", params=params, auth=(user, password), timeout=TIMEOUT
    )
    assert reply.status_code == 200, reply.text
    token = reply.json()["token"]
    claims = _claims(token)
    assert claims is not None
    assert {a for entry in claims["access"] for a in entry["actions"]} == {"pull"}
    assert _start_upload(clean_hub, "private/secret", token) == 401
    refresh = reply.json()["refresh_token"]  # the client's own: passed on
    renewed = httpx.post(
        f"{operator_relay.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh,
              "service": clean_hub.service, "scope": f"repository:private/secret:{ESCALATION}"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert renewed.status_code == 200, renewed.text
    renewed_token = renewed.json()["access_token"]
    renewed_claims = _claims(renewed_token)
    assert renewed_claims is not None
    assert {a for entry in renewed_claims["access"] for a in entry["actions"]} == {"pull"}
    assert _start_upload(clean_hub, "private/secret", renewed_token) == 401
    # The form went upstream without the operator's Basic credentials.
    posts = [r for r in clean_hub.tokens.requests() if r.method == "POST"]
    assert posts
    assert all(r.header("authorization") is None for r in posts)


# --- finding 8: refresh tokens end with the credential that earned them -----------------


PULL_TOKEN = "ci-pull-token-0123456789abcdef"
OTHER_PULL_TOKEN = "other-pull-token-fedcba9876543210"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def auth_files(tmp_path: Path) -> tuple[Path, Path]:
    users = tmp_path / "htpasswd"
    for name in ("alice", "bob"):
        add_user(users, name, f"{PASSWORD}-{name}")
    pull_tokens = tmp_path / "pull-tokens"
    pull_tokens.write_text(f"{PULL_TOKEN}\n{OTHER_PULL_TOKEN}\n")
    return users, pull_tokens


@pytest.fixture
def auth_relay(
    clean_hub: Hub, tmp_path: Path, auth_files: tuple[Path, Path]
) -> Iterator[RelayProcess]:
    users, pull_tokens = auth_files
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[auth]\nenabled = true\nusers_file = "{users}"\npull_tokens_file = "{pull_tokens}"\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={clean_hub.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay:
        yield relay


def _login(relay: RelayProcess, user: str, password: str) -> str:
    form = {"grant_type": "password", "username": user, "password": password,
            "access_type": "offline", "service": "vpsrelay",
            "scope": "repository:alpine:pull"}  # fmt: skip
    reply = httpx.post(f"{relay.url}/token", data=form, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["refresh_token"])


def _refresh(relay: RelayProcess, refresh_token: str) -> httpx.Response:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
            "service": "vpsrelay", "scope": "repository:alpine:pull"}  # fmt: skip
    return httpx.post(f"{relay.url}/token", data=form, timeout=TIMEOUT)


def _refresh_until_refused(relay: RelayProcess, refresh_token: str) -> httpx.Response:
    """Refresh (bounded: RELOAD_WAIT seconds, 0.25 s apart) until the relay refuses."""
    deadline = time.monotonic() + RELOAD_WAIT
    reply = _refresh(relay, refresh_token)
    for _ in range(int(RELOAD_WAIT / 0.25) + 1):
        if reply.status_code != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
        reply = _refresh(relay, refresh_token)
    return reply


def test_a_refresh_token_ends_with_the_pull_token_that_earned_it(
    auth_relay: RelayProcess, auth_files: tuple[Path, Path]
) -> None:
    _, pull_tokens = auth_files
    revoked = _login(auth_relay, "ci", PULL_TOKEN)
    kept = _login(auth_relay, "ci", OTHER_PULL_TOKEN)
    assert _refresh(auth_relay, revoked).status_code == 200

    pull_tokens.write_text(f"{OTHER_PULL_TOKEN}\n")  # revoked on disk, no restart
    refused = _refresh_until_refused(auth_relay, revoked)
    assert refused.status_code == 401, f"revoked pull token still refreshes: {refused.text}"
    assert refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
    # The pull token itself is refused too, as a password and as a Bearer token.
    login = httpx.get(f"{auth_relay.url}/token", auth=("ci", PULL_TOKEN), timeout=TIMEOUT)
    assert login.status_code == 401
    bearer = {"authorization": f"Bearer {PULL_TOKEN}", "accept": OCI_MANIFEST}
    direct = httpx.get(
        f"{auth_relay.url}/v2/alpine/manifests/latest", headers=bearer, timeout=TIMEOUT
    )
    assert direct.status_code == 401
    # The other pull token and what it earned are untouched.
    assert _refresh(auth_relay, kept).status_code == 200


def test_a_refresh_token_ends_when_the_users_password_changes(
    auth_relay: RelayProcess, auth_files: tuple[Path, Path]
) -> None:
    users, _ = auth_files
    alice = _login(auth_relay, "alice", f"{PASSWORD}-alice")
    bob = _login(auth_relay, "bob", f"{PASSWORD}-bob")
    assert _refresh(auth_relay, alice).status_code == 200

    add_user(users, "alice", "a new password")  # `vpsrelay user add`, no restart
    refused = _refresh_until_refused(auth_relay, alice)
    assert refused.status_code == 401, f"old password's refresh token still works: {refused.text}"
    assert _refresh(auth_relay, bob).status_code == 200
    renewed = _login(auth_relay, "alice", "a new password")
    assert _refresh(auth_relay, renewed).status_code == 200


# --- follow-ups 2 and 5: anonymous scopes cost the operator nothing ---------------------


FORMS = 30
SCOPES_PER_FORM = 1000


def _operator_token_requests(hub: Hub) -> int:
    """Token requests the relay made with the operator's Basic credentials."""
    user, password = hub.creds
    operator = httpx.BasicAuth(user, password)._auth_header
    return sum(1 for r in hub.tokens.requests() if r.header("authorization") == operator)


def test_anonymous_scopes_make_no_token_requests_with_the_operators_credentials(
    operator_relay: RelayProcess, clean_hub: Hub
) -> None:
    """Follow-up 2: 30 anonymous POST /token forms with 1,000 random scopes each made 30
    token requests with the operator's credentials (and 30,000 cached tokens)."""
    statuses = []
    with httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(FORMS):
            scopes = " ".join(
                f"repository:x{secrets.token_hex(6)}/y:pull" for _ in range(SCOPES_PER_FORM)
            )
            form = {"grant_type": "refresh_token", "refresh_token": "", "scope": scopes,
                    "service": clean_hub.service}  # fmt: skip
            reply = client.post(f"{operator_relay.url}/token", data=form)
            statuses.append(reply.status_code)
            assert reply.headers["content-type"] == "application/json"
        # A real client's few scopes get a placeholder, and still cost nothing upstream.
        few = [f"repository:x{secrets.token_hex(6)}/y:pull" for _ in range(3)]
        placeholder = client.get(f"{operator_relay.url}/token", params={"scope": few})
    made = _operator_token_requests(clean_hub)
    print(f"{FORMS} forms of {SCOPES_PER_FORM} scopes: {set(statuses)}; operator token "
          f"requests: {made}")  # fmt: skip
    assert set(statuses) == {400}, f"forms of {SCOPES_PER_FORM} scopes were answered: {statuses}"
    assert placeholder.status_code == 200, placeholder.text
    assert made == 0, f"{made} token requests with the operator's credentials for anonymous scopes"
    assert operator_relay.process.poll() is None


def test_a_token_request_too_long_for_a_url_is_a_clean_4xx(
    operator_relay: RelayProcess, clean_hub: Hub
) -> None:
    """Follow-up 5: ~2,000 scopes made the relay build a token URL over 64 KiB; httpx's
    InvalidURL escaped as a 500 with a traceback."""
    # Short names, each made longer upstream (`library/`): the form fits the relay's body
    # limit, the token service URL they would make does not fit httpx's.
    scopes = " ".join(f"repository:r{n}:pull" for n in range(2000))
    form = {"grant_type": "refresh_token", "refresh_token": "", "scope": scopes}
    assert len(urlencode(form)) < 64 * 1024
    reply = httpx.post(f"{operator_relay.url}/token", data=form, timeout=TIMEOUT)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["errors"][0]["code"]
    assert "Traceback" not in operator_relay.log_text()
    assert operator_relay.process.poll() is None


# --- follow-up 6: an open relay forgets an operator token the upstream refused ------------


def test_an_operator_token_the_upstream_refused_is_not_used_again(
    operator_relay: RelayProcess, clean_hub: Hub
) -> None:
    """The token service mints one token the registry refuses (wrong issuer, as a revoked
    or re-scoped token would be); the relay must fetch a new one on the next pull instead
    of reusing the refused one until it expires."""
    image = _secret(clean_hub)
    headers = {"accept": image.manifest_media_type}
    url = f"{operator_relay.url}/v2/private/secret/manifests/1.0"
    with httpx.Client(timeout=TIMEOUT) as client:
        issuer = clean_hub.tokens.issuer
        clean_hub.tokens.issuer = "not-the-registrys-issuer"
        try:
            token = client.get(
                f"{operator_relay.url}/token", params={"scope": "repository:private/secret:pull"}
            ).json()["token"]
            headers["authorization"] = f"Bearer {token}"
            refused = client.get(url, headers=headers)
        finally:
            clean_hub.tokens.issuer = issuer
        assert refused.status_code == 401, refused.text
        statuses = [client.get(url, headers=headers).status_code for _ in range(3)]
    made = _operator_token_requests(clean_hub)
    print(f"after the refused token: {statuses}; operator token requests: {made}")
    assert statuses == [200, 200, 200], f"the refused token was used again: {statuses}"
    # The refused token, the one fresh token the relay fetched at once (refused too: the
    # issuer was still wrong), then its replacement on the next pull.
    assert made == 3
