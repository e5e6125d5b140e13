"""Attacks on the cache that workers share (issue 14).

A hostile CDN sends wrong bytes while one worker of a `--workers 2` relay fills a blob and
the other's clients join it: nothing is cached, no client gets the complete length, both
workers serve on (same pids). A claim left by a process that died (its temporary file
half-written with wrong bytes) never blocks the next pull, and its leftover is never
served: that claimant is a foreign process, not a worker (a worker killed mid-fill is in
tests/integration/test_cache_workers.py), so it shows the claim is a kernel lock that
needs no supervisor to clean up after whoever held it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.infra.relay import pull_token
from tests.infra.workers import clients_by_worker, current_pids, label_of, labels_seen
from tests.integration.test_cache import MiB, push_unique, sha256_file, wait_until
from tests.integration.test_cache_workers import (
    PROBES,
    Got,
    _stream,
    start_worker,
    two_workers,
    with_probe,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
TIMEOUT = 60.0

# Takes a fill's claim as a relay process would, names a half-written temporary file of
# wrong bytes, says so, and waits to be killed.
CLAIMANT = """
import fcntl, os, sys, time
claim, tmp, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(claim, os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.path.basename(tmp)} {size}\\n".encode())
with open(tmp, "wb") as f:
    f.write(b"\\xff" * (size // 2))
print("holding", flush=True)
time.sleep(600)
"""


def test_wrong_bytes_while_two_workers_fill_and_join_are_never_served_or_cached(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/hostile", 8 * MiB)
    big = max(image.layers, key=lambda blob: blob.size)
    clean_hub.clear()
    clean_hub.cdn.throttle = 8 * MiB  # the joiners arrive while the leader fills
    clean_hub.cdn.corrupt = True
    data = tmp_path / "data"
    claim = data / "claims" / big.digest.removeprefix("sha256:")
    with (
        two_workers(tmp_path, clean_hub) as relay,
        clients_by_worker(relay, 2, PROBES) as by_worker,
    ):
        pids = current_pids(relay)
        token = pull_token(relay.url, "someuser/hostile")
        blob_url = f"{relay.url}/v2/someuser/hostile/blobs/{big.digest}"
        results = [Got() for _ in range(4)]
        asked = [with_probe(blob_url) for _ in results]
        clients = [by_worker["w1"][0], by_worker["w2"][0], by_worker["w2"][1], by_worker["w1"][1]]
        with ThreadPoolExecutor(max_workers=4) as pool:
            first = pool.submit(_stream, asked[0][0], token, results[0], clients[0])
            assert wait_until(lambda: claim.exists() and claim.read_text().strip() != "")
            assert f".{pids['w1']}." in claim.read_text()  # w1 leads; w2's clients join
            rest = [
                pool.submit(_stream, url, token, result, client)
                for (url, _), result, client in zip(
                    asked[1:], results[1:], clients[1:], strict=True
                )
            ]
            for future in [first, *rest]:
                future.result(timeout=TIMEOUT)
        assert [label_of(relay, marker) for _, marker in asked] == ["w1", "w2", "w2", "w1"]
        for result in results:
            assert result.size < big.size, result  # broken off before the last byte
        assert not (data / "blobs" / "sha256" / big.digest[7:9] / big.digest[7:]).exists()
        assert wait_until(lambda: list((data / "tmp").iterdir()) == [])
        assert current_pids(relay) == pids  # no worker died of it
        assert sorted(relay.worker_pids()) == sorted(pids.values())
        assert labels_seen(relay, PROBES) == {"w1", "w2"}  # new connections: both answer
        assert relay.process.poll() is None


def test_a_claim_left_by_a_dead_process_never_blocks_the_next_pull(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/deadclaim", 4 * MiB)
    big = max(image.layers, key=lambda blob: blob.size)
    data = tmp_path / "data"
    with start_worker(tmp_path, "a", clean_hub, data) as relay:
        hexpart = big.digest.removeprefix("sha256:")
        leftover = data / "tmp" / f"{hexpart}.1.dead"
        claim = str(data / "claims" / hexpart)
        with subprocess.Popen(
            [sys.executable, "-c", CLAIMANT, claim, str(leftover), str(big.size)],
            stdout=subprocess.PIPE,
            text=True,
        ) as claimant:
            try:
                assert claimant.stdout is not None
                assert claimant.stdout.readline().strip() == "holding"
                assert leftover.exists()
            finally:
                claimant.send_signal(signal.SIGKILL)
                claimant.wait(10)
        token = pull_token(relay.url, "someuser/deadclaim")
        started = time.monotonic()
        got = Got()
        _stream(relay.url + f"/v2/someuser/deadclaim/blobs/{big.digest}", token, got)
        assert time.monotonic() - started < 10
        assert (got.status, got.size, got.digest, got.error) == (200, big.size, big.digest, "")
        assert not leftover.exists()
        stored = data / "blobs" / "sha256" / hexpart[:2] / hexpart
        assert sha256_file(stored) == big.digest
