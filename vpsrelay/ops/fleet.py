"""The files a relay's workers share under `<data_dir>/run/`: metrics and status.

The supervisor holds `hold_run_dir`'s lock for its life (one supervisor per data dir),
calls `prepare` before it starts any worker and `worker_exited` when one ends; each
worker keeps its status file fresh (`keep_status`); `/metrics`, `/readyz` and `vpsrelay
check` read what the workers wrote (`survey`, `metrics_lock`).

Status files are `<status_dir>/<number>.json`, replaced whole (a temporary file renamed
over it), so a reader never sees half of one, and a worker SIGKILLed mid-write leaves the
last whole one. The metrics files are prometheus-client's (multiprocess mode), one set per
worker pid; when a worker ends, its live gauges are dropped and its counters, histograms
and other gauges folded into one `*_archive.db` per kind, so restarts do not make every
scrape read more files. Folding and reading hold an `fcntl` lock (exclusive, shared), so
a scrape never counts a dead worker's numbers twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from vpsrelay import private_files, worker_identity
from vpsrelay.core.fleet import HEARTBEAT_SECONDS, MAX_STATUS_BYTES, WorkerStatus, assess

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from vpsrelay.core.fleet import FleetView

log = logging.getLogger("vpsrelay.fleet")

_STATUS_NAME = re.compile(r"([1-9][0-9]{0,3})\.json")
_LOCK_NAME = ".lock"
_SUPERVISOR_LOCK_NAME = ".supervisor"  # held by the supervisor using this run directory
ARCHIVE = "archive"  # stands where the pid is in a folded file's name


class RunDirTaken(OSError):
    """Another supervisor runs on this data dir; its `run/` was left alone."""


def hold_run_dir(data_dir: Path) -> int:
    """Lock `<data_dir>/run/` for this supervisor's life (the kernel drops the lock when
    it ends, however); the descriptor holds it: keep it open.

    Raises:
        RunDirTaken: another supervisor holds it.
        OSError: the lock file cannot be opened.
    """
    run = worker_identity.run_dir(data_dir)
    private_files.make_dir(run)
    fd = private_files.open_file(run / _SUPERVISOR_LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirTaken(
            f"another relay with workers already runs on the data dir {data_dir}"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare(data_dir: Path) -> None:
    """Empty the run directory: nothing an earlier run's workers wrote is counted.
    Only under `hold_run_dir`: the files may be another running relay's otherwise."""
    run = worker_identity.run_dir(data_dir)
    for directory in (worker_identity.metrics_dir(data_dir), worker_identity.status_dir(data_dir)):
        shutil.rmtree(directory, ignore_errors=True)
    private_files.make_dir(run)
    private_files.make_dir(worker_identity.metrics_dir(data_dir))
    private_files.make_dir(worker_identity.status_dir(data_dir))


def worker_exited(data_dir: Path, number: int, pid: int) -> None:
    """Worker `number` (process `pid`) ended: its live gauges leave the totals, what it
    counted stays in them (folded), and its status says it exited."""
    from prometheus_client import multiprocess  # the supervisor needs it only here

    metrics = worker_identity.metrics_dir(data_dir)
    try:
        with metrics_lock(metrics, exclusive=True):
            multiprocess.mark_process_dead(pid, str(metrics))  # type: ignore[no-untyped-call]
            fold_dead_worker(metrics, pid)
    except OSError as exc:
        log.warning("metrics of worker %d (pid %d) not folded: %s", number, pid, exc)
    try:
        _mark_exited(data_dir, number, pid)
    except OSError as exc:
        log.warning("status of worker %d (pid %d) not updated: %s", number, pid, exc)


# --- status files


def status_path(data_dir: Path, number: int) -> Path:
    return worker_identity.status_dir(data_dir) / f"{number}.json"


