"""Spec grammar: repository names, tags, digests and HTTP auth-params.

Each pattern quotes the rule it implements. Names and references are checked
here before anything is sent upstream, so a malformed path never leaves the relay.
"""

from __future__ import annotations

import ipaddress
import re

# OCI distribution-spec, "Pulling manifests":
#   <name> MUST match [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
# Distribution additionally caps the whole name at 255 characters.
PATH_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*")
NAME_MAX_LENGTH = 255

# OCI distribution-spec: <reference> as a tag MUST match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")

# OCI image-spec, "Digests":
#   digest    ::= algorithm ":" encoded
#   algorithm ::= algorithm-component (algorithm-separator algorithm-component)*
#   algorithm-component ::= [a-z0-9]+ ; algorithm-separator ::= [+._-]
#   encoded   ::= [a-zA-Z0-9=_-]+
# and for the registered algorithms: sha256 is [a-f0-9]{64}, sha512 is [a-f0-9]{128}.
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
REGISTERED_DIGESTS = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}

# RFC 9110 §5.6.2: token = 1*tchar
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# RFC 9110 §5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE
QUOTED_STRING = r'"(?:[^"\\]|\\.)*"'
# RFC 9110 §11.2: auth-param = token BWS "=" BWS ( token / quoted-string )
AUTH_PARAM_RE = re.compile(rf"\s*({TOKEN})\s*=\s*({TOKEN}|{QUOTED_STRING})\s*(?:,|$)")
# RFC 9110 §11.1: auth-scheme = token
AUTH_SCHEME_RE = re.compile(rf"\s*({TOKEN})(?:\s+|$)")


def is_valid_name(name: str) -> bool:
    """Whether `name` is a repository name the OCI spec allows."""
    return len(name) <= NAME_MAX_LENGTH and NAME_RE.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    """Whether `tag` is a tag the OCI spec allows."""
    return TAG_RE.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    """Whether `digest` is well formed and, for sha256/sha512, of the right length."""
    if DIGEST_RE.fullmatch(digest) is None:
        return False
    algorithm, _, encoded = digest.partition(":")
    pattern = REGISTERED_DIGESTS.get(algorithm)
    return pattern is None or pattern.fullmatch(encoded) is not None


def quote_string(value: str) -> str:
    """Format `value` as an RFC 9110 quoted-string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def unquote_string(value: str) -> str:
    """Undo `quote_string`; a bare token is returned as it is."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


# A DNS name as redirect targets may carry one (RFC 1123 labels, already IDNA-encoded:
# `xn--...` ASCII); anything else in a host (a backslash, a space, `%`) is never resolved.
_HOST_LABEL_RE = re.compile(r"(?!-)[a-zA-Z0-9-]{1,63}(?<!-)")


def is_valid_hostname(host: str) -> bool:
    """An IP literal or an LDH DNS name of at most 253 characters (a trailing dot allowed)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL_RE.fullmatch(x) for x in name.split("."))
