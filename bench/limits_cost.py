"""What the shared limit state (`<data_dir>/limits.db`) costs a request.

    .venv/bin/python bench/limits_cost.py            # both parts, 3 rounds of 5 s
    .venv/bin/python bench/limits_cost.py --calls 20000 --rounds 5 --seconds 5

Part 1, in one process: microseconds per rate check, the in-memory token bucket (what one
process used before) against the shared one (a write transaction on limits.db), and per
stream slot taken and given back. Part 2, a real relay: `GET /` (the landing page, answered by the relay
itself) under wrk, requests per second and relay CPU per request with
`limits.requests_per_second` off, on in the only process (in memory) and on in a worker
(`_VPSRELAY_WORKER=1/2`: shared); on is set high enough never to refuse, so every request
pays the check. The three alternate in every round so that whatever else runs on the
machine meets them alike.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.infra.relay import RelayProcess
from vpsrelay.access.shared import SharedLimits
from vpsrelay.core import access


def per_call_us(calls: int, work: object) -> float:
    assert callable(work)
    began = time.perf_counter()
    for n in range(calls):
        work(n)
    return (time.perf_counter() - began) / calls * 1e6


def in_process(calls: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        shared = SharedLimits(Path(folder))
        memory = access.RateLimiter(1e9, 10**9)
        now = time.time()
        rows = {
            "rate check, in memory (one process)": per_call_us(
                calls, lambda n: memory.check(f"198.51.100.{n % 200}", now)
            ),
            "rate check, shared (limits.db)": per_call_us(
                calls, lambda n: shared.rate_wait(f"198.51.100.{n % 200}", 1e9, 1e9, now)
            ),
            "stream slot taken and given back, shared": per_call_us(
                calls,
                lambda n: (
                    shared.acquire("streams", f"198.51.100.{n % 200}", 8),
                    shared.release("streams", f"198.51.100.{n % 200}"),
                ),
            ),
        }
        shared.close()
    for name, value in rows.items():
        print(f"{name:45s} {value:8.1f} us")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_rps(url: str, seconds: int) -> tuple[float, int]:
    run = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", url],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, f"wrk: {run.stdout} {run.stderr}"
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert found is not None, out
    assert count is not None, out
    assert non_2xx is None, f"the check refused requests: {out}"
    return float(found[1]), int(count[1])


def relay_rounds(rounds: int, seconds: int) -> None:
    # (rate, worker identity): a worker of two shares its buckets; the only process does not.
    settings = {
        "off": ("0", ""),
        "on, in memory": ("1000000000", ""),
        "on, shared": ("1000000000", "1/2"),
    }
    results: dict[str, list[float]] = {name: [] for name in settings}
    cpu: dict[str, list[float]] = {name: [] for name in settings}
    work = Path(tempfile.mkdtemp(prefix="limits-cost-"))
    try:
        for round_ in range(rounds):
            for number, (name, (rate, worker)) in enumerate(settings.items()):
                env = {
                    "VPSRELAY_LIMITS__REQUESTS_PER_SECOND": rate,
                    "VPSRELAY_LIMITS__BURST": "1000000000",
                    "VPSRELAY_LOG__ACCESS_LOG": "false",
                    "_VPSRELAY_WORKER": worker,
                }
                with RelayProcess(work / f"{number}-{round_}", env=env) as relay:
                    wrk_rps(f"{relay.url}/", 1)  # warm up
                    before = cpu_seconds(relay.process.pid)
                    rate, count = wrk_rps(f"{relay.url}/", seconds)
                    used = cpu_seconds(relay.process.pid) - before
                    results[name].append(rate)
                    cpu[name].append(used / count * 1e6)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, values in results.items():
        print(
            f"GET /, wrk -c8, rate limit {name:14s} median {statistics.median(values):8.0f} "
            f"req/s (range {min(values):.0f}-{max(values):.0f}, {rounds} rounds of {seconds} s), "
            f"relay CPU {statistics.median(cpu[name]):.0f} us per request"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    in_process(args.calls)
    relay_rounds(args.rounds, args.seconds)


if __name__ == "__main__":
    main()
