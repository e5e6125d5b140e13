"""What the shared limit state (`<data_dir>/limits.db`) costs a request.

    .venv/bin/python bench/limits_cost.py            # both parts, 3 rounds of 5 s
    .venv/bin/python bench/limits_cost.py --calls 20000 --rounds 5 --seconds 5

Part 1, in one process: microseconds per rate check, the in-memory token bucket (what one
process used before) against the shared one (a write transaction on limits.db), and per
stream slot taken and given back. Part 2, a real relay: `GET /` (the landing page, answered by the relay
itself) under wrk, requests per second with `limits.requests_per_second` off and on (set
high enough never to refuse, so every request pays the check); the two alternate in every
round so that whatever else runs on the machine meets both alike.
"""

from __future__ import annotations

import argparse
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


def wrk_rps(url: str, seconds: int) -> float:
    run = subprocess.run(
        ["wrk", "-t1", "-c8", f"-d{seconds}s", url],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    out = run.stdout
    assert run.returncode == 0, f"wrk: {run.stdout} {run.stderr}"
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert found is not None, out
    assert non_2xx is None, f"the check refused requests: {out}"
    return float(found[1])


def relay_rounds(rounds: int, seconds: int) -> None:
    results: dict[str, list[float]] = {"off": [], "on (shared)": []}
    settings = {"off": "0", "on (shared)": "1000000000"}
    folders = {"off": "off", "on (shared)": "on"}
    work = Path(tempfile.mkdtemp(prefix="limits-cost-"))
    try:
        for round_ in range(rounds):
            for name, rate in settings.items():
                env = {
                    "VPSRELAY_LIMITS__REQUESTS_PER_SECOND": rate,
                    "VPSRELAY_LIMITS__BURST": "1000000000",
                    "VPSRELAY_LOG__ACCESS_LOG": "false",
                }
                with RelayProcess(work / f"{folders[name]}{round_}", env=env) as relay:
                    wrk_rps(f"{relay.url}/", 1)  # warm up
                    results[name].append(wrk_rps(f"{relay.url}/", seconds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, values in results.items():
        print(
            f"GET /, wrk -c8, rate limit {name:12s} median {statistics.median(values):8.0f} "
            f"req/s (range {min(values):.0f}-{max(values):.0f}, {rounds} rounds of {seconds} s)"
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
