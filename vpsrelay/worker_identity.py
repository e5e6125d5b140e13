"""Which worker process this is, for logs, metrics, health and state shared between workers.

With `server.workers` > 1 a supervising parent starts the workers (`server.py`'s caller),
each with `_VPSRELAY_WORKER=N/COUNT` in its environment (1 <= N <= COUNT). The name starts
with an underscore: it is not a setting (`VPSRELAY_*` variables are, and unknown ones are
refused), and users never set it. A relay started without it is the single process of
`workers = 1`: number 0, count 1.

Files every worker of one relay shares live under `<data_dir>/run/`: `metrics/` (the
prometheus-client multiprocess directory, `PROMETHEUS_MULTIPROC_DIR`) and `workers/`
(one status file per worker, read by `/readyz` and `vpsrelay check`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

ENVIRONMENT_NAME = "_VPSRELAY_WORKER"
_FORM = re.compile(r"([1-9][0-9]{0,3})/([1-9][0-9]{0,3})")


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    number: int  # 1..count under the supervisor; 0 for the single process of workers = 1
    count: int

    @property
    def supervised(self) -> bool:
        return self.number > 0

    @property
    def label(self) -> str:
        """How logs name this process: `w1`, `w2`, ...; `main` when it is the only one."""
        return f"w{self.number}" if self.supervised else "main"

    def environment_value(self) -> str:
        return f"{self.number}/{self.count}"


SINGLE = WorkerIdentity(0, 1)


def parse(value: str | None) -> WorkerIdentity:
    """The identity in `_VPSRELAY_WORKER`; `SINGLE` when unset.

    Raises:
        ValueError: the value is not `N/COUNT` with 1 <= N <= COUNT.
    """
    if not value:
        return SINGLE
    match = _FORM.fullmatch(value)
    if match is None or int(match[1]) > int(match[2]):
        raise ValueError(f"{ENVIRONMENT_NAME} must be N/COUNT with 1 <= N <= COUNT, not {value!r}")
    return WorkerIdentity(int(match[1]), int(match[2]))


def current() -> WorkerIdentity:
    """This process's identity (from the environment the supervisor gave it)."""
    # Not a setting: the supervisor sets it for the process it starts.
    return parse(os.environ.get(ENVIRONMENT_NAME))  # noqa: TID251


def run_dir(data_dir: Path) -> Path:
    """Per-relay files shared by its workers; recreated by the supervisor at each start."""
    return data_dir / "run"


def metrics_dir(data_dir: Path) -> Path:
    return run_dir(data_dir) / "metrics"


def status_dir(data_dir: Path) -> Path:
    return run_dir(data_dir) / "workers"
