"""The one error tree of vpsrelay; every error carries its HTTP meaning.

`code` values come from the Distribution/OCI error code set, so a client prints
them as it would print the registry's own. `app.py` renders a `RelayError` in
exactly one place; any other exception is a bug (logged, answered 500).
"""

from __future__ import annotations

import json
from typing import ClassVar


class RelayError(Exception):
    """Base class: an error with an HTTP status and an OCI error code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        detail: object = None,
        reason: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        # Why it was refused, one word for logs and counters (`ip_denied`, `rate_limited`).
        self.reason = reason or self.code.lower()
        # Extra response headers (`Retry-After`, `WWW-Authenticate`).
        self.headers = headers

    def to_registry_body(self) -> bytes:
        """Render the `{"errors": [...]}` body registries answer with."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class ConfigError(RelayError):
    """Bad configuration: the message names the file and the dotted key."""

    code = "CONFIG"


class ClientError(RelayError):
    status = 400


class NameInvalid(ClientError):
    code = "NAME_INVALID"


class NameUnknown(ClientError):
    status = 404
    code = "NAME_UNKNOWN"


class DigestInvalid(ClientError):
    code = "DIGEST_INVALID"


class ManifestUnknown(ClientError):
    """A manifest that does not exist: also one whose tag no registry can hold (a
    malformed tag), as the distribution spec answers for a nonexistent manifest."""

    status = 404
    code = "MANIFEST_UNKNOWN"


class TagInvalid(ClientError):
    """A tag that breaks the grammar where a name is typed, not looked up (`/download`);
    the registry API answers a malformed tag as a missing manifest (`ManifestUnknown`)."""

    code = "TAG_INVALID"


class Unsupported(ClientError):
    """A method or path a read-only mirror does not offer."""

    status = 405
    code = "UNSUPPORTED"


class NotFound(ClientError):
    status = 404
    code = "UNSUPPORTED"


class BadRequest(ClientError):
    """A request no registry client sends (a proxy's request target, too many headers)."""

    code = "UNSUPPORTED"


class Unauthorized(ClientError):
    """No credentials, or wrong ones, for a relay that requires them."""

    status = 401
    code = "UNAUTHORIZED"


class Denied(ClientError):
    """A policy refuses the request (IP, repository, User-Agent, redirect target)."""

    status = 403
    code = "DENIED"


class TooManyRequests(ClientError):
    """A rate, concurrency or traffic limit was reached; `Retry-After` says when to retry."""

    status = 429
    code = "TOOMANYREQUESTS"


class ClientTooSlow(ClientError):
    """The client accepted nothing of a response for `limits.send_timeout` seconds."""

    status = 408


class MisdirectedRequest(ClientError):
    """A Host the relay does not answer for (RFC 9110 §15.5.20)."""

    status = 421
    code = "DENIED"


class HeadersTooLarge(ClientError):
    status = 431
    code = "SIZE_INVALID"


class RequestTooLarge(ClientError):
    status = 413
    code = "SIZE_INVALID"


class UpstreamError(RelayError):
    status = 502
    code = "UNAVAILABLE"


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached (refused, DNS, TLS)."""


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamProtocolError(UpstreamError):
    """The upstream answered something a registry should not."""


class TokenRefused(UpstreamProtocolError):
    """The token service answered 401 or 403: it will not give these credentials (or
    anonymous callers) a token for these repositories."""


class TooManyRedirects(UpstreamError):
    pass


class RedirectRefused(UpstreamError):
    """A Location the relay will not follow (bad scheme, no host)."""


class DigestMismatch(UpstreamError):
    """The body did not hash to the digest it was asked for."""

    code = "DIGEST_INVALID"
