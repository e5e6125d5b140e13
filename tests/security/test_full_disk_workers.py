"""A full data-dir disk never kills a worker (issue 14's leftover).

With `--workers 2` the workers keep their metrics in files they map into memory, under
the data dir. Made with holes, a mapped page got its block only when first touched, and
on a full disk the kernel answered that touch with SIGBUS: a request that created a new
metric series (a new registry, status or refusal reason), or a worker starting, killed
the worker and dropped its clients' connections (`patches/prometheus.py`).

Here the data dir is a small tmpfs filled to its last page. Anonymous clients send
requests that make new series through both workers, and skopeo pulls pass through:
every request is answered (errors as OCI JSON, never a dropped connection), the pulls
are byte-exact, and no worker dies (the same pids before and after, in the supervisor's
log, the process table and `/readyz`). A worker killed meanwhile (an operator's SIGKILL)
is replaced by one that starts on the full disk and serves, and the supervisor lives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess
from tests.infra.tmpfs import fill_up, mounted_tmpfs
from tests.infra.workers import clients_by_worker, current_pids, labels_seen, wait_for
from tests.integration.test_pull import assert_blobs_pulled, pulled_manifest_digest, skopeo_copy
from vpsrelay.registry_config import BUILTIN_REGISTRIES

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration

PROBES = 40  # new connections before each worker holds one
DIGEST = "sha256:" + "b" * 64
DISK = "8m"


_fillers = itertools.count()


def fill_every_page(disk: Path) -> None:
    """No free block left (again: the relay frees some, e.g. a dead worker's files):
    `fill_up`'s 64 KiB writes, then page by page."""
    n = next(_fillers)
    fill_up(disk, f"filler-{n}")
    with (disk / f"pages-{n}").open("wb", buffering=0) as f, contextlib.suppress(OSError):
        for _ in range(64 * 1024 // 4096 + 1):
            f.write(b"\0" * 4096)


def new_series_requests() -> Iterator[tuple[str, str]]:
    """Requests that each worker has not counted yet: every built-in registry (its
    upstream a dead loopback port: 502), a blob the registry lacks, a token, and the
    methods and paths the relay refuses (each its own status and reason)."""
    for registry in BUILTIN_REGISTRIES:
        prefix = f"/v2/{registry.name}/fulldisk/probe"
        yield "GET", f"{prefix}/manifests/latest"
        yield "GET", f"{prefix}/blobs/{DIGEST}"
        yield "DELETE", f"{prefix}/manifests/latest"
        yield "GET", f"/token?service={registry.name}&scope=repository:fulldisk/probe:pull"
    yield "GET", "/v2/library/alpine/manifests/no-such-tag"
    yield "GET", f"/v2/library/alpine/blobs/{DIGEST}"
    yield "GET", "/v2/library/../etc/manifests/latest"
    yield "PUT", "/v2/library/alpine/manifests/latest"
    yield "GET", "/no-such-path"


def assert_answered(response: httpx.Response) -> None:
    """An answer, and an error answer under /v2/ is OCI JSON."""
    path = response.request.url.path
    if response.status_code >= 400 and path.startswith("/v2/"):
        assert response.headers["content-type"].startswith("application/json"), path
        assert response.json()["errors"][0]["code"], path


def worker_pids_in_readyz(relay: RelayProcess) -> dict[str, int]:
    body = httpx.get(f"{relay.url}/readyz", timeout=10).json()
    return {entry["worker"]: entry["pid"] for entry in body["workers"]}


@pytest.fixture
def full_disk_relay(clean_hub: Hub, tmp_path: Path) -> Iterator[tuple[RelayProcess, Path]]:
    """Two workers on a data dir of its own tmpfs (not yet full); the hub as docker.io."""
    with (
        mounted_tmpfs(tmp_path / "disk", DISK) as disk,
        RelayProcess(
            tmp_path / "relay",
            "--workers", "2",
            "--data-dir", str(disk / "data"),
            "--upstream", f"docker.io={clean_hub.registry_url}",
            # The faulting frame in the log when a worker dies of a signal.
            env={"PYTHONFAULTHANDLER": "1"},
        ) as relay,
    ):  # fmt: skip
        yield relay, disk


def test_a_full_data_dir_disk_kills_no_worker(
    full_disk_relay: tuple[RelayProcess, Path], clean_hub: Hub, tmp_path: Path
) -> None:
    relay, disk = full_disk_relay
    before = current_pids(relay)
    assert set(before) == {"w1", "w2"}
    with clients_by_worker(relay, 1, PROBES) as by_worker:
        dropped: list[str] = []
        for label, (client,) in sorted(by_worker.items()):
            fill_every_page(disk)
            for method, path in new_series_requests():
                try:
                    assert_answered(client.request(method, f"{relay.url}{path}"))
                except httpx.TransportError as exc:
                    dropped.append(f"{label} {method} {path}: {exc!r}")
        assert dropped == [], relay.log_text()[-6000:]
    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    for attempt in range(2):  # on new connections: the kernel may hand them to either worker
        out = tmp_path / f"pull{attempt}"
        out.mkdir()
        skopeo_copy(out, f"{relay.url.removeprefix('http://')}/alpine:latest")
        assert pulled_manifest_digest(out) == image.manifest_digest
        assert_blobs_pulled(out, image)
    assert labels_seen(relay, PROBES) == {"w1", "w2"}
    metrics = httpx.get(f"{relay.url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "vpsrelay_requests_total" in metrics.text
    assert relay.process.poll() is None  # the supervisor, which folds dead workers' files
    log = relay.log_text()
    assert "exited with signal" not in log, log[-6000:]
    assert "Fatal Python error" not in log, log[-6000:]
    assert "new series are not counted while this fails: [Errno 28]" in log  # it was full
    assert current_pids(relay) == before
    assert relay.worker_pids() == sorted(before.values())
    assert worker_pids_in_readyz(relay) == before


def test_a_worker_replaced_on_a_full_disk_starts_and_serves(
    full_disk_relay: tuple[RelayProcess, Path],
) -> None:
    """A worker killed by someone else is replaced by one that starts (its metrics files
    cannot be made: it counts in memory) and serves; the supervisor folds the dead one's
    files or leaves them, and lives."""
    relay, disk = full_disk_relay
    before = current_pids(relay)
    fill_every_page(disk)
    os.kill(before["w1"], signal.SIGKILL)

    def replaced() -> bool:
        fill_every_page(disk)  # what the supervisor frees of the dead worker's, taken again
        return current_pids(relay)["w1"] != before["w1"]

    wait_for("w1's successor", replaced, 20)
    assert labels_seen(relay, PROBES) == {"w1", "w2"}
    with clients_by_worker(relay, 1, PROBES) as by_worker:
        for _label, (client,) in sorted(by_worker.items()):
            for method, path in new_series_requests():
                assert_answered(client.request(method, f"{relay.url}{path}"))
    assert relay.process.poll() is None
    log = relay.log_text()
    assert log.count("exited with signal") == 1, log[-6000:]  # the SIGKILL
    assert "exited with signal SIGKILL" in log
    assert "worker=w1 msg=\"cannot make this worker's metrics files" in log  # it was full
    assert "Fatal Python error" not in log, log[-6000:]
    after = current_pids(relay)
    assert after["w2"] == before["w2"]
    assert relay.worker_pids() == sorted(after.values())
    assert httpx.get(f"{relay.url}/metrics", timeout=10).status_code == 200


def test_a_scrape_survives_an_empty_or_cut_metrics_file(
    full_disk_relay: tuple[RelayProcess, Path],
) -> None:
    """Review 15b, finding 3: the library's reader fails on a file shorter than its header
    with `struct.error` (not an OSError), which the scrape did not turn into its 503. An
    empty file (made by an older version, its maker dead before sizing it) is skipped;
    a cut one gets the 503 from every worker; neither ends a worker."""
    relay, disk = full_disk_relay
    before = current_pids(relay)
    metrics_dir = disk / "data" / "run" / "metrics"
    assert sorted(metrics_dir.glob("*.db")), "no metrics files: wrong directory"
    (metrics_dir / "histogram_999999.db").write_bytes(b"")
    with clients_by_worker(relay, 1, PROBES) as by_worker:
        for label, (client,) in sorted(by_worker.items()):
            answer = client.get(f"{relay.url}/metrics")
            assert answer.status_code == 200, (label, answer.text[:500])
            assert "vpsrelay_requests_total" in answer.text
        (metrics_dir / "counter_999998.db").write_bytes((4096).to_bytes(4, "little") + bytes(12))
        for label, (client,) in sorted(by_worker.items()):
            answer = client.get(f"{relay.url}/metrics")
            assert (answer.status_code, answer.text) == (
                503,
                "503 the workers' metrics are unreadable\n",
            ), label
        (metrics_dir / "counter_999998.db").unlink()
        for _label, (client,) in sorted(by_worker.items()):
            assert client.get(f"{relay.url}/metrics").status_code == 200
    assert "a metrics file is cut short" in relay.log_text()
    assert current_pids(relay) == before
