"""The shared bucket is another trust domain (issue 15).

Attacks, each against real relay processes on a real SeaweedFS bucket: an object altered
behind the relays' back, a lease planted by a dead or hostile node, a client fishing for
the bucket's credentials, and a client reusing a presigned URL for something else.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from tests.infra.relay import REPO_ROOT
from tests.infra.seaweed import SECRET_KEY
from tests.integration.test_cache import MiB, host, push_unique, start_relay, sub, wait_until
from tests.integration.test_pull import anonymous_token, assert_blobs_pulled, skopeo_copy
from tests.integration.test_s3_cache import (  # the fixtures, shared
    PREFIX,
    blob_key,
    bucket,
    cdn_gets,
    node,
    s3_env,
    seaweed,
)
from vpsrelay.cache.s3.client import S3Client
from vpsrelay.cache.s3.lease import Leases, LeaseState

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.seaweed import Seaweed

pytestmark = pytest.mark.integration
__all__ = ["bucket", "seaweed"]  # fixtures


def _read_all(url: str, token: str) -> tuple[int, bytes, str]:
    """(status, the body bytes that arrived, how the body ended)."""
    got = bytearray()
    try:
        with httpx.stream(
            "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=30
        ) as answer:
            for chunk in answer.iter_raw():
                got += chunk
            return answer.status_code, bytes(got), "complete"
    except httpx.HTTPError as exc:
        return 0, bytes(got), type(exc).__name__


@pytest.mark.parametrize("same_size", [True, False])
def test_an_object_altered_in_the_bucket_is_never_served_complete(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path, same_size: bool
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/tampered", 6 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    original = (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()
    with node(tmp_path / "a", clean_hub, seaweed, bucket) as a:
        skopeo_copy(sub(tmp_path / "fill"), f"{host(a)}/someuser/tampered:1")
    forged = bytearray(original)
    forged[len(forged) // 2] ^= 0xFF
    if not same_size:
        forged += b"trailing bytes"
    key = f"/{bucket}/{blob_key(layer.digest)}"
    assert seaweed.request("PUT", key, bytes(forged)).status_code == 200

    # A range around the altered byte: never its altered bytes, complete.
    middle = len(original) // 2
    with node(tmp_path / "r", clean_hub, seaweed, bucket) as r:
        token = anonymous_token(r, "someuser/tampered")
        got, ended = bytearray(), "complete"
        try:
            with httpx.stream(
                "GET",
                f"{r.url}/v2/someuser/tampered/blobs/{layer.digest}",
                headers={
                    "authorization": f"Bearer {token}",
                    "range": f"bytes={middle - 8}-{middle + 8}",
                },
                timeout=30,
            ) as ranged:
                for chunk in ranged.iter_raw():
                    got += chunk
        except httpx.HTTPError as exc:
            ended = type(exc).__name__
        assert ended != "complete" or bytes(got) == original[middle - 8 : middle + 9]
        assert bytes(got) != bytes(forged[middle - 8 : middle + 9]) or ended != "complete"
    if seaweed.request("HEAD", key).status_code == 404:
        assert seaweed.request("PUT", key, bytes(forged)).status_code == 200

    with node(tmp_path / "b", clean_hub, seaweed, bucket) as b:
        token = anonymous_token(b, "someuser/tampered")
        url = f"{b.url}/v2/someuser/tampered/blobs/{layer.digest}"
        _, body, ended = _read_all(url, token)
        assert len(body) < len(original) or ended != "complete"
        assert hashlib.sha256(body).hexdigest() != layer.digest[7:]
        assert wait_until(lambda: seaweed.request("HEAD", key).status_code == 404, 10)
        assert "deleting it" in b.log_text()
        # altered again at once (a store that keeps a bad copy): pulls still succeed,
        # from the upstream, and node B does not read that object back
        assert seaweed.request("PUT", key, bytes(forged)).status_code == 200
        out = sub(tmp_path / "again")
        skopeo_copy(out, f"{host(b)}/someuser/tampered:1")
        assert_blobs_pulled(out, image)
        assert seaweed.request("DELETE", key).status_code == 204
        # the next pull is good again: fetched from the upstream and cached afresh
        out = sub(tmp_path / "after")
        skopeo_copy(out, f"{host(b)}/someuser/tampered:1")
        assert_blobs_pulled(out, image)
        assert seaweed.request("GET", key).content == original


def test_a_planted_lease_delays_another_node_at_most_its_expiry(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """A lease that is never renewed (a dead node, or a hostile one with bucket keys)
    holds the blob back for `lease_ttl` (3 s here), then the node takes it over."""
    image = push_unique(clean_hub, tmp_path, "someuser/leased", 2 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    lease = f"/{bucket}/{PREFIX}leases/sha256/{layer.digest[7:]}"
    assert seaweed.request("PUT", lease, b'{"node": "ghost"}').status_code == 200
    clean_hub.clear()
    with node(tmp_path / "b", clean_hub, seaweed, bucket) as b:
        started = time.monotonic()
        skopeo_copy(sub(tmp_path / "pull"), f"{host(b)}/someuser/leased:1")
        waited = time.monotonic() - started
        assert_blobs_pulled(tmp_path / "pull", image)
        assert "took over" in b.log_text()
    assert waited < 3 + 1 + 6, waited  # lease_ttl, the store's 1 s clock, the pull
    assert cdn_gets(clean_hub, layer.digest) == 1


def test_bucket_credentials_never_reach_a_client_or_a_log(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/secretive", 2 * MiB)
    env = {"s3__redirect": "true", "s3__redirect_min_size": "1"}
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
        skopeo_copy(sub(tmp_path / "pull"), f"{host(a)}/someuser/secretive:1")
        token = anonymous_token(a, "someuser/secretive")
        answers = [
            httpx.get(f"{a.url}/v2/someuser/secretive/blobs/{image.layers[0].digest}",
                      headers={"authorization": f"Bearer {token}"}),
            httpx.get(f"{a.url}/readyz"),
            httpx.get(f"{a.url}/metrics"),
            httpx.get(f"{a.url}/"),
            httpx.get(f"{a.url}/v2/someuser/secretive/blobs/sha256:{'0' * 64}",
                      headers={"authorization": f"Bearer {token}"}),
        ]  # fmt: skip
        seaweed.stop()
        try:
            answers.append(httpx.get(f"{a.url}/readyz"))
            skopeo_copy(sub(tmp_path / "down"), f"{host(a)}/someuser/secretive:1")
        finally:
            seaweed.start()
        log = a.log_text()
    for answer in answers:
        text = answer.text + "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
        assert SECRET_KEY not in text
        assert "Credential=relaykey" not in text or "X-Amz-Signature" in text  # presigned only
    assert SECRET_KEY not in log
    assert "authorization" not in log.lower() or "x-amz" not in log.lower()
    variables = {f"VPSRELAY_CACHE__{k.upper()}": v for k, v in s3_env(seaweed, bucket).items()}
    shown = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "config", "show"],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **variables},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert SECRET_KEY not in shown.stdout + shown.stderr
    assert '"secret_key": "***"' in shown.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_signatures_never_reach_the_log_even_at_debug_level(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path, workers: str
) -> None:
    """botocore logs every canonical request and signature at DEBUG, and a presigned URL's
    signature is that URL's credential: an operator's `--log-level debug` (supervisor and
    workers alike) must not hand it to whoever reads the log."""
    image = push_unique(clean_hub, tmp_path, "someuser/verbose", 6 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    env = s3_env(seaweed, bucket, s3__redirect="true", s3__redirect_min_size="1")
    with start_relay(
        tmp_path / "a", clean_hub, "--log-level", "debug", "--workers", workers, **env
    ) as a:
        skopeo_copy(sub(tmp_path / "pull"), f"{host(a)}/someuser/verbose:1")  # fills: PUTs
        token = anonymous_token(a, "someuser/verbose")
        redirected = httpx.get(
            f"{a.url}/v2/someuser/verbose/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
        )
        assert redirected.status_code == 307, a.log_text()[-3000:]
        signature = redirected.headers["location"].rpartition("X-Amz-Signature=")[2]
        log = a.log_text()
    assert "level=debug" in log, "the relay did not log at debug level"
    assert len(signature) == 64
    assert signature not in log
    for botocore_trace in ("CanonicalRequest", "StringToSign", "Signature:"):
        assert botocore_trace not in log
    assert SECRET_KEY not in log


def test_a_presigned_url_is_for_one_object_get_only_and_expires(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/scoped", 2 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    env = {"s3__redirect": "true", "s3__redirect_min_size": "1", "s3__redirect_expiry": "2"}
    with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
        skopeo_copy(sub(tmp_path / "pull"), f"{host(a)}/someuser/scoped:1")
        url = f"{a.url}/v2/someuser/scoped/blobs/{layer.digest}"
        # no redirect before the pull's own authorization: anonymous, then a wrong token
        assert httpx.get(url).status_code == 401
        wrong = httpx.get(url, headers={"authorization": "Bearer not-a-token"})
        assert wrong.status_code == 401
        assert "location" not in wrong.headers
        token = anonymous_token(a, "someuser/scoped")
        redirected = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert redirected.status_code == 307, (redirected.headers, a.log_text()[-3000:])
        location = redirected.headers["location"]
    assert httpx.get(location).status_code == 200
    other_key = blob_key(image.config.digest)
    assert httpx.get(location.replace(blob_key(layer.digest), other_key)).status_code == 403
    assert httpx.put(location, content=b"overwrite").status_code == 403
    assert httpx.delete(location).status_code == 403
    listing = location.replace(f"/{blob_key(layer.digest)}?", "?list-type=2&")
    assert httpx.get(listing).status_code == 403
    assert wait_until(lambda: httpx.get(location).status_code == 403, 6)  # expired


def test_a_renewed_lease_delays_each_client_at_most_lease_wait(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """A lease that a node with the bucket's keys keeps renewing: concurrent clients of
    one blob each wait `lease_wait` (2 s here) at most, not one after the other."""
    image = push_unique(clean_hub, tmp_path, "someuser/held", 1 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    lease = f"/{bucket}/{PREFIX}leases/sha256/{layer.digest[7:]}"
    stop = threading.Event()

    def renew() -> None:
        for _ in range(120):  # bounded: 60 s at most
            seaweed.request("PUT", lease, b'{"node": "hostile"}')
            if stop.wait(0.5):
                return

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        with node(tmp_path / "b", clean_hub, seaweed, bucket, s3__lease_wait="3") as b:
            token = anonymous_token(b, "someuser/held")
            url = f"{b.url}/v2/someuser/held/blobs/{layer.digest}"

            def pull(_: int) -> tuple[float, int, bytes]:
                started = time.monotonic()
                status, body, ended = _read_all(url, token)
                assert ended == "complete", ended
                return time.monotonic() - started, status, body

            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(pull, range(4)))
            again = pull(0)
    finally:
        stop.set()
        renewer.join(timeout=5)
    original = (image.layout / "blobs/sha256" / layer.digest[7:]).read_bytes()
    for waited, status, body in [*results, again]:
        assert status == 200
        assert body == original
        assert waited < 3 + 2.5, [r[0] for r in results]  # lease_wait, the relayed pull
    assert again[0] < 2.5, "a client after a timed-out wait waits again"


def test_a_taken_over_lease_is_neither_renewed_nor_released_by_its_old_holder(
    seaweed: Seaweed, bucket: str
) -> None:
    """A slow node whose fill lease another node took over (after it lapsed) must not
    rewrite the new holder's lease with its renewal, nor delete it with its release."""
    digest = "sha256:" + "ab" * 32
    key = f"/{bucket}/{PREFIX}leases/sha256/{'ab' * 32}"

    async def main() -> None:
        client = S3Client(seaweed.endpoint, bucket, seaweed.signer)
        try:
            slow = Leases(client, PREFIX, "slow", ttl=30)
            assert await slow.take(digest) is LeaseState.MINE
            assert await slow.renew(digest)  # still its own
            seen = seaweed.request("HEAD", key).headers["etag"]
            taken = seaweed.request("PUT", key, b'{"node": "new"}', {"if-match": seen})
            assert taken.status_code == 200
            assert not await slow.renew(digest)
            await slow.release(digest)
            assert seaweed.request("GET", key).content == b'{"node": "new"}'
            # its own lease it does release
            other = "sha256:" + "cd" * 32
            assert await slow.take(other) is LeaseState.MINE
            assert await slow.renew(other)
            await slow.release(other)
            assert seaweed.request("HEAD", f"/{bucket}/{slow.key(other)}").status_code == 404
        finally:
            await client.aclose()

    trio.run(main)


