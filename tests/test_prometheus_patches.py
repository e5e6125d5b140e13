"""`patches/prometheus.py`: the metrics files that workers map are allocated, never holes.

A page of a mapped file that has no block on disk gets one when first touched; on a full
disk the kernel answers with SIGBUS (tests/security/test_full_disk_workers.py shows the
worker dying of it). These tests need no full disk: a file's allocated blocks say whether
it has holes, and a failing allocation is simulated where its handling is the point.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import inspect
import logging
import os
import sqlite3
import struct
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client import mmap_dict, values
from prometheus_client.mmap_dict import MmapedDict

from tests.test_library_patches import fake_versions, settings
from vpsrelay import patches as library_patches
from vpsrelay.ops import fleet as fleet_files
from vpsrelay.ops.metrics import Metrics
from vpsrelay.patches import hypercorn as hypercorn_patches, prometheus as prometheus_patches
from vpsrelay.worker_identity import WorkerIdentity

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[1]

# sha256 of prometheus-client 0.26.0's code the patch replaces or relies on: `mmap_dict`
# whole (the two methods replaced, the helpers and constants they use, the reader) and the
# value class that makes the files. A changed hash means: re-read it, re-check the patch.
SOURCES = {
    "prometheus_client.mmap_dict": (
        "fade3d932c191c51e4d83f485adba7a8a16daf978482237e463156835e8913e4"
    ),
    "MultiProcessValue": "8077cd2c482fc32e0d3ce5383a526a70b0aa97b714902d2a0564e2199977cbdc",
}


def _sources() -> dict[str, object]:
    return {"prometheus_client.mmap_dict": mmap_dict, "MultiProcessValue": values.MultiProcessValue}


def test_the_code_the_patch_replaces_is_unchanged() -> None:
    for name, function in _sources().items():
        digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()  # type: ignore[arg-type]
        assert digest == SOURCES[name], f"{name} changed in prometheus-client: re-check the patch"


def test_prometheus_client_is_pinned() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "prometheus-client==0.26.0" in project["project"]["dependencies"]
    assert "prometheus-client==0.26.0" in (REPO / "constraints.txt").read_text().splitlines()
    assert prometheus_patches.PINNED == {"prometheus-client": "0.26.0"}
    assert prometheus_patches.versions_match()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture
def unpatched(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, function in prometheus_patches.UNPATCHED.items():
        monkeypatch.setattr(MmapedDict, name, function)


@pytest.fixture
def patched() -> None:
    prometheus_patches.apply()
    assert prometheus_patches.applied()


def _grow(d: MmapedDict, count: int) -> None:
    for i in range(count):  # ~220 bytes a key: 400 are past the first 64 KiB
        key = f'["vpsrelay_requests_total", {{"registry": "r{i:04}"}}, "{"help " * 30}"]'
        d.write_value(key, 1.0, 0.0)  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("unpatched")
def test_unpatched_files_are_holes_where_nothing_was_written(tmp_path: Path) -> None:
    """What the patch is for: the library's own files are sparse (so the test below can fail)."""
    path = tmp_path / "counter_1.db"
    d = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    _grow(d, 400)
    assert allocated(path) < path.stat().st_size
    d.close()  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("patched")
