"""A bucket that fails under a download never fails the pull (issue 15, finding 5).

Real relay processes on a real SeaweedFS bucket, reached through `FaultProxy`, which the
tests switch mid-body: the store resets every connection, or drips its bytes. The relay
finishes the client's response from the upstream (`Range`), every byte checked against
the digest; a slow bucket is abandoned; a failing bucket gets one probe at a time.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.faultproxy import FaultProxy
from tests.integration.test_cache import MiB, host, push_unique, sub, wait_until
from tests.integration.test_pull import anonymous_token, assert_blobs_pulled, skopeo_copy
from tests.integration.test_s3_cache import (  # the fixtures, shared
    PREFIX,
    blob_key,
    bucket,
    node,
    seaweed,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import Blob, BuiltImage
    from tests.infra.relay import RelayProcess
    from tests.infra.seaweed import Seaweed

pytestmark = pytest.mark.integration
__all__ = ["bucket", "seaweed"]  # fixtures
RETRY_AFTER = 5.0  # vpsrelay.cache.s3.bucket: seconds between probes of a failing bucket


class _Cached:
    """A node behind a `FaultProxy`, with `image` pulled through it (so in the bucket)."""

    def __init__(self, relay: RelayProcess, proxy: FaultProxy, image: BuiltImage) -> None:
        self.relay, self.proxy, self.image = relay, proxy, image
        self.layer: Blob = max(image.layers, key=lambda blob: blob.size)
        self.original = (image.layout / "blobs/sha256" / self.layer.digest[7:]).read_bytes()


@contextlib.contextmanager
def _cached(
    hub: Hub, seaweed: Seaweed, bucket: str, tmp: Path, repo: str, size: int, **env: str
) -> Iterator[_Cached]:
    image = push_unique(hub, tmp, repo, size)
    with (
        FaultProxy((seaweed.host, seaweed.s3_port)) as proxy,
        node(tmp / "a", hub, seaweed, bucket, s3__endpoint=proxy.endpoint, **env) as relay,
    ):
        skopeo_copy(sub(tmp / "fill"), f"{host(relay)}/{repo}:1")
        cached = _Cached(relay, proxy, image)
        stored = seaweed.keys(bucket, f"{PREFIX}blobs/")
        assert stored.get(blob_key(cached.layer.digest)) == cached.layer.size
        hub.clear()
        yield cached


def _get(url: str, token: str, **headers: str) -> tuple[int, bytes, str, str]:
    """(status, the body bytes that arrived, how the body ended, x-vpsrelay-cache)."""
    got = bytearray()
    try:
        with httpx.stream(
            "GET", url, headers={"authorization": f"Bearer {token}", **headers}, timeout=30
        ) as answer:
            for chunk in answer.iter_raw():
                got += chunk
            how = answer.headers.get("x-vpsrelay-cache", "")
            return answer.status_code, bytes(got), "complete", how
    except httpx.HTTPError as exc:
        return 0, bytes(got), type(exc).__name__, ""


def _cdn_ranges(hub: Hub, digest: str) -> list[str | None]:
    """The `Range` of each GET of `digest` at the CDN stand-in (None: the whole blob)."""
    return [
        r.headers.get("range")
        for r in hub.cdn.requests()
        if digest[7:] in r.path and r.method == "GET"
    ]


def _resumed_at(ranges: list[str | None]) -> int:
    """The first byte of the one ranged GET in `ranges` (`bytes=N-`)."""
    assert len(ranges) == 1, ranges
    match = re.fullmatch(r"bytes=([0-9]+)-", ranges[0] or "")
    assert match, ranges
    return int(match.group(1))


def test_a_bucket_reset_mid_body_finishes_the_pull_from_the_upstream(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/cut", 12 * MiB) as cached:
        cached.proxy.switch_after("reset", 4 * MiB)
        out = sub(tmp_path / "pull")
        skopeo_copy(out, f"{host(cached.relay)}/someuser/cut:1")
        assert_blobs_pulled(out, cached.image)
        assert cached.proxy.switched.is_set(), "the bucket was never cut"
        log = cached.relay.log_text()
        assert f"the store failed under {cached.layer.digest}" in log, log[-3000:]
        assert "finishing from the upstream" in log
        resumed = _resumed_at(_cdn_ranges(clean_hub, cached.layer.digest))
        assert 0 < resumed < cached.layer.size
        ready = httpx.get(f"{cached.relay.url}/readyz").json()["checks"]["cache_bucket"]
        assert ready.startswith("failing"), ready
        metrics = httpx.get(f"{cached.relay.url}/metrics").text
        assert "vpsrelay_cache_bucket_up 0.0" in metrics
        assert 'vpsrelay_cache_store_failovers_total{registry="docker.io"} 1.0' in metrics


def test_a_dripping_bucket_is_abandoned_mid_body_for_the_upstream(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Under the per-read timeout but far below the rate floor (256 KiB/s over 10 s of
    waiting): the download switches to the upstream within the window, plus a little."""
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/drip", 12 * MiB) as cached:
        cached.proxy.switch_after("drip", 4 * MiB)
        out = sub(tmp_path / "pull")
        skopeo_copy(out, f"{host(cached.relay)}/someuser/drip:1")
        done = time.monotonic()
        assert_blobs_pulled(out, cached.image)
        assert cached.proxy.switched.is_set(), "the bucket never dripped"
        assert done - cached.proxy.switched_at < 16, done - cached.proxy.switched_at
        log = cached.relay.log_text()
        assert "slower than 256 KiB/s" in log, log[-3000:]
        assert "finishing from the upstream" in log
        assert 0 < _resumed_at(_cdn_ranges(clean_hub, cached.layer.digest)) < cached.layer.size


