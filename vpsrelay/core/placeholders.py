"""The placeholders an open relay's `/token` hands out instead of upstream tokens.

For a registry that needs no token (`anonymous`), and for one the relay holds the
operator's credentials for (the relay then attaches its own token upstream, which never
reaches the client). A placeholder is never sent upstream.
"""

from __future__ import annotations

import json

from vpsrelay.core import headers as header_policy

ANONYMOUS_PLACEHOLDER = "anonymous"
OPERATOR_PLACEHOLDER = "vpsrelay-relay-credentials"
PLACEHOLDER_TOKEN_SECONDS = 300


def placeholder_reply(operator_credentials: bool) -> bytes:
    """The `/token` answer: the operator placeholder when the relay holds credentials."""
    token = OPERATOR_PLACEHOLDER if operator_credentials else ANONYMOUS_PLACEHOLDER
    reply: dict[str, object] = {"token": token, "access_token": token}
    if operator_credentials:
        reply["expires_in"] = PLACEHOLDER_TOKEN_SECONDS
    return json.dumps(reply).encode()


def is_placeholder(authorization: str) -> bool:
    """Whether an `Authorization` value is one of the relay's placeholders."""
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and value.strip() in (
        ANONYMOUS_PLACEHOLDER, OPERATOR_PLACEHOLDER,
    )  # fmt: skip


def has_own_credentials(
    method: str, params: list[tuple[str, str]], headers: header_policy.Headers
) -> bool:
    """Whether a token request carries the client's own credentials (Basic or Bearer, or
    the OAuth2 form's password or refresh token), not just a placeholder of ours."""
    if method == "POST":
        return any(k in ("password", "refresh_token") and v for k, v in params)
    authorization = header_policy.get(headers, "authorization")
    return authorization is not None and not is_placeholder(authorization)


def without_placeholder(headers: header_policy.Headers) -> header_policy.Headers:
    """`headers` without `Authorization` when one of them is a placeholder."""
    if any(k == "authorization" and is_placeholder(v) for k, v in headers):
        return tuple((k, v) for k, v in headers if k != "authorization")
    return headers
