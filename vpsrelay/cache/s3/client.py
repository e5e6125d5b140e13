"""A small S3 client on httpx (Trio through anyio), signed by botocore (`signing`).

Only what the blob store needs: HEAD, streamed GET, PUT (with `If-None-Match: *` or
`If-Match`), DELETE, multipart uploads, listing and presigned GET URLs. Every failure is
an `S3Error` (a network error, a timeout, an unexpected status), which the store turns
into a pass-through; the credentials go into signatures only, never into a message.
"""

from __future__ import annotations

import contextlib
import datetime
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httpx
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from vpsrelay.cache.s3.signing import Signer

NS = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
# `timeout` is httpx's time without progress; a store that drips a byte now and then
# never reaches it, so every request also has a total deadline: `timeout` (at most
# CONTROL_SECONDS) plus the time its bytes take at MIN_RATE.
CONTROL_SECONDS = 10.0
MIN_RATE = 256 * 1024  # bytes per second
MAX_LISTING_BYTES = 8 * 1024 * 1024  # an answer to a listing is read whole: bounded
# Blob bodies stream through their own pool: a download holds its connection as long as
# its client reads (slowly, maybe on purpose), and must never starve the small requests
# (leases, records, probes) of theirs. Beyond the cap a blob passes the bucket by.
MAX_STREAMS = 64  # per process
STREAM_POOL_WAIT = 1.0  # seconds a blob GET waits for a free stream connection


class S3Busy(Exception):
    """Every stream connection of this process is in use: this blob passes the bucket by
    (local load, not the bucket failing)."""


class S3Error(Exception):
    """The bucket could not be used for this request (the message names no secret).

    The message (for the log) names the request; `summary` is what anyone may see in
    `/readyz`: a status, a store's error code of letters only, or the kind of failure,
    never a key, a digest, the bucket's name or text the store chose freely.
    """

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def summary(self) -> str:
        if self.reason:
            return self.reason
        if self.status is not None:
            return str(self.status)
        kind = str(self).rpartition(": ")[2]  # "GET <key>: ReadTimeout", "...: deadline"
        return kind if _plain_word(kind) else "bad answer"


def _plain_word(text: str) -> bool:
    """Letters only, 1 to 64 of them: an S3 error code (AccessDenied, SlowDown), an
    exception's name; never a key, a digest, a bucket name or a sentence."""
    return 0 < len(text) <= 64 and text.isascii() and text.isalpha()


@dataclass(frozen=True, slots=True)
class Answer:
    """A small answer, read whole."""

    status_code: int
    headers: httpx.Headers
    content: bytes


@dataclass(frozen=True, slots=True)
class Head:
    size: int
    etag: str
    last_modified: datetime.datetime | None
    date: datetime.datetime | None  # the store's clock when it answered


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    size: int
    last_modified: datetime.datetime | None


@dataclass(frozen=True, slots=True)
class Upload:
    key: str
    upload_id: str
    initiated: datetime.datetime | None


