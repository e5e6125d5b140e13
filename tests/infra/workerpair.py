"""Two workers of one relay, started the way the supervisor starts them.

`fleet.prepare` on the data dir, then two `vpsrelay serve` processes on that data dir,
each with `_VPSRELAY_WORKER=N/2` and `PROMETHEUS_MULTIPROC_DIR=<data_dir>/run/metrics`,
on ports of their own (so a test can ask each in turn). With the supervisor, this is one
`RelayProcess(..., "--workers", "2")` on one port, the supervisor calling
`fleet.worker_exited` itself; the tests find workers' pids in their status files, which
both ways write.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from tests.infra.relay import RelayProcess
from vpsrelay import worker_identity
from vpsrelay.ops import fleet

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

COUNT = 2
# Alone a relay says "listening on URL"; a supervised worker may say "worker w1 serving URL"
# instead (the supervisor says "listening" for all): either line means it serves.
_SERVING = re.compile(r'(?:listening on|serving) (https?://[^\s"]+)')


class _Worker(RelayProcess):
    def _wait_listening(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := _SERVING.findall(self.log_text()):
                return found
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.process.returncode}:\n{self.log_text()}"
                )
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"worker did not start within {timeout}s:\n{self.log_text()}")


@dataclass
class WorkerPair:
    data_dir: Path
    processes: list[RelayProcess]  # worker N is processes[N - 1]

    @property
    def urls(self) -> list[str]:
        return [process.url for process in self.processes]

    def pid(self, number: int) -> int:
        """Worker `number`'s pid, as its status file says."""
        return fleet.read_statuses(self.data_dir)[number].pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until `/readyz` reports every worker ready (status files written)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.urls[0]}/readyz", timeout=timeout).json()
            states = [entry["state"] for entry in body.get("workers", [])]
            if states == ["ready"] * COUNT:
                return
            time.sleep(0.05)
        raise AssertionError(f"workers not ready within {timeout}s: {body}")

    def streaming_worker(self) -> int:
        """The number of the one worker with a response body in flight (from its live
        `vpsrelay_active_streams` file): whichever worker the kernel gave the connection."""
        from prometheus_client.mmap_dict import MmapedDict

        holders = []
        for path in worker_identity.metrics_dir(self.data_dir).glob("gauge_livesum_*.db"):
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
                if '"vpsrelay_active_streams"' in key and value > 0:
                    holders.append(int(path.stem.rpartition("_")[2]))
        assert len(holders) == 1, holders
        numbers = [n for n, s in fleet.read_statuses(self.data_dir).items() if s.pid in holders]
        assert len(numbers) == 1, numbers
        return numbers[0]

    def kill(self, number: int) -> int:
        """SIGKILL worker `number`, reap it and tell the fleet files, as the supervisor
        does; returns its pid."""
        pid = self.pid(number)
        process = self.processes[number - 1]
        assert process.process.pid == pid
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(10)
        fleet.worker_exited(self.data_dir, number, pid)
        return pid


@contextlib.contextmanager
def worker_pair(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[WorkerPair]:
    """Two workers of one relay on one data dir (`args`: the same settings for both)."""
    data_dir = workdir / "data"
    fleet.prepare(data_dir)  # the supervisor's first step
    processes: list[RelayProcess] = []
    try:
        for number in range(1, COUNT + 1):
            worker_env = {
                **(env or {}),
                worker_identity.ENVIRONMENT_NAME: f"{number}/{COUNT}",
                "PROMETHEUS_MULTIPROC_DIR": str(worker_identity.metrics_dir(data_dir)),
            }
            processes.append(
                _Worker(workdir / f"w{number}", *args, "--data-dir", str(data_dir), env=worker_env)
            )
        yield WorkerPair(data_dir, processes)
    finally:
        for process in processes:
            process.close()
