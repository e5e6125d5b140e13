"""One relay of two workers (`RelayProcess(..., "--workers", "2")`, the real supervisor),
with what the fleet tests ask of it: each worker's pid from its status file, a wait until
`/readyz` reports both ready, which worker holds a stream (from the live metrics files)
and a SIGKILL of one worker (the supervisor then calls `fleet.worker_exited` and starts a
replacement under the same label)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from tests.infra.relay import RelayProcess
from tests.infra.workers import wait_for
from vpsrelay import worker_identity
from vpsrelay.ops import fleet

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

COUNT = 2


@dataclass
class WorkerPair:
    relay: RelayProcess
    data_dir: Path

    @property
    def url(self) -> str:
        return self.relay.url

    def pid(self, number: int) -> int:
        """Worker `number`'s pid, as its status file says."""
        return fleet.read_statuses(self.data_dir)[number].pid

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until `/readyz` reports every worker ready (status files written)."""
        deadline = time.monotonic() + timeout
        body: object = None
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.url}/readyz", timeout=timeout).json()
            assert isinstance(body, dict)
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

    def kill(self, number: int, timeout: float = 10.0) -> int:
        """SIGKILL worker `number` and wait until the supervisor has told the fleet files
        (it logs the exit after `fleet.worker_exited`); its pid."""
        pid = self.pid(number)
        assert pid in self.relay.worker_pids()
        os.kill(pid, signal.SIGKILL)
        said = f"worker w{number} (pid {pid}) exited with"
        wait_for(f"worker {number}'s exit", lambda: said in self.relay.log_text(), timeout)
        return pid


@contextlib.contextmanager
def worker_pair(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[WorkerPair]:
    """One relay of two workers on `workdir / "data"` (`args`: its settings)."""
    data_dir = workdir / "data"
    with RelayProcess(
        workdir / "relay", "--workers", str(COUNT), *args, "--data-dir", str(data_dir), env=env
    ) as relay:
        yield WorkerPair(relay, data_dir)
