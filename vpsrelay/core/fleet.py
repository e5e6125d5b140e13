"""Which of a relay's workers serve, from the status each one writes (sans-IO).

Each worker writes a small status (its pid, when it started, a heartbeat, its own checks)
every `HEARTBEAT_SECONDS`; `/readyz`, `/metrics` and `vpsrelay check` read them all. Times
are the system-wide monotonic clock (the same in every process of one host, and immune to
the wall clock being stepped), so a heartbeat's age means the same in any worker.

The relay is ready while at least one worker is ready (and the relay-level checks pass):
the kernel hands new connections only to workers that listen, and the supervisor restarts
a dead one within a second or so, so taking the whole relay out of a load balancer for it
would turn a partial fault into an outage. Each worker's state is in the body.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from collections.abc import Mapping

HEARTBEAT_SECONDS = 2.0
# No heartbeat for this long: the worker is hung (its event loop is blocked) or gone.
STALE_SECONDS = 10.0
# A status larger than this is not one the relay wrote: it is ignored, unread.
MAX_STATUS_BYTES = 16 * 1024


class State(enum.StrEnum):
    READY = "ready"  # heartbeat fresh, its own checks pass
    UNREADY = "unready"  # alive, but its own checks fail (no certificate loaded yet)
    DRAINING = "draining"  # stopping: finishes its pulls, takes no new connection
    STALE = "stale"  # its process exists but its heartbeat stopped: hung
    EXITED = "exited"  # the supervisor saw it end (it restarts it), or its process is gone
    STARTING = "starting"  # no status yet: started, or being restarted, not yet serving


# States whose process is there and holds listeners (it may serve a client its certificate).
SERVING_STATES = frozenset({State.READY, State.UNREADY, State.DRAINING, State.STALE})


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What one worker says about itself in `<status_dir>/<number>.json`."""

    number: int
    pid: int
    started: float  # monotonic
    heartbeat: float  # monotonic
    ready: bool = True
    checks: dict[str, str] = field(default_factory=dict)
    certificate_not_after: float | None = None  # Unix time, when TLS serves one
    draining: bool = False
    exited: bool = False  # written by the supervisor's `worker_exited`

    @property
    def label(self) -> str:
        return f"w{self.number}"

    def to_json(self) -> str:
        return json.dumps(
            {
                "number": self.number,
                "pid": self.pid,
                "started": self.started,
                "heartbeat": self.heartbeat,
                "ready": self.ready,
                "checks": self.checks,
                "certificate_not_after": self.certificate_not_after,
                "draining": self.draining,
                "exited": self.exited,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerStatus | None:
        """The status in `text`; None for anything malformed (a torn or foreign file)."""
        if len(text) > MAX_STATUS_BYTES:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        number, pid = data.get("number"), data.get("pid")
        started, heartbeat = data.get("started"), data.get("heartbeat")
        checks, not_after = data.get("checks", {}), data.get("certificate_not_after")
        flags = [data.get(name, False) for name in ("ready", "draining", "exited")]
        if not (_positive_int(number) and _positive_int(pid)):
            return None
        if not (_finite(started) and _finite(heartbeat)):
            return None
        if not isinstance(checks, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checks.items()
        ):
            return None
        if not_after is not None and not _finite(not_after):
            return None
        if not all(isinstance(flag, bool) for flag in flags):
            return None
        return cls(
            number=number,
            pid=pid,
            started=float(started),
            heartbeat=float(heartbeat),
            ready=flags[0],
            checks=dict(checks),
            certificate_not_after=None if not_after is None else float(not_after),
            draining=flags[1],
            exited=flags[2],
        )

    def marked_exited(self) -> WorkerStatus:
        return replace(self, exited=True, ready=False)


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as `/readyz` reports it."""

    number: int
    state: State
    pid: int | None = None
    heartbeat_age: float | None = None  # seconds
    uptime: float | None = None  # seconds
    checks: dict[str, str] = field(default_factory=dict)
    certificate_not_after: float | None = None

    @property
    def label(self) -> str:
        return f"w{self.number}"

    def report(self, *, detailed: bool) -> dict[str, object]:
        """The JSON entry; the pid only for whom `/metrics` answers (host detail)."""
        entry: dict[str, object] = {"worker": self.label, "state": self.state.value}
        if self.heartbeat_age is not None:
            entry["heartbeat_seconds_ago"] = round(self.heartbeat_age, 1)
        if self.uptime is not None:
            entry["uptime_seconds"] = round(self.uptime, 1)
        failing = {k: v for k, v in self.checks.items() if v not in ("ok", "off")}
        if failing:
            entry["checks"] = failing
        if detailed and self.pid is not None:
            entry["pid"] = self.pid
        return entry


@dataclass(frozen=True, slots=True)
class FleetView:
    """Every worker's state and the verdict for the relay."""

    workers: tuple[WorkerView, ...]

    def count(self, state: State) -> int:
        return sum(1 for worker in self.workers if worker.state is state)

    @property
    def ready(self) -> bool:
        """At least one worker serves (see the module's docstring for why one is enough)."""
        return self.count(State.READY) > 0

    @property
    def all_ready(self) -> bool:
        return self.count(State.READY) == len(self.workers)

    def summary(self) -> str:
        """`ok`, or how many are ready and what the others are doing."""
        if self.all_ready:
            return "ok"
        others = ", ".join(
            f"{w.label} {w.state.value}" for w in self.workers if w.state is not State.READY
        )
        return f"{self.count(State.READY)} of {len(self.workers)} workers ready ({others})"

    def oldest_certificate(self) -> float | None:
        """The earliest expiry among the certificates the serving workers hold."""
        values = [
            w.certificate_not_after
            for w in self.workers
            if w.state in SERVING_STATES and w.certificate_not_after is not None
        ]
        return min(values) if values else None


def assess(
    count: int,
    statuses: Mapping[int, WorkerStatus],
    now: float,
    gone_pids: frozenset[int] = frozenset(),
) -> FleetView:
    """The state of workers 1..`count` from their statuses (`now`: monotonic).

    `gone_pids`: pids the caller found without a process (a worker SIGKILLed before the
    supervisor noted it). The caller puts its own fresh status in `statuses`.
    """
    views: list[WorkerView] = []
    for number in range(1, count + 1):
        status = statuses.get(number)
        if status is None:
            views.append(WorkerView(number, State.STARTING))
            continue
        age = max(0.0, now - status.heartbeat)
        views.append(
            WorkerView(
                number,
                _state(status, age, gone=status.pid in gone_pids),
                pid=status.pid,
                heartbeat_age=age,
                uptime=max(0.0, now - status.started),
                checks=status.checks,
                certificate_not_after=status.certificate_not_after,
            )
        )
    return FleetView(tuple(views))


def _state(status: WorkerStatus, age: float, *, gone: bool) -> State:
    if status.exited or gone:
        return State.EXITED
    if status.draining:
        return State.DRAINING  # it stopped its heartbeat on purpose; the grace period ends it
    if age > STALE_SECONDS:
        return State.STALE
    return State.READY if status.ready else State.UNREADY


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
