"""The files a relay's workers share under `<data_dir>/run/`: metrics and status.

The supervisor calls `prepare` before it starts any worker and `worker_exited` when one
ends; `/metrics`, `/readyz` and `vpsrelay check` read what the workers wrote.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import TYPE_CHECKING

from vpsrelay import private_files, worker_identity

if TYPE_CHECKING:
    from pathlib import Path


def prepare(data_dir: Path) -> None:
    """Empty the run directory: nothing an earlier run's workers wrote is counted."""
    run = worker_identity.run_dir(data_dir)
    for directory in (worker_identity.metrics_dir(data_dir), worker_identity.status_dir(data_dir)):
        shutil.rmtree(directory, ignore_errors=True)
    private_files.make_dir(run)
    private_files.make_dir(worker_identity.metrics_dir(data_dir))
    private_files.make_dir(worker_identity.status_dir(data_dir))


def worker_exited(data_dir: Path, number: int, pid: int) -> None:
    """Worker `number` (process `pid`) ended: its live gauges leave the totals."""
    from prometheus_client import multiprocess  # the supervisor needs it only here

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(worker_identity.metrics_dir(data_dir)))  # type: ignore[no-untyped-call]