def test_patched_files_are_allocated_whole_when_made_and_grown(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    d = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    assert path.stat().st_size == 64 * 1024
    assert allocated(path) >= path.stat().st_size
    _grow(d, 400)
    assert path.stat().st_size > 64 * 1024
    assert allocated(path) >= path.stat().st_size
    d.close()  # type: ignore[no-untyped-call]
    values_read = list(MmapedDict.read_all_values_from_file(str(path)))  # type: ignore[no-untyped-call]
    assert len(values_read) == 400


def _full_disk(fd: int, size: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.usefixtures("patched")
def test_a_failed_allocation_raises_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as full:
        full.setattr(prometheus_patches, "_allocate", _full_disk)
        with pytest.raises(OSError, match="No space"):
            MmapedDict(str(tmp_path / "gauge_max_1.db"))  # type: ignore[no-untyped-call]
    assert list(tmp_path.iterdir()) == []  # no empty file a scrape could not parse

    path = tmp_path / "counter_1.db"
    d = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    d.write_value("old", 1.0, 0.0)  # type: ignore[no-untyped-call]
    with monkeypatch.context() as full:
        full.setattr(prometheus_patches, "_allocate", _full_disk)
        with pytest.raises(OSError, match="No space"):
            _grow(d, 400)
        grown = len(d._positions)  # the keys that fitted in the allocated 64 KiB
        assert 100 < grown < 400
        d.write_value("old", 2.0, 0.0)  # type: ignore[no-untyped-call]
    assert d.read_value("old") == (2.0, 0.0)  # type: ignore[no-untyped-call]
    _grow(d, 400)  # room again: the rest is added
    assert len(d._positions) == 401
    d.close()  # type: ignore[no-untyped-call]
    keys = [key for key, *_ in MmapedDict.read_all_values_from_file(str(path))]  # type: ignore[no-untyped-call]
    assert len(keys) == len(set(keys)) == 401


@pytest.mark.usefixtures("patched")
def test_a_key_bigger_than_the_file_is_refused(tmp_path: Path) -> None:
    """The library would grow the file by doublings, truncating to each: holes again."""
    path = tmp_path / "counter_1.db"
    d = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    with pytest.raises(OSError, match="a metrics key of 140000 bytes"):
        d.write_value("k" * 140_000, 1.0, 0.0)  # type: ignore[no-untyped-call]
    d.write_value("small", 1.0, 0.0)  # type: ignore[no-untyped-call]
    assert allocated(path) >= path.stat().st_size == 64 * 1024
    d.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This process as a supervised worker's metrics: file-backed values in `tmp_path`."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    cleanups = values._multi_process_cleanups
    before = len(cleanups)
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # type: ignore[no-untyped-call]
    yield tmp_path
    for close_files in cleanups[before:]:  # this test's value class's open files
        close_files()
    del cleanups[before:]


@pytest.mark.usefixtures("patched")
def test_metrics_drop_a_new_series_on_a_full_disk_and_say_so_once(
    multiprocess: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(identity=WorkerIdentity(1, 2))
    assert metrics.multiprocess_dir == multiprocess
    metrics.request_done("docker.io", "blob", 200, 10)
    monkeypatch.setattr(prometheus_patches, "_allocate", _full_disk)
    with caplog.at_level(logging.WARNING, "vpsrelay.metrics"):
        for i in range(400):  # never raises: the series that do not fit are not counted
            metrics.request_done(f"registry{i}.example", "blob", 200, 10)
            metrics.upstream_answered(f"registry{i}.example", "blob", 200, 0.1)
    assert caplog.text.count("new series are not counted") == 1
    metrics.request_done("docker.io", "blob", 200, 10)  # an existing series still counts
    body = metrics.render().decode()
    assert 'vpsrelay_requests_total{kind="blob",registry="docker.io",status="200"} 2.0' in body


@pytest.mark.usefixtures("patched")
def test_a_worker_that_cannot_make_its_files_counts_in_memory(
    multiprocess: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(prometheus_patches, "_allocate", _full_disk)
    with caplog.at_level(logging.WARNING, "vpsrelay.metrics"):
        metrics = Metrics(identity=WorkerIdentity(1, 2))
    assert "cannot make this worker's metrics files" in caplog.text
    metrics.request_done("docker.io", "blob", 200, 10)
    metrics.cache_size(5)
    assert values.ValueClass is values.MutexValue
    assert metrics.requests.labels("docker.io", "blob", "200")._value.get() == 1.0
    assert list(multiprocess.glob("*.db")) == []
    metrics.render()  # the other workers' files, if any: this one's are not there


def test_sqlite_allocates_the_shm_pages_it_maps(tmp_path: Path) -> None:
    """cache.db's and limits.db's `-shm` files are mapped too, but SQLite writes a byte into
    each new page before it maps it (a failed write is an error, not a signal): no holes,
    even grown past its first 32 KiB (more than 4096 WAL frames)."""
    path = tmp_path / "cache.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA page_size = 512")
        db.execute("PRAGMA journal_mode = wal")
        db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute("CREATE TABLE t (x BLOB)")
        for _ in range(5000):
            db.execute("INSERT INTO t VALUES (zeroblob(100))")
        shm = tmp_path / "cache.db-shm"
        assert shm.stat().st_size > 32 * 1024
        assert allocated(shm) >= shm.stat().st_size
    finally:
        db.close()


def test_the_reach_is_a_safety_one_with_workers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_versions(monkeypatch, **{"prometheus-client": "0.27.0"})
    with pytest.raises(hypercorn_patches.PatchError) as raised:
        library_patches.apply_all(settings(**{"server.workers": 2}))
    assert str(raised.value).startswith(
        "prometheus-client 0.27.0 is installed, vpsrelay needs prometheus-client==0.26.0"
    )
    assert library_patches.apply_all(settings(**{"server.workers": 1})) == ()
    degraded = library_patches.apply_all(
        settings(**{"server.workers": 2, "server.allow_unpatched": True})
    )
    assert [(entry.reach, entry.kind) for entry in degraded] == [("prometheus", "safety")]


@pytest.mark.usefixtures("patched")
def test_a_new_file_is_never_seen_empty_while_its_allocation_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 15b, finding 3: the file was made empty, then allocated, then removed on a
    full disk; a scrape globbing `*.db` meanwhile read an empty file and failed."""
    seen: list[list[Path]] = []

    def full_disk_seen_by_a_scrape(fd: int, size: int) -> None:
        seen.append(sorted(tmp_path.glob("*.db")))  # what a scrape would read right now
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as full:
        full.setattr(prometheus_patches, "_allocate", full_disk_seen_by_a_scrape)
        for _ in range(3):  # a worker trying again at each new series
            with pytest.raises(OSError, match="No space"):
                MmapedDict(str(tmp_path / "histogram_7.db"))  # type: ignore[no-untyped-call]
    assert seen == [[], [], []]
    assert list(tmp_path.iterdir()) == []

    def allocate_seen_by_a_scrape(fd: int, size: int) -> None:
        seen.append(sorted(tmp_path.glob("*.db")))
        os.posix_fallocate(fd, 0, size)

    monkeypatch.setattr(prometheus_patches, "_allocate", allocate_seen_by_a_scrape)
    d = MmapedDict(str(tmp_path / "histogram_7.db"))  # type: ignore[no-untyped-call]
    assert seen[-1] == []  # not there until whole
    assert [p.name for p in tmp_path.iterdir()] == ["histogram_7.db"]
    assert allocated(tmp_path / "histogram_7.db") >= 64 * 1024
    d.write_value("k", 1.0, 0.0)  # type: ignore[no-untyped-call]
    d.close()  # type: ignore[no-untyped-call]


def _emulated_fallocate(fd: int, size: int) -> None:
    """glibc's `posix_fallocate` where the file system has no fallocate: it writes a byte
    into each block itself, and refuses a descriptor opened to append."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        raise OSError(errno.EBADF, "Bad file descriptor")
    os.posix_fallocate(fd, 0, size)


@pytest.mark.usefixtures("patched")
def test_files_grow_where_fallocate_is_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 15b, finding 4: growing allocated through the library's own handle, opened
    "a+b" (O_APPEND): every growth failed there."""
    monkeypatch.setattr(prometheus_patches, "_allocate", _emulated_fallocate)
    path = tmp_path / "counter_1.db"
    d = MmapedDict(str(path))  # type: ignore[no-untyped-call]
    _grow(d, 400)
    assert len(d._positions) == 400
    assert allocated(path) >= path.stat().st_size > 64 * 1024
    d.close()  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("patched")
def test_a_failed_growth_names_the_file_and_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = MmapedDict(str(tmp_path / "counter_1.db"))  # type: ignore[no-untyped-call]
    monkeypatch.setattr(prometheus_patches, "_allocate", _full_disk)
    with pytest.raises(OSError, match=r"allocating 131072 bytes of counter_1\.db: No space") as e:
        _grow(d, 400)
    assert e.value.errno == errno.ENOSPC
    d.close()  # type: ignore[no-untyped-call]


@pytest.mark.usefixtures("patched")
def test_a_scrape_skips_an_empty_file_and_refuses_a_cut_one(multiprocess: Path) -> None:
    """An empty `*.db` (made by an older version, its maker dead before sizing it) is
    skipped; a cut one is a `ValueError` (the clean 503), not the library's `struct.error`."""
    metrics = Metrics(identity=WorkerIdentity(1, 2))
    metrics.request_done("docker.io", "blob", 200, 10)
    (multiprocess / "histogram_7.db").write_bytes(b"")
    body = metrics.render().decode()
    assert 'vpsrelay_requests_total{kind="blob",registry="docker.io",status="200"} 1.0' in body
    (multiprocess / "counter_8.db").write_bytes(struct.pack("i", 4096) + b"\0" * 12)
    with pytest.raises(ValueError, match="a metrics file is cut short"):
        metrics.render()


def test_a_dead_workers_half_made_file_is_removed_with_its_files(tmp_path: Path) -> None:
    """A worker killed between making a file under its temporary name and linking it."""
    (tmp_path / "counter_41.db.41.new").write_bytes(b"\0" * 64)
    (tmp_path / "counter_42.db.42.new").write_bytes(b"\0" * 64)
    fleet_files.fold_dead_worker(tmp_path, 41)
    assert [p.name for p in tmp_path.iterdir()] == ["counter_42.db.42.new"]
