"""Thin HTTP/1.1 front for the hub registry, adding what Distribution 2.8 lacks vs Docker Hub.

Distribution 2.8 ignores ``n``/``last`` on ``GET /v2/<name>/tags/list`` and returns the tags
unsorted; Docker Hub paginates (sorted tags, ``Link: <...?last=X&n=N>; rel="next"``).  This
front forwards every request unchanged (same path, query, headers incl. Host) to the
registry, and only rewrites successful ``tags/list`` bodies.  Responses are streamed.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

_TAGS_RE = re.compile(r"^/v2/(.+)/tags/list$")
_MANIFEST_RE = re.compile(r"^/v2/(.+)/manifests/[^/]+$")
# What Docker Hub sends on manifest answers to an anonymous client (see `HubFront.ratelimit`).
DOCKER_HUB_RATELIMIT = (
    ("ratelimit-limit", "100;w=21600"),
    ("ratelimit-remaining", "76;w=21600"),
    ("docker-ratelimit-source", "203.0.113.7"),
)
_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_CHUNK = 64 * 1024
RELATIVE_PREFIX = "/_cdn"


def paginate_tags(
    name: str, tags: list[str], query: dict[str, list[str]]
) -> tuple[dict[str, Any], str | None]:
    """Docker Hub-style page of ``tags`` -> (body, Link header or None)."""
    ordered = sorted(tags)
    last = query.get("last", [None])[0]
    if last:
        ordered = [t for t in ordered if t > last]
    n_raw = query.get("n", [None])[0]
    link = None
    if n_raw is not None and n_raw.isdigit():
        n = int(n_raw)
        if len(ordered) > n:
            page = ordered[:n]
            if page:
                q = urllib.parse.urlencode({"last": page[-1], "n": n})
                link = f'</v2/{name}/tags/list?{q}>; rel="next"'
            ordered = page
    return {"name": name, "tags": ordered}, link


# The window Docker Hub states for its pull limit (6 h), and so does `HubFront.limit_pulls`.
PULL_WINDOW = 21600


def token_subject(authorization: str | None) -> str | None:
    """Whose pull token a Bearer `Authorization` carries (the JWT's `sub`; "" anonymous),
    read without checking the signature (Distribution checks it); None: no Bearer token."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or token.count(".") != 2:
        return None
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else None


def basic_subject(authorization: str | None) -> str | None:
    """The username a Basic `Authorization` carries (a registry that asks for Basic
    credentials counts pulls per account too); None: no Basic credentials."""
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value).decode().partition(":")[0]
    except (binascii.Error, ValueError):
        return None