def test_abandoned_uploads_are_aborted_and_live_ones_kept(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Parts of an upload no fill is behind any more (a dead node's, an abort that failed
    while the bucket was down) are aborted by the node that holds the eviction lease; an
    upload whose lease is alive is left alone."""
    dead, live = "0d" * 32, "1e" * 32

    def start_upload(hexpart: str) -> str:
        key = f"/{bucket}/{PREFIX}blobs/sha256/{hexpart}"
        answer = seaweed.request("POST", f"{key}?uploads=")
        upload = answer.text.split("<UploadId>")[1].split("</UploadId>")[0]
        part = seaweed.request("PUT", f"{key}?partNumber=1&uploadId={upload}", b"x" * 1024)
        assert part.status_code == 200
        return upload

    start_upload(dead)
    start_upload(live)
    lease = f"/{bucket}/{PREFIX}leases/sha256/{live}"
    stop = threading.Event()

    def renew() -> None:
        for _ in range(120):  # bounded: 30 s at most
            seaweed.request("PUT", lease, b'{"node": "alive"}')
            if stop.wait(0.25):
                return

    renewer = threading.Thread(target=renew, daemon=True)
    renewer.start()
    try:
        env = {"s3__lease_ttl": "1", "s3__evict_interval": "1"}
        with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:

            def keys() -> set[str]:
                return {key.rsplit("/", 1)[-1] for key, _ in seaweed.uploads(bucket, PREFIX)}

            assert wait_until(lambda: dead not in keys(), 20), a.log_text()[-2000:]
            assert live in keys()
            assert "aborted 1 abandoned upload" in a.log_text()
    finally:
        stop.set()
        renewer.join(timeout=5)


def test_refused_clients_cannot_use_up_the_bucket_connections(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Anonymous, refused GETs of a cached blob (no token: the upstream answers 401) open
    no bucket GET: after 150 of them the bucket still serves an authorized pull."""
    image = push_unique(clean_hub, tmp_path, "someuser/pooled", 1 * MiB)
    layer = max(image.layers, key=lambda blob: blob.size)
    with node(tmp_path / "a", clean_hub, seaweed, bucket) as a:
        skopeo_copy(sub(tmp_path / "fill"), f"{host(a)}/someuser/pooled:1")
        url = f"{a.url}/v2/someuser/pooled/blobs/{layer.digest}"
        with httpx.Client(timeout=10) as client:
            for _ in range(150):  # bounded; within PREPARED_TTL (30 s) of each other
                assert client.get(url).status_code == 401
        token = anonymous_token(a, "someuser/pooled")
        answer = httpx.get(url, headers={"authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200
        assert answer.headers.get("x-vpsrelay-cache") == "hit", a.log_text()[-2000:]
        assert httpx.get(f"{a.url}/readyz").json()["checks"]["cache_bucket"] == "ok"
        assert "the bucket failed" not in a.log_text()


class _DrippingStore:
    """A "bucket" that accepts every request and answers one byte a second (under the
    relay's per-read `timeout`, so only a total deadline ends the wait)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"[:60]:
                if self.stop.wait(1.0):  # bounded: 60 bytes, a minute at most
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def __enter__(self) -> _DrippingStore:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


def test_a_dripping_bucket_does_not_stall_pulls(
    clean_hub: Hub, seaweed: Seaweed, bucket: str, tmp_path: Path
) -> None:
    """Every bucket request has a total deadline: a store that drips its answers is
    marked failing and the pull passes through."""
    image = push_unique(clean_hub, tmp_path, "someuser/dripped", 1 * MiB)
    with _DrippingStore() as store:
        env = {"s3__endpoint": f"http://127.0.0.1:{store.port}", "s3__timeout": "3"}
        with node(tmp_path / "a", clean_hub, seaweed, bucket, **env) as a:
            started = time.monotonic()
            skopeo_copy(sub(tmp_path / "pull"), f"{host(a)}/someuser/dripped:1")
            took = time.monotonic() - started
            assert_blobs_pulled(tmp_path / "pull", image)
            ready = httpx.get(f"{a.url}/readyz").json()
    assert ready["checks"]["cache_bucket"].startswith("failing"), ready
    assert took < 30, took
