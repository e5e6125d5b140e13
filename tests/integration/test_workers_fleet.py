"""The relay seen whole whichever worker answers: `/metrics`, `/readyz`, `vpsrelay check`.

One relay with `--workers 2` (`tests/infra/workerpair.py`), the hub stand-in upstream; a
request reaches a chosen worker on a keep-alive connection that worker accepted (found by
the access log's `worker=` label).
"""

from __future__ import annotations

import json
import os
import signal
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
from tests.infra.workers import clients_by_worker, label_of, new_marker

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
TIMEOUT = 20.0
PROBES = 40  # new connections before each worker must hold one
PLAIN = {"registry": "none", "kind": "other", "status": "200"}


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == name and entry.labels == labels:
                return float(entry.value)
    return None


def scrape(pair: WorkerPair, client: httpx.Client, worker: str) -> str:
    """`/metrics` on `client`'s connection, which `worker` must have answered."""
    marker = new_marker()
    response = client.get(f"{pair.url}/metrics", params={"probe": marker}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert label_of(pair.relay, marker) == worker
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
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        w1, w2 = by_worker["w1"][0], by_worker["w2"][0]
        # Plain 200s without a registry: /healthz, /readyz and /metrics itself (counted
        # once answered, so a scrape shows the ones before it).
        before = sample(scrape(pair, w1, "w1"), "vpsrelay_requests_total", **PLAIN)
        assert before is not None
        for client, times in ((w1, 3), (w2, 5)):
            for _ in range(times):
                assert client.get(f"{pair.url}/healthz", timeout=TIMEOUT).status_code == 200
        text = scrape(pair, w1, "w1")
        assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 1 + 8
        assert sample(text, "vpsrelay_workers", state="ready") == 2
        text = scrape(pair, w2, "w2")  # the other worker: the same totals
        assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 1 + 8 + 1
        assert sample(text, "vpsrelay_workers", state="ready") == 2


def test_a_killed_workers_streams_leave_the_totals_and_readyz_shows_it(
    pair: WorkerPair, clean_hub: Hub
) -> None:
    image = clean_hub.images["library/big:latest"]
    assert isinstance(image, BuiltImage)
    layer = max(image.layers, key=lambda blob: blob.size)
    token = pull_token(pair.url, "big")
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        w1, w2 = by_worker["w1"][0], by_worker["w2"][0]
        before = sample(scrape(pair, w1, "w1"), "vpsrelay_requests_total", **PLAIN)
        assert before is not None
        with w2.stream(
            "GET",
            f"{pair.url}/v2/big/blobs/{layer.digest}",
            headers={"authorization": f"Bearer {token}"},
        ) as response:
            assert response.status_code == 200
            chunks = response.iter_bytes(1 << 20)
            next(chunks)  # then it stops reading: the stream stays open on worker 2
            assert sample(scrape(pair, w1, "w1"), "vpsrelay_active_streams") == 1
            assert pair.streaming_worker() == 2
            pid = pair.kill(2)
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:
                    pass
        text = scrape(pair, w1, "w1")
        assert sample(text, "vpsrelay_active_streams") == 0  # its live gauge left with it
        # What it counted stays in the totals (its /token); the scrapes since are counted
        # (and whatever the replacement answered: nothing, no one asked it).
        assert (
            sample(text, "vpsrelay_token_requests_total", registry="docker.io", status="200") == 1
        )
        assert sample(text, "vpsrelay_requests_total", **PLAIN) == before + 2
        # The supervisor restarts it at once: exited, starting, or ready with a new pid.
        down = sum(
            sample(text, "vpsrelay_workers", state=state) or 0 for state in ("exited", "starting")
        )
        ready = sample(text, "vpsrelay_workers", state="ready")
        assert (down, ready) in ((1, 1), (0, 2)), text
        assert not list(pair.data_dir.glob(f"run/metrics/*_{pid}.db"))

        marker = new_marker()
        response = w1.get(f"{pair.url}/readyz", params={"probe": marker}, timeout=TIMEOUT)
        assert label_of(pair.relay, marker) == "w1"
    assert response.status_code == 200, response.text  # one worker serves: still ready
    body = response.json()
    assert body["worker"] == "w1"
    states = {entry["worker"]: (entry["state"], entry["pid"]) for entry in body["workers"]}
    assert states["w1"] == ("ready", pair.pid(1))
    w2_state, w2_pid = states["w2"]
    if w2_state == "ready":
        assert w2_pid != pid
        assert body["status"] == "ok"
    else:
        assert w2_state in ("exited", "starting"), states
        assert body["status"] == "degraded"
        assert body["checks"]["workers"] == f"1 of 2 workers ready (w2 {w2_state})"


def test_a_worker_killed_unnoticed_is_seen_gone(pair: WorkerPair) -> None:
    """The supervisor stalled (SIGSTOP): it neither reaps a killed worker nor calls
    `worker_exited`; the survivor's /readyz sees the worker gone from its zombie."""
    with clients_by_worker(pair.relay, 1, PROBES) as by_worker:
        dead = pair.pid(2)
        pair.relay.process.send_signal(signal.SIGSTOP)
        try:
            os.kill(dead, signal.SIGKILL)
            marker = new_marker()

            def states() -> list[str]:
                body = (
                    by_worker["w1"][0]
                    .get(f"{pair.url}/readyz", params={"probe": marker}, timeout=TIMEOUT)
                    .json()
                )
                return [entry["state"] for entry in body["workers"]]

            wait_for(lambda: states() == ["ready", "exited"])
            assert label_of(pair.relay, marker) == "w1"
            assert f"(pid {dead}) exited" not in pair.relay.log_text()  # unnoticed indeed
        finally:
            pair.relay.process.send_signal(signal.SIGCONT)


def _check(url: str) -> tuple[dict[str, dict[str, str]], int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "check", "--url", url, "--json",
         "--image", "docker.io=library/alpine:latest"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    rows = {row["check"]: row for row in json.loads(done.stdout)["rows"]}
    return rows, done.returncode, done.stdout


def test_check_shows_a_row_per_worker(pair: WorkerPair) -> None:
    # `check` opens its own connections: whichever worker answers reports both.
    rows, code, out = _check(pair.url)
    assert rows["readiness"]["result"] == "ok", rows["readiness"]
    for number in (1, 2):
        row = rows[f"worker w{number}"]
        assert row["result"] == "ok", row
        assert row["detail"].startswith(f"ready, pid {pair.pid(number)}, heartbeat ")
    assert code == 0, out

    # The supervisor stalled, so the killed worker stays down for the check to see.
    pair.relay.process.send_signal(signal.SIGSTOP)
    try:
        os.kill(pair.pid(2), signal.SIGKILL)
        wait_for(lambda: _check(pair.url)[0]["worker w2"]["result"] == "warn")
        rows, _, _ = _check(pair.url)
    finally:
        pair.relay.process.send_signal(signal.SIGCONT)
    assert rows["worker w1"]["result"] == "ok"
    assert rows["worker w2"]["result"] == "warn"
    assert rows["worker w2"]["detail"].startswith("exited")
    assert "restarted" in rows["worker w2"]["fix"]