def test_a_ranged_get_gets_exactly_its_range_when_the_bucket_is_cut(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/ranged", 12 * MiB) as cached:
        first, last = 1 * MiB, 9 * MiB - 1
        token = anonymous_token(cached.relay, "someuser/ranged")
        url = f"{cached.relay.url}/v2/someuser/ranged/blobs/{cached.layer.digest}"
        cached.proxy.switch_after("reset", 4 * MiB)
        status, body, ended, how = _get(url, token, range=f"bytes={first}-{last}")
        assert cached.proxy.switched.is_set(), "the bucket was never cut"
        assert (status, ended, how) == (206, "complete", "hit"), cached.relay.log_text()[-3000:]
        assert body == cached.original[first : last + 1]
        # the rest of the object, not of the range: the range's bytes are served only
        # from an object that matched its digest, the upstream's part checked too
        resumed = _resumed_at(_cdn_ranges(clean_hub, cached.layer.digest))
        assert first < resumed <= last


def test_a_small_range_of_a_big_blob_is_not_checked_by_fetching_the_rest_upstream(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Checking a range means hashing the whole object: when the bucket fails far before
    its end, the rest would come from the upstream for a few bytes (tiny ranges in a burst
    would multiply upstream traffic). The download is broken off instead, and the retry
    passes through with just its range."""
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/tiny", 12 * MiB) as cached:
        first, last = 1 * MiB, 2 * MiB - 1
        token = anonymous_token(cached.relay, "someuser/tiny")
        url = f"{cached.relay.url}/v2/someuser/tiny/blobs/{cached.layer.digest}"
        before = _cdn_ranges(clean_hub, cached.layer.digest)
        cached.proxy.switch_after("reset", 4 * MiB)
        _, body, ended, _ = _get(url, token, range=f"bytes={first}-{last}")
        assert cached.proxy.switched.is_set(), "the bucket was never cut"
        assert ended != "complete"
        assert len(body) < last + 1 - first
        assert _cdn_ranges(clean_hub, cached.layer.digest) == before  # nothing fetched
        status, body, ended, how = _get(url, token, range=f"bytes={first}-{last}")
        assert (status, ended) == (206, "complete"), cached.relay.log_text()[-3000:]
        assert how != "hit"
        assert body == cached.original[first : last + 1]
        assert _cdn_ranges(clean_hub, cached.layer.digest) == [*before, f"bytes={first}-{last}"]


def test_a_failing_bucket_gets_one_probe_at_a_time_and_comes_back(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/probed", 256 * 1024) as cached:
        relay, proxy = cached.relay, cached.proxy
        token = anonymous_token(relay, "someuser/probed")
        url = f"{relay.url}/v2/someuser/probed/blobs/{cached.layer.digest}"
        expected = (200, cached.original, "complete")
        assert _get(url, token)[:3] == expected
        # The store takes requests in and never answers: each bucket request waits out its
        # deadline, so requests that all asked it would all be counted here.
        proxy.set_mode("hang")
        assert _get(url, token)[:3] == expected  # the bucket fails: passed through
        assert wait_until(
            lambda: httpx.get(f"{relay.url}/readyz").json()["checks"]["cache_bucket"] != "ok", 5
        )
        proxy.reset_count()
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            for _ in range(60):  # rounds of 8 concurrent pulls for 2 probe periods
                if time.monotonic() - started > 2 * RETRY_AFTER:
                    break
                answers = list(pool.map(lambda _: _get(url, token), range(8)))
                assert all(answer[:3] == expected for answer in answers)
                assert all(answer[3] != "hit" for answer in answers)
                time.sleep(0.2)
        elapsed = time.monotonic() - started
        assert proxy.attempts <= elapsed / RETRY_AFTER + 1, (proxy.attempts, elapsed)
        assert proxy.attempts >= 1, "never probed"

        proxy.set_mode("forward")
        back = time.monotonic()
        assert wait_until(lambda: _get(url, token)[3] == "hit", RETRY_AFTER + 3)
        assert time.monotonic() - back < RETRY_AFTER + 3
        assert httpx.get(f"{relay.url}/readyz").json()["checks"]["cache_bucket"] == "ok"
        assert _get(url, token)[:3] == expected
        assert "the bucket answers again" in relay.log_text()


@pytest.mark.parametrize("ranged", [False, True])
def test_a_tampered_object_cut_mid_body_is_not_completed_from_the_upstream(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path, ranged: bool
) -> None:
    """A hostile bucket serves altered bytes, then drops the connection so that the relay
    finishes the download from the upstream: the altered part is checked with the rest,
    so the download never completes (a range around the altered byte neither)."""
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/forged", 12 * MiB) as cached:
        forged = bytearray(cached.original)
        forged[1 * MiB] ^= 0xFF
        key = f"/{bucket}/{blob_key(cached.layer.digest)}"
        assert seaweed.request("PUT", key, bytes(forged)).status_code == 200
        token = anonymous_token(cached.relay, "someuser/forged")
        url = f"{cached.relay.url}/v2/someuser/forged/blobs/{cached.layer.digest}"
        first, last = (1 * MiB - 10, 1 * MiB + 10) if ranged else (0, cached.layer.size - 1)
        headers = {"range": f"bytes={first}-{last}"} if ranged else {}
        cached.proxy.switch_after("reset", 4 * MiB)
        _, body, ended, _ = _get(url, token, **headers)
        assert cached.proxy.switched.is_set(), "the bucket was never cut"
        assert ended != "complete" or len(body) < last + 1 - first, ended
        assert body != bytes(forged[first : last + 1])
        log = cached.relay.log_text()
        # the whole GET is finished from the upstream (and fails its check); the small
        # range is broken off at once (`MAX_RANGE_OVERREAD`): neither completes
        finished = "finishing from the upstream" in log
        assert finished is not ranged, log[-3000:]


def test_a_bucket_silent_mid_body_is_left_for_the_upstream_and_keeps_the_object(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Review 15b, finding 1: 4 MiB, then silence under a read timeout longer than the
    rate window (the default is 30 s): the download goes on from the upstream after the
    window; the stall is the bucket's, so the valid object stays in it."""
    with _cached(
        clean_hub, seaweed, bucket, tmp_path, "someuser/hang", 12 * MiB, s3__timeout="15"
    ) as cached:
        token = anonymous_token(cached.relay, "someuser/hang")
        url = f"{cached.relay.url}/v2/someuser/hang/blobs/{cached.layer.digest}"
        cached.proxy.switch_after("hang", 4 * MiB)
        status, body, ended, _ = _get(url, token)
        done = time.monotonic()
        assert cached.proxy.switched.is_set(), "the bucket never went silent"
        log = cached.relay.log_text()
        assert (status, ended) == (200, "complete"), log[-3000:]
        assert body == cached.original
        assert done - cached.proxy.switched_at < 14, done - cached.proxy.switched_at
        assert "slower than 256 KiB/s" in log, log[-3000:]
        assert "finishing from the upstream" in log
        assert "deleting it" not in log
        assert 0 < _resumed_at(_cdn_ranges(clean_hub, cached.layer.digest)) < cached.layer.size
        stored = seaweed.keys(bucket, f"{PREFIX}blobs/")
        assert stored.get(blob_key(cached.layer.digest)) == cached.layer.size


def _slow_get(
    url: str, token: str, read_first: int, pause: float, during: Callable[[], None]
) -> bytes:
    """A GET read by a slow client (a small receive buffer): `read_first` bytes of the body,
    then `pause` seconds reading nothing (`during` runs 1 s in), then the rest."""
    parsed = httpx.URL(url)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(30)
        sock.connect((parsed.host, parsed.port or 80))
        request = (
            f"GET {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {parsed.netloc.decode()}\r\n"
            f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(re.search(rb"(?i)content-length: *([0-9]+)", head).group(1))  # type: ignore[union-attr]
        got = bytearray(body)
        while len(got) < read_first:
            got += sock.recv(65536)
        time.sleep(1.0)
        during()
        time.sleep(pause - 1.0)
        while len(got) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return bytes(got)


def test_a_bucket_connection_lost_behind_a_slow_client_leaves_the_bucket_in_use(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Review 15b, finding 2: while a client reads slowly the relay reads nothing from the
    bucket, and many stores close such a connection. That download is finished from the
    upstream; the bucket is not switched off for every other pull (an anonymous client
    could do this again and again)."""
    with _cached(clean_hub, seaweed, bucket, tmp_path, "someuser/slowclient", 24 * MiB) as cached:
        token = anonymous_token(cached.relay, "someuser/slowclient")
        url = f"{cached.relay.url}/v2/someuser/slowclient/blobs/{cached.layer.digest}"

        def store_closes_the_idle_connection() -> None:
            cached.proxy.set_mode("reset")
            cached.proxy.set_mode("forward")

        body = _slow_get(url, token, 1 * MiB, 7.0, store_closes_the_idle_connection)
        log = cached.relay.log_text()
        assert body == cached.original, (len(body), log[-3000:])
        ready = httpx.get(f"{cached.relay.url}/readyz").json()["checks"]["cache_bucket"]
        assert ready == "ok", ready
        assert "finishing from the upstream" in log, log[-3000:]
        assert "after a slow client: the bucket stays in use" in log
        assert "deleting it" not in log
        assert _get(url, token)[1:] == (cached.original, "complete", "hit")
