"""AWS Signature Version 4 for S3: signed request headers and presigned GET URLs.

Pure computation (hashlib, hmac): the clock is an argument. The rules are those of
"Signature Version 4 signing process" and "Authenticating Requests: Using Query Parameters"
in the S3 API reference; tests check the documented examples.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    import datetime

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_PRESIGN_SECONDS = 7 * 86400  # S3's own limit on X-Amz-Expires


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    region: str

    def __repr__(self) -> str:  # never the secret, whatever prints this
        return f"Credentials(access_key={self.access_key!r}, secret_key='***')"


def _uri_encode(text: str, *, slash: bool) -> str:
    # "URI-encode each byte ... except the unreserved characters A-Z a-z 0-9 - _ . ~";
    # the path keeps its '/', a query key or value encodes it.
    return quote(text, safe="-_.~/" if slash else "-_.~")


def _stamps(now: datetime.datetime) -> tuple[str, str]:
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    return amz_date, amz_date[:8]


def _scope(date: str, region: str) -> str:
    return f"{date}/{region}/s3/aws4_request"


def _signing_key(secret: str, date: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _canonical_query(params: list[tuple[str, str]]) -> str:
    encoded = sorted((_uri_encode(k, slash=False), _uri_encode(v, slash=False)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _signature(
    creds: Credentials,
    method: str,
    path: str,
    query: list[tuple[str, str]],
    headers: dict[str, str],
    payload_hash: str,
    amz_date: str,
) -> tuple[str, str]:
    """(signed header names, hex signature) of one request."""
    names = sorted(headers)
    canonical = "\n".join(
        [
            method,
            _uri_encode(path or "/", slash=True),
            _canonical_query(query),
            "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in names),
            ";".join(names),
            payload_hash,
        ]
    )
    date = amz_date[:8]
    to_sign = "\n".join(
        [
            ALGORITHM,
            amz_date,
            _scope(date, creds.region),
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = _signing_key(creds.secret_key, date, creds.region)
    return ";".join(names), hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign_headers(
    creds: Credentials,
    method: str,
    url: str,
    headers: dict[str, str],
    payload_hash: str,
    now: datetime.datetime,
) -> dict[str, str]:
    """The headers to send: `headers` (lower-case names) plus host, date, payload hash
    and `Authorization`. `url`'s path must be unencoded; its query is signed as given."""
    parts = urlsplit(url)
    amz_date, date = _stamps(now)
    signed = {k.lower(): v for k, v in headers.items()}
    signed["host"] = parts.netloc
    signed["x-amz-date"] = amz_date
    signed["x-amz-content-sha256"] = payload_hash
    query = _split_query(parts.query)
    names, signature = _signature(creds, method, parts.path, query, signed, payload_hash, amz_date)
    signed["authorization"] = (
        f"{ALGORITHM} Credential={creds.access_key}/{_scope(date, creds.region)}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return signed


def presign_get(creds: Credentials, url: str, expires: int, now: datetime.datetime) -> str:
    """A URL that GETs one object until `expires` seconds after `now`, with no other
    credential: the signature covers the method, the path and the host only."""
    if not 1 <= expires <= MAX_PRESIGN_SECONDS:
        raise ValueError(f"expiry must be 1..{MAX_PRESIGN_SECONDS} seconds")
    parts = urlsplit(url)
    amz_date, date = _stamps(now)
    query = [
        *_split_query(parts.query),
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", f"{creds.access_key}/{_scope(date, creds.region)}"),
        ("X-Amz-Date", amz_date),
        ("X-Amz-Expires", str(expires)),
        ("X-Amz-SignedHeaders", "host"),
    ]
    _, signature = _signature(
        creds, "GET", parts.path, query, {"host": parts.netloc}, UNSIGNED, amz_date
    )
    path = _uri_encode(parts.path or "/", slash=True)
    return (
        f"{parts.scheme}://{parts.netloc}{path}?{_canonical_query(query)}"
        f"&X-Amz-Signature={signature}"
    )


def _split_query(query: str) -> list[tuple[str, str]]:
    """`a=1&b` to pairs, undone from percent-encoding (they are encoded again to sign)."""
    pairs = []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs
