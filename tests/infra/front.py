"""Thin HTTP/1.1 front for the hub registry, adding what Distribution 2.8 lacks vs Docker Hub.

Distribution 2.8 ignores ``n``/``last`` on ``GET /v2/<name>/tags/list`` and returns the tags
unsorted; Docker Hub paginates (sorted tags, ``Link: <...?last=X&n=N>; rel="next"``).  This
front forwards every request unchanged (same path, query, headers incl. Host) to the
registry, and only rewrites successful ``tags/list`` bodies.  Responses are streamed.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from typing import TYPE_CHECKING, Any

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server

if TYPE_CHECKING:
    from collections.abc import Callable

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
        # Rewrites every Location (the hub signs its CDN redirects with `CDN.sign`).
        self.sign_location: Callable[[str], str] | None = None
        owner = self

        class Handler(BaseHandler):
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

    def _forward(self, h: BaseHandler) -> None:
        if self.cdn_url is not None and h.path.startswith(RELATIVE_PREFIX + "/"):
            cdn = urllib.parse.urlsplit(self.cdn_url)
            port = cdn.port or 80
            self._forward_to(h, port, h.path[len(RELATIVE_PREFIX) :], drop={"authorization"})
            return
        self._forward_to(h, self.backend_port, h.path, drop=set())

    def _forward_to(self, h: BaseHandler, port: int, path: str, *, drop: set[str]) -> None:
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
