"""A CDN-like blob server in a background thread (Docker Hub's R2/Cloudflare stand-in).

Distribution's ``redirect`` storage middleware answers blob GET/HEAD with
``307 Location: <baseurl>docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data``; this server
serves those paths from the registry storage root.

Behaviour: GET/HEAD only; ``Range: bytes=a-b | a- | -n`` -> 206 + Content-Range; unsatisfiable
-> 416; multi-range requests get the whole body (200), which RFC 9110 allows.  **Any request
carrying an ``Authorization`` header gets 400**, as Docker Hub's storage does.  Bodies are
streamed in chunks.  ``corrupt = True`` flips the first byte of every chunk sent;
``chunk_delay = s`` sleeps ``s`` seconds before each chunk (a slow link, for mid-transfer tests).

Fault knobs (issue 16): ``reset_after = N`` cuts every body with a TCP reset after N bytes
(``reset_first_only = True``: only the first response per blob); ``url_ttl = T`` makes URLs
signed by ``sign`` (the hub front signs its redirects with it) expire after T seconds (403, as
S3 answers an expired presigned URL; an unsigned URL is refused too); ``throttle = B`` paces
each response to B bytes/s. ``resets`` counts the bodies cut. ``too_many = S`` answers
every request 429 with ``Retry-After: S``; ``ignore_range = True`` answers a Range request
with the whole body (200), though its ``Accept-Ranges`` says ``bytes``.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
import urllib.parse
from pathlib import Path

from tests.infra._http import (
    BaseHandler,
    LoggedRequest,
    QuietThreadingHTTPServer,
    RequestLog,
    serve_in_thread,
    stop_server,
)

BLOB_PATH_RE = re.compile(r"^/docker/registry/v2/blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})/data$")
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 256 * 1024

_R2_400 = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidArgument</Code>'
    b"<Message>Authorization header is not allowed on presigned requests</Message></Error>"
)


class CDN:
    """Threaded blob server on 127.0.0.1:<ephemeral> serving files below ``root``."""

    def __init__(self, root: Path, *, chunk_size: int = CHUNK) -> None:
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.corrupt = False
        self.chunk_delay = 0.0
        self.answer_delay = 0.0  # seconds before a blob's status line: concurrent pulls overlap
        self.reset_after: int | None = None
        self.reset_first_only = False
        self.url_ttl: float | None = None
        self.throttle: int | None = None
        self.too_many: int | None = None
        self.ignore_range = False
        self.resets = 0
        self._cut: set[str] = set()  # blobs whose first response was cut
        self.log = RequestLog()
        self._lock = threading.Lock()
        self._bytes_sent = 0

        owner = self

        class Handler(BaseHandler):
            # As a real CDN edge: without it, a keep-alive request's answer (head, then
            # body) waits on the client's delayed ACK, 40 ms each (Nagle).
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                owner._handle(self, head=False)

            def do_HEAD(self) -> None:
                owner._handle(self, head=True)

            def _not_allowed(self) -> None:
                owner._record(self)
                owner._simple(self, 405, b"method not allowed", head=False)

            do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

        self._server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = serve_in_thread(self._server, "cdn")

    # -- public helpers -------------------------------------------------------------------

    @property
    def bytes_sent(self) -> int:
        """Body bytes written to clients since start / the last ``clear()``."""
        with self._lock:
            return self._bytes_sent

    def requests(self) -> list[LoggedRequest]:
        return self.log.snapshot()

    def clear(self) -> None:
        self.log.clear()
        with self._lock:
            self._bytes_sent = 0
            self.resets = 0
            self._cut.clear()
        self.reset_after = self.url_ttl = self.throttle = self.too_many = None
        self.reset_first_only = self.ignore_range = False
        self.answer_delay = 0.0

    def sign(self, url: str) -> str:
        """``url`` valid for ``url_ttl`` seconds from now (unchanged when URLs never expire)."""
        if self.url_ttl is None or not url.startswith(self.url):
            return url
        sep = "&" if "?" in url else "?"
        return f"{url}{sep}expires={time.time() + self.url_ttl:.3f}"

    def url_for(self, digest: str) -> str:
        hexpart = digest.removeprefix("sha256:")
        return f"{self.url}/docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"

    def close(self) -> None:
        stop_server(self._server, self._thread)

    def __enter__(self) -> CDN:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _record(self, h: BaseHandler) -> None:
        self.log.append(
            LoggedRequest(
                method=h.command,
                path=h.path,
                headers=h.headers_dict(),
                client=(h.client_address[0], h.client_address[1]),
            )
        )

    def _add_sent(self, n: int) -> None:
        with self._lock:
            self._bytes_sent += n

    def _simple(
        self, h: BaseHandler, status: int, body: bytes, *, head: bool, ctype: str = "text/plain"
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
            self._add_sent(len(body))

    def _handle(self, h: BaseHandler, *, head: bool) -> None:
        self._record(h)
        if "Authorization" in h.headers:
            self._simple(h, 400, _R2_400, head=head, ctype="application/xml")
            return
        path_part, _, query = h.path.partition("?")
        m = BLOB_PATH_RE.match(path_part)
        if m is None or m.group(1) != m.group(2)[:2]:
            self._simple(h, 404, b"not found", head=head)
            return
        if self.url_ttl is not None and not _signed_and_fresh(query):
            self._simple(h, 403, b"Request has expired", head=head, ctype="application/xml")
            return
        if self.too_many is not None:
            h.send_response(429)
            h.send_header("Retry-After", str(self.too_many))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        path = self.root / "docker/registry/v2/blobs/sha256" / m.group(1) / m.group(2) / "data"
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            self._simple(h, 404, b"not found", head=head)
            return
        with fh:
            if self.answer_delay:
                time.sleep(self.answer_delay)
            size = path.stat().st_size
            start, end = 0, size - 1
            status = 200
            rng = None if self.ignore_range else h.headers.get("Range")
            if rng is not None:
                parsed = _parse_range(rng, size)
                if isinstance(parsed, str):
                    h.send_response(416)
                    h.send_header("Content-Range", f"bytes */{size}")
                    h.send_header("Content-Length", "0")
                    h.end_headers()
                    return
                if parsed is not None:
                    start, end = parsed
                    status = 206
            length = end - start + 1 if size else 0
            h.send_response(status)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(length))
            h.send_header("Accept-Ranges", "bytes")  # even with `ignore_range`: it lies
            h.send_header("ETag", f'"{m.group(2)}"')
            h.send_header("Cache-Control", "public, max-age=14400")
            if status == 206:
                h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            h.end_headers()
            if head or length == 0:
                return
            fh.seek(start)
            left = length
            cut_at = self._cut_at(m.group(2))
            throttle = self.throttle
            chunk_size = (
                self.chunk_size
                if throttle is None
                else max(1, min(self.chunk_size, throttle // 50))
            )
            began, sent = time.monotonic(), 0
            while left > 0:
                want = min(chunk_size, left)
                if cut_at is not None:
                    want = min(want, cut_at - sent)
                    if want <= 0:
                        self._reset(h)
                chunk = fh.read(want)
                if not chunk:
                    break  # file shrank under us; the client sees a short body
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
                if self.corrupt:
                    chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                h.wfile.write(chunk)
                self._add_sent(len(chunk))
                left -= len(chunk)
                sent += len(chunk)
                if throttle is not None:
                    ahead = began + sent / throttle - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)

    def _cut_at(self, blob: str) -> int | None:
        """How many body bytes this response gets before its reset, if it is cut."""
        if self.reset_after is None:
            return None
        with self._lock:
            if self.reset_first_only:
                if blob in self._cut:
                    return None
                self._cut.add(blob)
            return self.reset_after

    def _reset(self, h: BaseHandler) -> None:
        """End the connection with a TCP reset (SO_LINGER 0), as a failing edge does."""
        with self._lock:
            self.resets += 1
        sock = h.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.rfile.close()  # the socket closes (with the reset) once nothing else holds it
        sock.close()
        raise ConnectionResetError("reset by the CDN stand-in's fault knob")


def _signed_and_fresh(query: str) -> bool:
    values = urllib.parse.parse_qs(query).get("expires", [])
    try:
        return len(values) == 1 and float(values[0]) > time.time()
    except ValueError:
        return False


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """Return (start, end) inclusive, ``"unsatisfiable"``, or None (ignore the header)."""
    m = _RANGE_RE.match(value.strip())
    if m is None:
        return None  # multi-range or garbage: serve the full body
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    if start >= size:
        return "unsatisfiable"
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None
    return start, end