class PullLimits:
    """Docker Hub's pull limit, per account: a manifest GET with a token for `subject`
    is a pull, a HEAD is free (as on Docker Hub); a spent account gets 429 with
    `Retry-After` and `ratelimit-*` headers. Accounts not limited pass untouched."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.left: dict[str, int] = {}  # subject -> pulls left
        self.limit: dict[str, int] = {}
        self.pulls: dict[str, int] = {}  # subject -> manifest GETs that counted
        self.refused: dict[str, int] = {}  # subject -> 429s sent
        self.retry_after = 1234

    def set(self, limits: Mapping[str, int]) -> None:
        with self._lock:
            self.left = dict(limits)
            self.limit = dict(limits)

    def clear(self) -> None:
        with self._lock:
            self.left.clear()
            self.limit.clear()
            self.pulls.clear()
            self.refused.clear()

    def take(self, subject: str | None, method: str) -> tuple[bool, list[tuple[str, str]]]:
        """(refused, headers to add) for a manifest request by `subject`."""
        with self._lock:
            if subject is None or subject not in self.left:
                return False, []
            refused = method == "GET" and self.left[subject] <= 0
            if refused:
                self.refused[subject] = self.refused.get(subject, 0) + 1
            elif method == "GET":
                self.left[subject] -= 1
                self.pulls[subject] = self.pulls.get(subject, 0) + 1
            headers = [
                ("ratelimit-limit", f"{self.limit[subject]};w={PULL_WINDOW}"),
                ("ratelimit-remaining", f"{self.left[subject]};w={PULL_WINDOW}"),
                ("docker-ratelimit-source", subject or "127.0.0.1"),
            ]
            return refused, headers


class HubFront:
    """Threaded forwarder on 127.0.0.1:<ephemeral> -> ``127.0.0.1:backend_port``."""

    def __init__(
        self, backend_port: int, *, timeout: float = 60.0, cdn_url: str | None = None
    ) -> None:
        self.backend_port = backend_port
        self.timeout = timeout
        # With a CDN URL, redirects to it become relative (`/_cdn/...`) and the front
        # fetches those paths from the CDN itself, as GCR/Artifact Registry do.
        self.cdn_url = cdn_url
        # Headers added to every manifest answer, as Docker Hub adds its ratelimit-*;
        # None (the default) adds nothing. `Hub.clear()` resets it.
        self.ratelimit: tuple[tuple[str, str], ...] | None = None
        # Per-account pull limits (`PullLimits`); `Hub.clear()` resets them.
        self.limits = PullLimits()
        # The next N requests with a Bearer token are answered 401 (the registry's own
        # challenge), as for a revoked token; -1: every one. Counted in `rejected`.
        self.reject_tokens = 0
        self.rejected = 0
        self._reject_lock = threading.Lock()
        # True: a kept-alive connection's second request is read and the connection
        # closed without an answer, as an upstream that drops idle connections just
        # as they are reused (`dropped` counts them).
        self.one_response_per_connection = False
        self.dropped = 0
        # Rewrites every Location (the hub signs its CDN redirects with `CDN.sign`).
        self.sign_location: Callable[[str], str] | None = None
        owner = self

        class Handler(BaseHandler):
            answered = False

            def handle_one_request(self) -> None:
                if not (owner.one_response_per_connection and self.answered):
                    super().handle_one_request()
                    self.answered = True
                    return
                self.raw_requestline = self.rfile.readline(65537)
                if self.raw_requestline and self.parse_request():  # reads the headers
                    owner.dropped += 1
                self.close_connection = True

            def _any(self) -> None:
                owner._forward(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self._server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self._thread = serve_in_thread(self._server, "hub-front")

    def close(self) -> None:
        stop_server(self._server, self._thread)

    def _reject(self) -> bool:
        with self._reject_lock:
            if self.reject_tokens == 0:
                return False
            if self.reject_tokens > 0:
                self.reject_tokens -= 1
            self.rejected += 1
            return True

    def _forward(self, h: BaseHandler) -> None:
        if self.cdn_url is not None and h.path.startswith(RELATIVE_PREFIX + "/"):
            cdn = urllib.parse.urlsplit(self.cdn_url)
            port = cdn.port or 80
            self._forward_to(h, port, h.path[len(RELATIVE_PREFIX) :], drop={"authorization"})
            return
        authorization = h.headers.get("Authorization")
        subject = token_subject(authorization)
        if subject is not None and self._reject():
            # Without the token, Distribution answers 401 with its own challenge.
            self._forward_to(h, self.backend_port, h.path, drop={"authorization"})
            return
        extra: list[tuple[str, str]] = []
        if _MANIFEST_RE.match(urllib.parse.urlsplit(h.path).path):
            account = subject if subject is not None else basic_subject(authorization)
            refused, extra = self.limits.take(account, h.command)
            if refused:
                body = json.dumps(
                    {"errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit"}]}
                ).encode()
                h.send_response(429)
                for k, v in [*extra, ("Retry-After", str(self.limits.retry_after))]:
                    h.send_header(k, v)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
                return
        self._forward_to(h, self.backend_port, h.path, drop=set(), extra=extra)

    def _forward_to(
        self,
        h: BaseHandler,
        port: int,
        path: str,
        *,
        drop: set[str],
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length > 0 else None
        # A list, not a dict: clients (skopeo, containerd) send several Accept lines.
        headers = [(k, v) for k, v in h.headers.items() if k.lower() not in _HOP | drop]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
        try:
            try:
                conn.putrequest(h.command, path, skip_host=True, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                conn.endheaders(body)
                resp = conn.getresponse()
            except OSError as exc:
                msg = f"hub front: registry unreachable: {exc}".encode()
                h.send_response(502)
                h.send_header("Content-Type", "text/plain")
                h.send_header("Content-Length", str(len(msg)))
                h.end_headers()
                h.wfile.write(msg)
                return
            split = urllib.parse.urlsplit(h.path)
            m = _TAGS_RE.match(split.path)
            if m and h.command == "GET" and resp.status == 200:
                data = json.loads(resp.read())
                page, link = paginate_tags(
                    data.get("name", m.group(1)),
                    data.get("tags") or [],
                    urllib.parse.parse_qs(split.query),
                )
                out = json.dumps(page).encode()
                h.send_response(200)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() not in ("link", "date", "server"):
                        h.send_header(k, v)
                if link:
                    h.send_header("Link", link)
                h.send_header("Content-Length", str(len(out)))
                h.end_headers()
                h.wfile.write(out)
                return
            h.send_response_only(resp.status, resp.reason)
            clen = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() == "location" and self.sign_location is not None:
                    v = self.sign_location(v)
                if k.lower() == "location" and self.cdn_url and v.startswith(self.cdn_url):
                    v = RELATIVE_PREFIX + v[len(self.cdn_url) :]
                if k.lower() not in _HOP:
                    h.send_header(k, v)
            if self.ratelimit is not None and _MANIFEST_RE.match(split.path):
                for k, v in self.ratelimit:
                    h.send_header(k, v)
            for k, v in extra or ():
                h.send_header(k, v)
            if h.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200:
                if clen is not None:
                    h.send_header("Content-Length", clen)
                h.end_headers()
                return
            if clen is None:
                data = resp.read()
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data)
                return
            h.send_header("Content-Length", clen)
            h.end_headers()
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                h.wfile.write(chunk)
        except OSError:
            h.close_connection = True
            raise
        finally:
            conn.close()
