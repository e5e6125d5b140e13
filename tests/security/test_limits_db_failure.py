"""Review of issue 14, findings 1, 2 and 9a: the shared limit state (`limits.db`) failing.

A data dir whose disk is full, or a limits.db writer stuck on a stalled disk, must not
turn every upstream request into a 503, nor leave a client's stream slots counted for
good, nor stall the event loop. The relay is a real process; its data dir is a small
tmpfs that the test fills up.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra._http import BaseHandler, QuietThreadingHTTPServer, serve_in_thread, stop_server
from tests.infra.relay import RelayProcess
from tests.infra.tmpfs import fill_up, mounted_tmpfs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.integration

BLOB = "/v2/library/x/blobs/sha256:" + "a" * 64
SLOW_BLOB = "/v2/library/slow/blobs/sha256:" + "a" * 64


@pytest.fixture
def upstream() -> Iterator[str]:
    """A registry that has no blobs; `slow` ones are answered after a second."""

    class Handler(BaseHandler):
        def do_GET(self) -> None:
            if "/slow/" in self.path:
                time.sleep(1.0)
            body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}'
            self.send_response(404 if "/blobs/" in self.path else 200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = QuietThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = serve_in_thread(server, "upstream")
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop_server(server, thread)


def _relay(tmp_path: Path, data: Path, upstream: str, *more: str) -> RelayProcess:
    return RelayProcess(
        tmp_path / "relay", "--data-dir", str(data), "--upstream", f"docker.io={upstream}",
        *more,
    )  # fmt: skip


def _get_into(client: httpx.Client, path: str, results: list[int]) -> None:
    results.append(client.get(path).status_code)


def _slot_rows(data: Path) -> list[tuple[str, str, str, int]]:
    db = sqlite3.connect(f"file:{data / 'limits.db'}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in db.execute("SELECT * FROM slots")]
    finally:
        db.close()


def test_a_full_data_dir_disk_does_not_refuse_upstream_requests(
    tmp_path: Path, upstream: str
) -> None:
    """Finding 1: with the disk full, the only process still relays (it counts its
    streams in memory). With two workers, see finding 2's test (a worker's slots)."""
    workers = "1"
    with (
        mounted_tmpfs(tmp_path / "disk", "2m") as disk,
        _relay(tmp_path, disk / "data", upstream, "--workers", workers) as relay,
        httpx.Client(base_url=relay.url, timeout=20) as client,
    ):
        assert client.get(BLOB).status_code == 404
        fill_up(disk)
        statuses = [client.get(BLOB).status_code for _ in range(5)]
        assert statuses == [404] * 5, relay.log_path.read_text()
        assert client.get("/v2/").status_code == 200
        (disk / "filler").unlink()
        assert client.get(BLOB).status_code == 404


def test_slots_released_while_the_disk_is_full_are_not_kept(tmp_path: Path, upstream: str) -> None:
    """Finding 2: upstream requests that end while limits.db cannot be written answer
    their real status, and their slots are gone from limits.db once it can be again,
    so the client is not locked out (`upstream_streams_per_ip = 2`, 3 leaks before)."""
    config = tmp_path / "relay.toml"
    config.write_text("[limits]\nupstream_streams_per_ip = 2\n")
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk, _relay(
        tmp_path, disk / "data", upstream, "--workers", "2", "--config", str(config),
    ) as relay, httpx.Client(base_url=relay.url, timeout=20) as client:  # fmt: skip
        data = disk / "data"
        assert client.get(BLOB).status_code == 404
        for _ in range(3):
            results: list[int] = []
            slow = threading.Thread(target=_get_into, args=(client, SLOW_BLOB, results))
            slow.start()
            deadline = time.monotonic() + 5
            while not _slot_rows(data) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _slot_rows(data), "the slow request took no slot"
            fill_up(disk)
            slow.join(timeout=10)
            (disk / "filler").unlink()
            assert results == [404], relay.log_path.read_text()
        assert client.get(BLOB).status_code == 404
        # Each worker gives back what it owes within a few seconds, busy or not.
        deadline = time.monotonic() + 10
        while _slot_rows(data) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _slot_rows(data) == []
        statuses = [client.get(BLOB).status_code for _ in range(3)]
        assert statuses == [404] * 3


def test_a_stuck_limits_writer_does_not_stall_requests(tmp_path: Path, upstream: str) -> None:
    """Finding 9a: another process holding limits.db's write lock (a writer stuck on a
    stalled disk) delays a worker's requests a moment at most, never until it lets go."""
    data = tmp_path / "data"
    with (
        _relay(tmp_path, data, upstream, "--workers", "2") as relay,
        httpx.Client(base_url=relay.url, timeout=20) as client,
    ):
        assert client.get(BLOB).status_code == 404  # limits.db made
        fd = os.open(data / "limits.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            started = time.monotonic()
            statuses = [client.get(BLOB, timeout=5).status_code for _ in range(5)]
            elapsed = time.monotonic() - started
        finally:
            os.close(fd)
        assert statuses == [404] * 5
        assert elapsed < 4.0
        assert client.get(BLOB).status_code == 404
