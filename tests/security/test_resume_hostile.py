"""A hostile CDN against the relay's upstream resume (issue 16).

The registry redirects a blob to a CDN that cuts the first body with a TCP reset halfway.
The relay resumes it with `Range`; the CDN then answers the resume with another object's
bytes, with a 206 whose `Content-Range` is not the one asked for, or with endless short
bodies. Each time: a bounded number of upstream requests, the client's body broken off
(never completed with wrong bytes), nothing cached, and the relay serving on.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.relay import RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

MiB = 1024 * 1024
BLOB = random.Random(16).randbytes(2 * MiB)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
CUT = MiB  # the first body ends here, with a reset
BIG = random.Random(17).randbytes(24 * MiB)  # fetched in parallel ranges
BIG_DIGEST = "sha256:" + hashlib.sha256(BIG).hexdigest()
ATTEMPTS = 3  # upstream.resume_attempts for these relays
STALL = 4.0  # seconds the "stall" CDN goes silent mid-body; the relays' read timeout is 1 s
TIMEOUT = 30.0


def reset(h: BaseHandler) -> None:
    sock = h.connection
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.rfile.close()
    sock.close()
    raise ConnectionResetError("hostile CDN: reset")


class HostileCDN:
    """Serves `BLOB` at `/blob`: the first GET is cut at `CUT`; resumes answer per `mode`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.gets: list[str | None] = []  # the Range of every GET
        lock = threading.Lock()
        owner = self

        class Handler(BaseHandler):
            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                with lock:
                    owner.gets.append(asked)
                    first = len(owner.gets) == 1
                if owner.mode == "ranges-wrong":  # whole bodies fine, every range wrong
                    if asked is None:
                        self._send(200, [], BIG)
                    else:
                        self._send(206, [("Content-Range", f"bytes 0-99/{len(BIG)}")], BIG[:100])
                    return
                if owner.mode == "stall" and first:  # half the body, then silence
                    self._send(200, [], BLOB, cut=CUT, stall=STALL)
                    return
                if first or asked is None:
                    self._send(200, [], BLOB, cut=CUT)
                    return
                start = int(asked.removeprefix("bytes=").split("-")[0])
                rest = len(BLOB) - start
                if owner.mode == "other-bytes":  # the right range header, another object
                    body = bytes(b ^ 0x5A for b in BLOB[start:])
                    self._send(
                        206, [("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")], body
                    )
                elif owner.mode == "wrong-range":  # bytes from the start, called a 206
                    self._send(
                        206, [("Content-Range", f"bytes 0-{rest - 1}/{len(BLOB)}")], BLOB[:rest]
                    )
                elif owner.mode == "stall":  # then an honest resume
                    header = ("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                    self._send(206, [header], BLOB[start:])
                else:  # "short": the right answer, cut after a few bytes, every time
                    header = ("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                    self._send(206, [header], BLOB[start:], cut=16)

            def _send(
                self,
                status: int,
                extra: list[tuple[str, str]],
                body: bytes,
                cut: int | None = None,
                stall: float = 0.0,
            ) -> None:
                self.send_response(status)
                for name, value in [*extra, ("ETag", '"blob"'), ("Accept-Ranges", "bytes")]:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:cut])
                if stall:
                    time.sleep(stall)  # the relay's read timeout ends it first
                    return
                reset(self)

        self.server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = serve_in_thread(self.server, "hostile-cdn")

    def close(self) -> None:
        stop_server(self.server, self.thread)


class Registry:
    """Answers `/v2/` without authentication and redirects the blob to the CDN."""

    def __init__(self, cdn_url: str) -> None:
        class Handler(BaseHandler):
            def do_GET(self) -> None:
                if self.path == "/v2/":
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                blob = self.path.endswith((DIGEST, BIG_DIGEST))
                self.send_response(307 if blob else 404)
                self.send_header("Location", f"{cdn_url}/blob")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET

        self.server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = serve_in_thread(self.server, "registry")

    def close(self) -> None:
        stop_server(self.server, self.thread)


@pytest.fixture(params=["other-bytes", "wrong-range", "short"])
def cdn(request: pytest.FixtureRequest) -> Iterator[HostileCDN]:
    server = HostileCDN(request.param)
    try:
        yield server
    finally:
        server.close()


def pull(url: str) -> tuple[int, bytes]:
    body = b""
    with httpx.stream("GET", url, timeout=TIMEOUT) as answer:
        try:
            for chunk in answer.iter_raw():
                body += chunk
        except httpx.RemoteProtocolError:
            pass  # broken off: what the relay must do
    return answer.status_code, body


@pytest.mark.parametrize("cache", [True, False])
def test_a_hostile_cdn_cannot_make_a_resume_complete_wrong_or_loop(
    cdn: HostileCDN, cache: bool, tmp_path: Path
) -> None:
    registry = Registry(cdn.url)
    env = {
        "VPSRELAY_CACHE__ENABLED": "true" if cache else "false",
        "VPSRELAY_UPSTREAM__RESUME_ATTEMPTS": str(ATTEMPTS),
        "VPSRELAY_UPSTREAM__RESUME_BACKOFF": "0.05",
    }
    try:
        with RelayProcess(
            tmp_path / "relay", "--upstream", f"docker.io={registry.url}", env=env
        ) as relay:
            status, body = pull(f"{relay.url}/v2/library/app/blobs/{DIGEST}")
            alive = httpx.get(f"{relay.url}/healthz", timeout=TIMEOUT)
            log = relay.log_text()
    finally:
        registry.close()
    assert status == 200
    assert len(body) < len(BLOB), "a body with wrong bytes was completed"
    assert body == BLOB[: len(body)] or cdn.mode == "other-bytes"
    # The first GET and at most ATTEMPTS resumes: bounded, however the CDN answers.
    assert 2 <= len(cdn.gets) <= 1 + ATTEMPTS, cdn.gets
    assert alive.status_code == 200
    assert "Traceback" not in log
    blobs = tmp_path / "relay" / "data" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()], "a wrong blob was cached"


@pytest.mark.parametrize("cache", [True, False])
def test_a_cdn_that_answers_ranges_wrongly_leaves_a_parallel_fetch_to_one_stream(
    cache: bool, tmp_path: Path
) -> None:
    """With 4 parallel connections, every ranged answer names other bytes: after a bounded
    number of requests the relay reads on from its first answer, and no wrong range's
    bytes reach the client; the relay serves on."""
    cdn = HostileCDN("ranges-wrong")
    registry = Registry(cdn.url)
    env = {
        "VPSRELAY_CACHE__ENABLED": "true" if cache else "false",
        "VPSRELAY_UPSTREAM__RESUME_ATTEMPTS": str(ATTEMPTS),
        "VPSRELAY_UPSTREAM__RESUME_BACKOFF": "0.05",
        "VPSRELAY_UPSTREAM__PARALLEL_CONNECTIONS": "4",
        "VPSRELAY_UPSTREAM__PARALLEL_MIN_SIZE": "8MiB",
    }
    try:
        with RelayProcess(
            tmp_path / "relay", "--upstream", f"docker.io={registry.url}", env=env
        ) as relay:
            status, body = pull(f"{relay.url}/v2/library/app/blobs/{BIG_DIGEST}")
            alive = httpx.get(f"{relay.url}/healthz", timeout=TIMEOUT)
            log = relay.log_text()
    finally:
        registry.close()
        cdn.close()
    assert status == 200
    assert body == BIG  # the first answer's bytes, never a wrong range's
    ranged = [r for r in cdn.gets if r is not None]
    # Each of the 4 workers asks the CDN, then the registry for a fresh URL, and stops.
    assert 1 <= len(ranged) <= 2 * 4, cdn.gets
    assert "ranges over 4 connections" in log
    assert "reading on over one connection" in log
    assert alive.status_code == 200
    assert "Traceback" not in log


def test_a_body_that_stalls_past_the_read_timeout_is_resumed(tmp_path: Path) -> None:
    """The CDN sends half the blob and goes silent: after `upstream.read_timeout` the relay
    asks for the rest, and the client gets every byte, none twice."""
    cdn = HostileCDN("stall")
    registry = Registry(cdn.url)
    env = {"VPSRELAY_CACHE__ENABLED": "false", "VPSRELAY_UPSTREAM__READ_TIMEOUT": "1"}
    try:
        with RelayProcess(
            tmp_path / "relay", "--upstream", f"docker.io={registry.url}", env=env
        ) as relay:
            status, body = pull(f"{relay.url}/v2/library/app/blobs/{DIGEST}")
            deadline = time.monotonic() + 5  # the access line follows the last byte
            while "resumes=" not in relay.log_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            log = relay.log_text()
    finally:
        registry.close()
        cdn.close()
    assert status == 200
    assert body == BLOB
    assert cdn.gets == [None, f"bytes={CUT}-{len(BLOB) - 1}"]
    assert "resumes=1" in log
