"""The bucket's request signatures (AWS Signature Version 4), made by botocore.

botocore is AWS's own signer: `S3SigV4Auth` for a request's headers, `S3SigV4QueryAuth`
for a presigned GET URL, on an `AWSRequest` built here. Only that: no botocore session,
service model or HTTP client; signing is pure computation, so it runs inside Trio, and
httpx sends what this returns. The secret stays a `Secret` until the moment it signs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit, urlunsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode, percent_encode_sequence

if TYPE_CHECKING:
    from collections.abc import Mapping

    from vpsrelay.registry_config import Secret

MAX_PRESIGN_SECONDS = 7 * 86400  # S3's own limit on X-Amz-Expires


def wire_url(url: str) -> str:
    """`url` as sent and signed: its path (taken unencoded) and its query's keys and values
    (encoded or not) percent-encoded once, the way botocore's S3 serializer encodes them;
    S3 signs the path as sent, unnormalised."""
    parts = urlsplit(url)
    pairs = []
    for item in parts.query.split("&") if parts.query else []:
        key, _, value = item.partition("=")
        pairs.append((unquote(key), unquote(value)))
    path: str = percent_encode(parts.path or "/", safe="/~")
    query: str = percent_encode_sequence(pairs)
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs requests to S3 with one key pair in one region (its repr shows no secret)."""

    access_key: str
    secret_key: Secret
    region: str

    def _credentials(self) -> Credentials:
        return Credentials(self.access_key, self.secret_key.reveal())

    def sign(
        self, method: str, url: str, headers: Mapping[str, str] | None = None, body: bytes = b""
    ) -> tuple[str, dict[str, str]]:
        """(the URL to send, the headers to send): `headers` plus `x-amz-date`,
        `x-amz-content-sha256` (the body's SHA-256: every body here is in memory) and
        `authorization`, names in lower case. The host is signed as httpx sends it."""
        request = AWSRequest(method, wire_url(url), headers=dict(headers or {}), data=body)
        S3SigV4Auth(self._credentials(), "s3", self.region).add_auth(request)
        sent: dict[str, str] = {name.lower(): value for name, value in request.headers.items()}
        return str(request.url), sent

    def presign_get(self, url: str, expires: int) -> str:
        """A URL that GETs one object for `expires` seconds with no other credential: the
        signature covers the method, the path and the host (payload: `UNSIGNED-PAYLOAD`)."""
        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expiry must be 1..{MAX_PRESIGN_SECONDS} seconds")
        request = AWSRequest(method="GET", url=wire_url(url))
        auth = S3SigV4QueryAuth(self._credentials(), "s3", self.region, expires=expires)
        auth.add_auth(request)
        return str(request.url)
