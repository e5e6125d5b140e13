"""Structured log lines: logfmt and JSON rendering, and scrubbing of secrets.

An access-log line is an ordered list of `(key, value)` fields. logfmt quotes a
value unless it is made only of safe characters, so `path="/v2/x"` is quoted and
`status=200` is not; None values are left out of logfmt and are `null` in JSON.

`redact` is the last line of defence: whatever a message says, credentials in
the shapes they travel in (`Authorization: Bearer ...`, `Basic ...`, JWTs,
`password=`, `token=` parameters) never reach a log file.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

Field = tuple[str, object]

_PLAIN = re.compile(r"[A-Za-z0-9_.:@+\-]+")
REDACTED = "[redacted]"
_SECRETS = (
    # Authorization schemes with their credentials.
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}"),
    # JSON Web Tokens (three base64url parts, the first a JSON header `eyJ...`).
    re.compile(r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),
    # key=value and "key": "value" for secret-bearing keys.
    re.compile(
        r"(?i)((?:password|passwd|secret|token|access_token|refresh_token|authorization)"
        r"\"?\s*[=:]\s*\"?)[^\s\"&,;]+"
    ),
)


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by `[redacted]`."""
    text = _SECRETS[0].sub(lambda m: f"{m[1]} {REDACTED}", text)
    text = _SECRETS[1].sub(REDACTED, text)
    return _SECRETS[2].sub(lambda m: f"{m[1]}{REDACTED}", text)


def _logfmt_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def logfmt(fields: Iterable[Field]) -> str:
    """`key=value key="quoted value"`; fields whose value is None are left out."""
    return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields if value is not None)


def as_json(fields: Iterable[Field]) -> str:
    """One JSON object, keys in the given order."""
    return json.dumps(dict(fields), ensure_ascii=False, separators=(",", ":"))