def write_status(data_dir: Path, status: WorkerStatus) -> None:
    """Replace worker `status.number`'s file whole.

    Raises:
        OSError: the file cannot be written.
    """
    final = status_path(data_dir, status.number)
    temporary = final.with_name(f".{status.number}.json.{os.getpid()}.tmp")
    fd = private_files.open_file(temporary, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(status.to_json())
    os.replace(temporary, final)


def status_writable(data_dir: Path) -> bool:
    """Whether a status file could be written now (a full or read-only disk says no: a
    worker's heartbeat may have stopped for that, not because it hangs)."""
    probe = worker_identity.status_dir(data_dir) / f".probe.{os.getpid()}.tmp"
    try:
        fd = private_files.open_file(probe, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, b" " * (MAX_STATUS_BYTES // 16))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return True


def read_statuses(data_dir: Path) -> dict[int, WorkerStatus]:
    """Every whole status file, by worker number; unreadable or malformed ones left out."""
    directory = worker_identity.status_dir(data_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    statuses: dict[int, WorkerStatus] = {}
    for name in names:
        match = _STATUS_NAME.fullmatch(name)
        if match is None:
            continue
        try:
            with open(directory / name, "rb") as f:
                text = f.read(MAX_STATUS_BYTES + 1)
        except OSError:
            continue
        status = WorkerStatus.from_json(text)
        if status is not None and status.number == int(match[1]):
            statuses[status.number] = status
    return statuses


def _mark_exited(data_dir: Path, number: int, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        # A write the worker began and never finished.
        os.unlink(status_path(data_dir, number).with_name(f".{number}.json.{pid}.tmp"))
    current = read_statuses(data_dir).get(number)
    if current is not None and current.pid != pid:
        return  # its successor has written already
    if current is None:
        now = time.monotonic()
        current = WorkerStatus(number=number, pid=pid, started=now, heartbeat=now)
    write_status(data_dir, current.marked_exited())


def process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (SIGKILLed, not yet reaped by the supervisor)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # someone else's: it exists
        return False
    state = stat.rpartition(b")")[2].split(maxsplit=1)[:1]
    return state in ([b"Z"], [b"X"])


def survey(data_dir: Path, count: int, own: WorkerStatus) -> FleetView:
    """Every worker's state, this one's from `own` (fresh) rather than its file."""
    statuses = read_statuses(data_dir)
    statuses[own.number] = own
    gone = frozenset(
        status.pid
        for status in statuses.values()
        if status.number != own.number and not status.exited and process_gone(status.pid)
    )
    return assess(count, statuses, time.monotonic(), gone)


async def keep_status(
    data_dir: Path, status: Callable[[], WorkerStatus | None], stop: trio.Event
) -> None:
    """Write this worker's status every `HEARTBEAT_SECONDS` until `stop`; then once more,
    draining, and return. Nothing to do for the single process of `workers = 1`."""
    failing = False
    while (current := status()) is not None:
        if stop.is_set():
            current = replace(current, draining=True, ready=False)
        try:
            await trio.to_thread.run_sync(write_status, data_dir, current)
        except OSError as exc:
            if not failing:  # said once per failing streak, not every heartbeat
                log.warning("cannot write this worker's status: %s", exc)
            failing = True
        else:
            failing = False
        if stop.is_set():
            return
        with trio.move_on_after(HEARTBEAT_SECONDS):
            await stop.wait()


# --- metrics files (prometheus-client's multiprocess directory)


@contextlib.contextmanager
def metrics_lock(metrics_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Held shared while a scrape reads the files, exclusive while a dead worker's fold.

    Raises:
        OSError: the directory is missing or not writable.
    """
    fd = private_files.open_file(metrics_dir / _LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def fold_dead_worker(metrics_dir: Path, pid: int) -> None:
    """Fold worker `pid`'s remaining files into the archives (hold the exclusive lock).

    Counters, histograms and `sum` gauges add up; `max`/`min` gauges keep the extreme,
    `mostrecent` ones the latest value. `all` gauges (one series per pid) stay as they are.
    """
    for leftover in metrics_dir.glob(f"*.{pid}.new"):  # killed while making a file
        leftover.unlink(missing_ok=True)
    for path in sorted(metrics_dir.glob(f"*_{pid}.db")):
        kind = path.name[: -len(f"_{pid}.db")]  # counter, histogram, gauge_<mode>
        mode = kind.partition("_")[2]
        if kind.startswith("gauge_") and mode not in _GAUGE_FOLDS:
            continue
        _fold_into(metrics_dir / f"{kind}_{ARCHIVE}.db", path, _GAUGE_FOLDS.get(mode, _add))


_Value = tuple[float, float]  # (value, timestamp)


def _add(old: _Value, new: _Value) -> _Value:
    return (old[0] + new[0], 0.0)


def _latest(old: _Value, new: _Value) -> _Value:
    return new if new[1] >= old[1] else old


_GAUGE_FOLDS: dict[str, Callable[[_Value, _Value], _Value]] = {
    "sum": _add,
    "max": lambda old, new: max(old, new),
    "min": lambda old, new: min(old, new),
    "mostrecent": _latest,
}


def _fold_into(archive: Path, dead: Path, fold: Callable[[_Value, _Value], _Value]) -> None:
    from prometheus_client.mmap_dict import MmapedDict

    merged: dict[str, _Value] = {}
    for source in (archive, dead):
        # Empty: its worker died between making the file and sizing it (nothing counted).
        if not source.exists() or source.stat().st_size == 0:
            continue
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(source)):  # type: ignore[no-untyped-call]
            new = (float(value), float(timestamp))
            merged[key] = fold(merged[key], new) if key in merged else new
    # Not `*.db` until whole: a scrape never reads it half written.
    temporary = archive.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    folded = MmapedDict(str(temporary))  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in merged.items():
            folded.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        folded.close()  # type: ignore[no-untyped-call]
    os.chmod(temporary, private_files.FILE_MODE)
    os.replace(temporary, archive)
    # A crash right here would count `dead` twice until the next start (`prepare`).
    dead.unlink()