def _http_date(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def _iso_date(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _xml(content: bytes, what: str) -> ET.Element:
    """An answer's XML (bounded by `MAX_LISTING_BYTES`; expat refuses entity bombs)."""
    try:
        return ET.fromstring(content)
    except ET.ParseError:
        raise S3Error(f"{what}: a malformed answer") from None


class S3Client:
    """Requests to one bucket; path-style (`endpoint/bucket/key`) or virtual-host
    (`bucket.endpoint/key`) addressing."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        signer: Signer,
        *,
        virtual_host: bool = False,
        public_endpoint: str | None = None,
        verify: str | bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        self.signer = signer
        self._control = min(timeout, CONTROL_SECONDS)
        self._base = self._bucket_url(endpoint.rstrip("/"), virtual_host)
        self._public_base = self._bucket_url(
            (public_endpoint or endpoint).rstrip("/"), virtual_host
        )
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            verify=verify,
            trust_env=False,  # the bucket is reached as configured, never through a proxy
            follow_redirects=False,
        )
        self._streams = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0), pool=STREAM_POOL_WAIT),
            limits=httpx.Limits(max_connections=MAX_STREAMS, max_keepalive_connections=16),
            verify=verify,
            trust_env=False,
            follow_redirects=False,
        )

    def _bucket_url(self, endpoint: str, virtual_host: bool) -> str:
        if not virtual_host:
            return f"{endpoint}/{self.bucket}"
        parts = urlsplit(endpoint)
        return f"{parts.scheme}://{self.bucket}.{parts.netloc}{parts.path}"

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._streams.aclose()

    def url(self, key: str, query: str = "") -> str:
        return f"{self._base}/{key}" + (f"?{query}" if query else "")

    def presign(self, key: str, expires: int) -> str:
        """A GET-only URL for `key` on the public endpoint, valid `expires` seconds."""
        return self.signer.presign_get(f"{self._public_base}/{key}", expires)

    def _signed(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> httpx.Request:
        """The request as signed: the body's SHA-256 is signed too (bodies are in memory)."""
        wire, signed = self.signer.sign(method, url, headers, body)
        return httpx.Request(method, wire, headers=signed, content=body)

    async def _send(
        self, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> Answer:
        """One request whose answer is small: read whole, up to `MAX_LISTING_BYTES`."""
        request = self._signed(method, url, headers or {}, body)
        what = f"{method} {urlsplit(url).path}"
        with trio.move_on_after(self.deadline(len(body))) as scope:
            try:
                response = await self._client.send(request, stream=True)
                try:
                    content = bytearray()
                    async for chunk in response.aiter_raw():
                        content += chunk
                        if len(content) > MAX_LISTING_BYTES:
                            raise S3Error(f"{what}: answer too large")
                finally:
                    with trio.CancelScope(shield=True):
                        await response.aclose()
            except httpx.HTTPError as exc:
                raise S3Error(f"{what}: {type(exc).__name__}") from None
        if scope.cancelled_caught:
            raise S3Error(f"{what}: deadline")
        return Answer(response.status_code, response.headers, bytes(content))

    def deadline(self, size: int) -> float:
        """Seconds a request moving `size` bytes may take in all."""
        return self._control + size / MIN_RATE

    def _fail(self, what: str, response: Answer | httpx.Response) -> S3Error:
        code = ""
        with contextlib.suppress(ET.ParseError):
            if response.content:
                code = ET.fromstring(response.content[:4096]).findtext("Code") or ""
        if not _plain_word(code):
            code = ""  # the store's own text (newlines, names): neither logged nor shown
        summary = f"{response.status_code} {code}".strip()
        return S3Error(f"{what}: {summary}", response.status_code, summary)

    async def head(self, key: str) -> Head | None:
        """The object's size and times; None if there is none."""
        response = await self._send("HEAD", self.url(key))
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(f"HEAD {key}", response)
        length = response.headers.get("content-length", "")
        if not length.isdigit():
            raise S3Error(f"HEAD {key}: no length")
        return Head(
            int(length),
            response.headers.get("etag", ""),
            _http_date(response.headers.get("last-modified")),
            _http_date(response.headers.get("date")),
        )

    async def open_get(self, key: str, *, blob: bool = False) -> httpx.Response:
        """A streamed GET of `key`: the caller reads `aiter_raw()` and closes it. A `blob`
        body (read as long as a client reads) goes over the stream pool.

        Raises:
            S3Error: the bucket failed (`status` 404: no such object).
            S3Busy: `blob`, and all `MAX_STREAMS` stream connections are in use.
        """
        request = self._signed("GET", self.url(key), {})
        response = None
        with trio.move_on_after(self._control):  # its headers; the body is the caller's
            try:
                response = await (self._streams if blob else self._client).send(
                    request, stream=True
                )
            except httpx.PoolTimeout:
                raise S3Busy(f"GET {key}: {MAX_STREAMS} streams in use") from None
            except httpx.HTTPError as exc:
                raise S3Error(f"GET {key}: {type(exc).__name__}") from None
        if response is None:
            raise S3Error(f"GET {key}: deadline")
        if response.status_code == 200:
            return response
        await response.aclose()
        if response.status_code == 404:
            raise S3Error(f"GET {key}: gone", 404)
        raise S3Error(f"GET {key}: {response.status_code}", response.status_code)

    @contextlib.asynccontextmanager
    async def get(self, key: str) -> AsyncIterator[httpx.Response]:
        """`open_get` as a context manager."""
        response = await self.open_get(key)
        try:
            yield response
        finally:
            await response.aclose()

    async def get_small(self, key: str, limit: int) -> bytes | None:
        """A small object's bytes (at most `limit`); None if there is none."""
        found = await self.get_versioned(key, limit)
        return None if found is None else found[0]

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> bool:
        """Write `key`; False when a condition did not hold (412), else True."""
        return (
            await self.put_etag(
                key, body, if_none_match=if_none_match, if_match=if_match, content_type=content_type
            )
            is not None
        )

    async def put_etag(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str | None:
        """`put`, giving the ETag of what was written ("" if the store sent none), or
        None when a condition did not hold (412)."""
        headers = {"content-type": content_type}
        if if_none_match:
            headers["if-none-match"] = "*"
        if if_match is not None:
            headers["if-match"] = if_match
        response = await self._send("PUT", self.url(key), body, headers)
        if response.status_code == 412:
            return None
        if response.status_code != 200:
            raise self._fail(f"PUT {key}", response)
        return str(response.headers.get("etag", ""))

    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        """Delete `key`; False when `if_match` (an ETag) no longer held (412). A store
        that ignores `If-Match` on DELETE deletes anyway: callers look first too."""
        headers = {"if-match": if_match} if if_match is not None else None
        response = await self._send("DELETE", self.url(key), headers=headers)
        if response.status_code == 412:
            return False
        if response.status_code not in (200, 204, 404):
            raise self._fail(f"DELETE {key}", response)
        return True

    async def get_versioned(self, key: str, limit: int) -> tuple[bytes, str] | None:
        """A small object's bytes (at most `limit`) and its ETag, for a write
        conditional on it (`put(if_match=...)`); None if there is none."""
        try:
            with trio.fail_after(self.deadline(limit)):
                async with self.get(key) as response:
                    body = bytearray()
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > limit:
                            raise S3Error(f"GET {key}: larger than {limit} bytes")
                    return bytes(body), response.headers.get("etag", "")
        except trio.TooSlowError:
            raise S3Error(f"GET {key}: deadline") from None
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise
        except httpx.HTTPError as exc:
            raise S3Error(f"GET {key}: {type(exc).__name__}") from None

    async def create_upload(self, key: str) -> str:
        response = await self._send("POST", self.url(key, "uploads="))
        if response.status_code != 200:
            raise self._fail(f"create upload {key}", response)
        upload = _xml(response.content, "create upload").findtext("s3:UploadId", "", NS)
        if not upload:
            raise S3Error(f"create upload {key}: no upload id")
        return upload

    async def upload_part(self, key: str, upload: str, number: int, data: bytes) -> str:
        """Send one part; its ETag."""
        query = f"partNumber={number}&uploadId={quote(upload, safe='')}"
        response = await self._send("PUT", self.url(key, query), data)
        if response.status_code != 200 or not response.headers.get("etag"):
            raise self._fail(f"upload part {number} of {key}", response)
        return response.headers["etag"]

    async def complete_upload(
        self, key: str, upload: str, etags: list[str], *, if_none_match: bool
    ) -> bool:
        """Publish the upload at `key`; False when `key` existed (412, with
        `if_none_match`): the upload is then still open, for the caller to abort."""
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        headers = {"if-none-match": "*"} if if_none_match else {}
        query = f"uploadId={quote(upload, safe='')}"
        response = await self._send("POST", self.url(key, query), body, headers)
        if response.status_code == 412:
            return False
        # S3 may answer 200 with an <Error> body when completing fails late.
        if response.status_code != 200 or b"<Error>" in response.content[:512]:
            raise self._fail(f"complete upload {key}", response)
        return True

    async def abort_upload(self, key: str, upload: str) -> None:
        query = f"uploadId={quote(upload, safe='')}"
        response = await self._send("DELETE", self.url(key, query))
        if response.status_code not in (200, 204, 404):
            raise self._fail(f"abort upload {key}", response)

    async def uploads(self, prefix: str) -> list[tuple[str, str]]:
        """Multipart uploads in progress under `prefix`: [(key, upload id)] (one page)."""
        response = await self._send("GET", self.url("", f"uploads=&prefix={quote(prefix)}"))
        if response.status_code != 200 or len(response.content) > MAX_LISTING_BYTES:
            raise self._fail("list uploads", response)
        root = _xml(response.content, "list uploads")
        return [
            (u.findtext("s3:Key", "", NS), u.findtext("s3:UploadId", "", NS))
            for u in root.findall("s3:Upload", NS)
        ]

    async def uploads_page(
        self, prefix: str, after: tuple[str, str] = ("", "")
    ) -> tuple[list[Upload], tuple[str, str] | None]:
        """One page of multipart uploads under `prefix`, and the (key, upload id) markers
        of the next page (if any)."""
        query = f"uploads=&prefix={quote(prefix, safe='')}"
        if after[0]:
            query += f"&key-marker={quote(after[0], safe='')}"
            query += f"&upload-id-marker={quote(after[1], safe='')}"
        response = await self._send("GET", self.url("", query))
        if response.status_code != 200 or len(response.content) > MAX_LISTING_BYTES:
            raise self._fail("list uploads", response)
        root = _xml(response.content, "list uploads")
        listed = [
            Upload(
                u.findtext("s3:Key", "", NS),
                u.findtext("s3:UploadId", "", NS),
                _iso_date(u.findtext("s3:Initiated", "", NS)),
            )
            for u in root.findall("s3:Upload", NS)
        ]
        markers = (
            root.findtext("s3:NextKeyMarker", "", NS),
            root.findtext("s3:NextUploadIdMarker", "", NS),
        )
        more = root.findtext("s3:IsTruncated", "", NS) == "true" and markers[0]
        return listed, (markers if more and markers != after else None)

    async def list(self, prefix: str, after: str = "") -> tuple[list[Listed], str | None]:
        """One page of objects under `prefix`, and the token of the next page (if any)."""
        query = f"list-type=2&prefix={quote(prefix, safe='')}"
        if after:
            query += f"&continuation-token={quote(after, safe='')}"
        response = await self._send("GET", self.url("", query))
        if response.status_code != 200 or len(response.content) > MAX_LISTING_BYTES:
            raise self._fail("list objects", response)
        root = _xml(response.content, "list objects")
        try:
            listed = [
                Listed(
                    c.findtext("s3:Key", "", NS),
                    int(c.findtext("s3:Size", "0", NS) or 0),
                    _iso_date(c.findtext("s3:LastModified", "", NS)),
                )
                for c in root.findall("s3:Contents", NS)
            ]
        except ValueError:
            raise S3Error("list objects: a malformed answer") from None
        truncated = root.findtext("s3:IsTruncated", "", NS) == "true"
        token = root.findtext("s3:NextContinuationToken", "", NS)
        return listed, (token if truncated and token else None)
