"""The files a relay's workers share: status files, folded metrics, /readyz's verdict.

No sockets: worker processes that only count (prometheus-client's multiprocess mode, as
under the supervisor) and status files written as the workers write them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.infra.relay import REPO_ROOT
from vpsrelay import config, worker_identity
from vpsrelay.core.fleet import State, WorkerStatus
from vpsrelay.ops import fleet
from vpsrelay.ops.health import Health
from vpsrelay.ops.metrics import Metrics
from vpsrelay.worker_identity import WorkerIdentity

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

TIMEOUT = 20.0

# A worker that counts what it is told to and waits (stdin) until the test ends it.
COUNTING_WORKER = """
import sys
from vpsrelay.ops.metrics import Metrics
from vpsrelay.worker_identity import WorkerIdentity

number, requests, cache_size = map(int, sys.argv[1:4])
metrics = Metrics(identity=WorkerIdentity(number, 2))
assert metrics.multiprocess_dir is not None, "not in multiprocess mode"
for _ in range(requests):
    metrics.request_done("docker.io", "blob", 200, 10)
metrics.upstream_answered("docker.io", "blob", 200, 0.05)
metrics.active_streams.inc()
metrics.cache_size(cache_size)
metrics.credential_refusals.labels("docker.io", "alice").set(requests)
print("counted", flush=True)
sys.stdin.readline()
"""


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for entry in family.samples:
            if entry.name == name and entry.labels == labels:
                return float(entry.value)
    return None


def status(number: int, pid: int, **changes: object) -> WorkerStatus:
    now = time.monotonic()
    fields: dict[str, object] = {"number": number, "pid": pid, "started": now, "heartbeat": now}
    fields.update(changes)
    return WorkerStatus(**fields)  # type: ignore[arg-type]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    fleet.prepare(tmp_path)
    return tmp_path


# --- status files


def test_status_files_are_read_back_whole_and_strays_ignored(data_dir: Path) -> None:
    fleet.write_status(data_dir, status(1, 11))
    fleet.write_status(data_dir, status(2, 22, ready=False, checks={"tls": "no cert"}))
    directory = worker_identity.status_dir(data_dir)
    (directory / ".3.json.99.tmp").write_text("{half")  # a write that never finished
    (directory / "4.json").write_text("not json")
    (directory / "5.json").write_text(status(6, 66).to_json())  # claims another number
    (directory / "notes.txt").write_text("x")
    statuses = fleet.read_statuses(data_dir)
    assert sorted(statuses) == [1, 2]
    assert statuses[2].checks == {"tls": "no cert"}
    assert oct(os.stat(directory / "1.json").st_mode & 0o777) == "0o600"
    # The writes left no temporary file behind: only the planted one is there.
    assert [path.name for path in directory.glob(".*.tmp")] == [".3.json.99.tmp"]


def test_a_missing_status_directory_reads_as_no_workers(tmp_path: Path) -> None:
    assert fleet.read_statuses(tmp_path) == {}


def test_worker_exited_marks_its_status_not_its_successors(data_dir: Path) -> None:
    fleet.write_status(data_dir, status(1, 11))
    fleet.worker_exited(data_dir, 1, 11)
    marked = fleet.read_statuses(data_dir)[1]
    assert (marked.pid, marked.exited, marked.ready) == (11, True, False)

    fleet.write_status(data_dir, status(1, 12))  # its successor is up already
    fleet.worker_exited(data_dir, 1, 11)  # a late notice about the old one
    assert fleet.read_statuses(data_dir)[1].exited is False

    fleet.worker_exited(data_dir, 2, 21)  # died before it wrote anything
    assert fleet.read_statuses(data_dir)[2].exited is True


def test_a_dead_process_and_its_zombie_are_gone() -> None:
    assert not fleet.process_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not fleet.process_gone(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        while not fleet.process_gone(child.pid):  # a zombie until reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.wait(TIMEOUT)
    assert fleet.process_gone(child.pid)


def test_survey_uses_the_callers_own_status_and_sees_a_killed_sibling(data_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(TIMEOUT)
    fleet.write_status(data_dir, status(1, os.getpid(), heartbeat=0.0))  # its own, old
    fleet.write_status(data_dir, status(2, child.pid))  # SIGKILLed: nobody marked it
    view = fleet.survey(data_dir, 3, status(1, os.getpid()))
    assert [w.state for w in view.workers] == [State.READY, State.EXITED, State.STARTING]


async def test_keep_status_beats_then_says_draining(data_dir: Path) -> None:
    health = Health(data_dir, identity=WorkerIdentity(2, 2))
    stop = trio.Event()
    beats: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fleet.keep_status, data_dir, health.own_status, stop)
        with trio.fail_after(TIMEOUT):
            while len(beats) < 2:  # two heartbeats, HEARTBEAT_SECONDS apart
                current = fleet.read_statuses(data_dir).get(2)
                if current is not None and current.heartbeat not in beats:
                    beats.append(current.heartbeat)
                await trio.sleep(0.05)
        stop.set()
    final = fleet.read_statuses(data_dir)[2]
    assert (final.pid, final.draining, final.ready) == (os.getpid(), True, False)
    assert beats[1] > beats[0]


async def test_keep_status_writes_nothing_for_the_single_process(data_dir: Path) -> None:
    health = Health(data_dir, identity=worker_identity.SINGLE)
    with trio.fail_after(TIMEOUT):
        await fleet.keep_status(data_dir, health.own_status, trio.Event())
    assert fleet.read_statuses(data_dir) == {}


# --- /readyz's verdict


def _registries() -> tuple[config.RegistryConfig, ...]:
    registries = config.load(None, {}, upstreams={"docker.io": "http://r.test"}).registries
    return tuple(r for r in registries if r.name == "docker.io")


async def _readiness(health: Health, *, detailed: bool = False) -> tuple[bool, dict[str, object]]:
    health.answered("docker.io", None)  # no probe: the upstream answered just now
    return await health.readiness(_registries(), None, detailed=detailed)  # type: ignore[arg-type]


async def test_readyz_reports_every_worker_and_stays_ready_with_one_down(data_dir: Path) -> None:
    health = Health(data_dir, identity=WorkerIdentity(1, 2))
    fleet.write_status(data_dir, status(2, os.getppid()))
    ready, report = await _readiness(health)
    assert ready
    assert report["status"] == "ready"
    assert report["checks"]["workers"] == "ok"  # type: ignore[index]
    assert report["worker"] == "w1"
    workers = report["workers"]
    assert [(w["worker"], w["state"]) for w in workers] == [("w1", "ready"), ("w2", "ready")]  # type: ignore[attr-defined]
    assert all("pid" not in w for w in workers)  # type: ignore[attr-defined]

    fleet.worker_exited(data_dir, 2, os.getppid())
    ready, report = await _readiness(health, detailed=True)
    assert ready
    assert report["status"] == "degraded"
    assert report["checks"]["workers"] == "1 of 2 workers ready (w2 exited)"  # type: ignore[index]
    assert [w["pid"] for w in report["workers"]] == [os.getpid(), os.getppid()]  # type: ignore[attr-defined]


async def test_readyz_is_unready_when_no_worker_is_ready(data_dir: Path) -> None:
    health = Health(data_dir, identity=WorkerIdentity(1, 2))
    health.tls.enabled = True  # and no certificate loaded yet: this worker is unready
    fleet.write_status(data_dir, status(2, os.getppid()).marked_exited())
    ready, report = await _readiness(health)
    assert not ready
    assert report["status"] == "unready"
    assert report["checks"]["workers"] == "0 of 2 workers ready (w1 unready, w2 exited)"  # type: ignore[index]
    assert report["workers"][0]["checks"] == {"tls": "no certificate loaded"}  # type: ignore[index]


async def test_the_single_process_reports_as_before(data_dir: Path) -> None:
    health = Health(data_dir, identity=worker_identity.SINGLE)
    ready, report = await _readiness(health)
    assert ready
    assert set(report) == {"status", "checks", "upstreams"}
    assert set(report["checks"]) == {"tls", "data_dir", "upstream"}  # type: ignore[call-overload]


# --- metrics across worker processes


@pytest.fixture
def counting_workers(data_dir: Path) -> Iterator[list[subprocess.Popen[str]]]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(worker_identity.metrics_dir(data_dir)),
    }
    workers: list[subprocess.Popen[str]] = []
    try:
        for number, requests, cache_size in ((1, 3, 111), (2, 5, 222)):
            worker = subprocess.Popen(
                [sys.executable, "-c", COUNTING_WORKER, str(number), str(requests),
                 str(cache_size)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            workers.append(worker)
            assert worker.stdout is not None
            assert worker.stdout.readline() == "counted\n"  # in order: 222 is the latest size
        yield workers
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(TIMEOUT)
            for stream in (worker.stdin, worker.stdout):
                if stream is not None:
                    stream.close()


def _render(data_dir: Path) -> str:
    """`/metrics` as a supervised worker renders it (the test process reads the files)."""
    metrics = Metrics()
    metrics.multiprocess_dir = worker_identity.metrics_dir(data_dir)
    return metrics.render().decode()


def test_metrics_sum_over_workers_and_a_dead_ones_counts_stay(
    data_dir: Path, counting_workers: list[subprocess.Popen[str]]
) -> None:
    requests = {"registry": "docker.io", "kind": "blob", "status": "200"}
    latency = {"registry": "docker.io", "kind": "blob"}
    text = _render(data_dir)
    assert sample(text, "vpsrelay_requests_total", **requests) == 8
    assert sample(text, "vpsrelay_served_bytes_total", registry="docker.io", kind="blob") == 80
    assert sample(text, "vpsrelay_upstream_latency_seconds_count", **latency) == 2
    assert sample(text, "vpsrelay_upstream_latency_seconds_bucket", le="0.05", **latency) == 2
    assert sample(text, "vpsrelay_active_streams") == 2  # livesum
    assert sample(text, "vpsrelay_cache_size_bytes") == 222  # mostrecent

    second = counting_workers[1]
    second.send_signal(signal.SIGKILL)
    second.wait(TIMEOUT)
    assert sample(_render(data_dir), "vpsrelay_active_streams") == 2  # nobody said yet
    fleet.worker_exited(data_dir, 2, second.pid)
    text = _render(data_dir)
    assert sample(text, "vpsrelay_active_streams") == 1  # its live gauge left with it
    assert sample(text, "vpsrelay_requests_total", **requests) == 8  # what it counted stays
    assert sample(text, "vpsrelay_upstream_latency_seconds_count", **latency) == 2
    assert sample(text, "vpsrelay_cache_size_bytes") == 222  # still the latest value

    first = counting_workers[0]
    assert first.stdin is not None
    first.stdin.close()  # it ends on its own
    first.wait(TIMEOUT)
    fleet.worker_exited(data_dir, 1, first.pid)
    text = _render(data_dir)
    assert sample(text, "vpsrelay_requests_total", **requests) == 8
    assert sample(text, "vpsrelay_upstream_latency_seconds_bucket", le="+Inf", **latency) == 2
    assert sample(text, "vpsrelay_cache_size_bytes") == 222
    refusals = {"registry": "docker.io", "credential": "alice"}
    assert sample(text, "vpsrelay_upstream_credential_refusals", **refusals) == 8  # sum
    assert sample(text, "vpsrelay_active_streams") is None  # no live worker, no value
    # Folded: one file per kind, however many workers came and went.
    names = sorted(path.name for path in worker_identity.metrics_dir(data_dir).glob("*.db"))
    assert names == [
        "counter_archive.db",
        "gauge_max_archive.db",
        "gauge_mostrecent_archive.db",
        "gauge_sum_archive.db",
        "histogram_archive.db",
    ]


def test_render_shows_the_workers_and_their_oldest_certificate(data_dir: Path) -> None:
    fleet.write_status(data_dir, status(2, os.getppid(), certificate_not_after=1.7e9))
    health = Health(data_dir, identity=WorkerIdentity(1, 3))
    health.tls.enabled = True
    health.tls.loaded(1.8e9)
    metrics = Metrics()
    metrics.multiprocess_dir = worker_identity.metrics_dir(data_dir)
    text = metrics.render(health.survey()).decode()
    assert sample(text, "vpsrelay_workers", state="ready") == 2
    assert sample(text, "vpsrelay_workers", state="starting") == 1
    assert sample(text, "vpsrelay_workers", state="exited") == 0
    assert sample(text, "vpsrelay_certificate_expiry_timestamp_seconds") == 1.7e9


def test_a_status_file_holds_json_the_operator_can_read(data_dir: Path) -> None:
    health = Health(data_dir, identity=WorkerIdentity(1, 1))
    own = health.own_status()
    assert own is not None
    fleet.write_status(data_dir, own)
    document = json.loads(fleet.status_path(data_dir, 1).read_text())
    assert document["pid"] == os.getpid()
    assert document["ready"] is True
