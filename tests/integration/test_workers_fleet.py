"""The relay seen whole whichever worker answers: `/metrics`, `/readyz`, `vpsrelay check`.

Two workers of one relay (`tests/infra/workerpair.py`: started as the supervisor starts
them), real `vpsrelay serve` processes on one data dir, the hub stand-in upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.oci import BuiltImage
from tests.infra.relay import REPO_ROOT, pull_token
from tests.infra.workerpair import WorkerPair, worker_pair

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
TIMEOUT = 20.0
PLAIN = {"registry": "none", "kind": "other", "status": "200"}


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == name and entry.labels == labels:
                return float(entry.value)
    return None


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.text


def wait_for(predicate: object, timeout: float = TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def pair(clean_hub: Hub, tmp_path: Path) -> Iterator[WorkerPair]:
    # The cache is the shared-cache part's; these tests watch the pass-through's streams.
    args = ("--upstream", f"docker.io={clean_hub.registry_url}")
    with worker_pair(tmp_path, *args, env={"VPSRELAY_CACHE__ENABLED": "false"}) as workers:
        workers.wait_ready()
        yield workers


def test_metrics_from_either_worker_are_the_relays_totals(pair: WorkerPair) -> None:
    first, second = pair.urls
    # Plain 200s without a registry: /healthz, /readyz and /metrics itself (counted once
    # answered, so a scrape shows the ones before it).
    before = sample(scrape(first), "vpsrelay_requests_total", **PLAIN)
    assert before is not None
    for url, times in ((first, 3), (second, 5)):
        for _ in range(times):
            assert httpx.get(f"{url}/healthz", timeout=TIMEOUT).status_code == 200
    text = scrape(first)
    assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 1 + 8
    assert sample(text, "vpsrelay_workers", state="ready") == 2
    text = scrape(second)  # the other worker: the same totals
    assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 1 + 8 + 1
    assert sample(text, "vpsrelay_workers", state="ready") == 2


def test_a_killed_workers_streams_leave_the_totals_and_readyz_shows_it_down(
    pair: WorkerPair, clean_hub: Hub
) -> None:
    first, second = pair.urls
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    token = pull_token(second, "big")
    before = sample(scrape(first), "vpsrelay_requests_total", **PLAIN)
    assert before is not None
    with httpx.stream(
        "GET",
        f"{second}/v2/big/blobs/{layer.digest}",
        headers={"authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    ) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes(1 << 20)
        next(chunks)  # then it stops reading: the stream stays open on worker 2
        assert sample(scrape(first), "vpsrelay_active_streams") == 1
        streaming = pair.streaming_worker()
        assert streaming == 2
        pid = pair.kill(streaming)
        with pytest.raises(httpx.HTTPError):
            for _ in chunks:
                pass
    text = scrape(first)
    assert sample(text, "vpsrelay_active_streams") == 0  # its live gauge left with it
    # What it counted stays in the totals (its /token); the two scrapes since are counted.
    assert sample(text, "vpsrelay_token_requests_total", registry="docker.io", status="200") == 1
    assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 2
    assert sample(text, "vpsrelay_workers", state="exited") == 1
    assert not list(pair.data_dir.glob(f"run/metrics/*_{pid}.db"))

    response = httpx.get(f"{first}/readyz", timeout=TIMEOUT)
    assert response.status_code == 200, response.text  # one worker serves: still ready
    body = response.json()
    assert body["status"] == "degraded"
    assert body["worker"] == "w1"
    assert body["checks"]["workers"] == "1 of 2 workers ready (w2 exited)"
    states = {entry["worker"]: (entry["state"], entry["pid"]) for entry in body["workers"]}
    assert states == {"w1": ("ready", pair.pid(1)), "w2": ("exited", pid)}


def test_a_worker_killed_unnoticed_is_seen_gone(pair: WorkerPair) -> None:
    """No `worker_exited` yet (the supervisor has not reaped it): its process is gone."""
    first = pair.urls[0]
    process = pair.processes[1].process
    process.kill()
    process.wait(TIMEOUT)
    body = httpx.get(f"{first}/readyz", timeout=TIMEOUT).json()
    assert [entry["state"] for entry in body["workers"]] == ["ready", "exited"]


def test_check_shows_a_row_per_worker(pair: WorkerPair) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    rows_by_url = []
    for url in pair.urls:
        done = subprocess.run(
            [sys.executable, "-m", "vpsrelay", "check", "--url", url, "--json",
             "--image", "docker.io=library/alpine:latest"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        report = json.loads(done.stdout)
        rows = {row["check"]: row for row in report["rows"]}
        rows_by_url.append(rows)
        assert rows["readiness"]["result"] == "ok", rows["readiness"]
        for number in (1, 2):
            row = rows[f"worker w{number}"]
            assert row["result"] == "ok", row
            assert row["detail"].startswith(f"ready, pid {pair.pid(number)}, heartbeat ")
        assert done.returncode == 0, done.stdout
    assert rows_by_url[0].keys() == rows_by_url[1].keys()

    pair.kill(2)
    done = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "check", "--url", pair.urls[0], "--json",
         "--image", "docker.io=library/alpine:latest"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    rows = {row["check"]: row for row in json.loads(done.stdout)["rows"]}
    assert rows["worker w1"]["result"] == "ok"
    assert rows["worker w2"]["result"] == "warn"
    assert rows["worker w2"]["detail"].startswith("exited")
    assert "restarted" in rows["worker w2"]["fix"]
