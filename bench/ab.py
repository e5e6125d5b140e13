"""vpsrelay alone, case by case, optionally against another checkout: before and after.

    .venv/bin/python bench/ab.py hit:h2-tls pass:h1         # this tree: 3 rounds, 512 MiB
    .venv/bin/python bench/ab.py --before /tmp/base cold:h1 # alternate with another checkout
    .venv/bin/python bench/ab.py --profile /tmp/p hit:h2c   # py-spy raw profile of each run

A CASE is MODE:PROTO, MODE one of pass (cache off), cold (empty cache: the fill) or hit
(filled first), PROTO one of h1, h2c, h1-tls, h2-tls. One upstream (Distribution, the
bench's) serves one blob of `--size` MiB; every measurement starts its own relay, downloads
the blob once with curl and stops the relay. With `--before` the two trees alternate in every
round, so that whatever else runs on the machine meets both alike. `--before` must be a
checkout with `bench/relay.py` (make one with `git worktree add /tmp/base <commit>`); it runs
with this tree's `.venv`. Prints the median and range of MiB/s and the median relay CPU
seconds per GiB; the "before and after" tables in docs/benchmarks.md come from this.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench

MODES = ("pass", "cold", "hit")
CURL_PROTOCOL = {"h1": "h1", "h2c": "h2c", "h1-tls": "h1", "h2-tls": "h2"}


def parse_case(text: str) -> tuple[str, str]:
    mode, _, proto = text.partition(":")
    if mode not in MODES or proto not in CURL_PROTOCOL:
        sys.exit(f"ab: {text!r} is not MODE:PROTO ({'|'.join(MODES)}:{'|'.join(CURL_PROTOCOL)})")
    return mode, proto


def measure_once(
    setup: bench.Bench, tree: Path, mode: str, proto: str, profile: Path | None
) -> bench.Row:
    bench.ROOT = tree  # the relay's code and bench/relay.py come from this checkout
    relay = setup.vpsrelay(f"{tree.name} {mode}", cache=mode != "pass")
    spy = None
    try:
        blob = setup.blobs["big"]
        if mode == "hit":
            bench.run_clients([(bench.blob_url(relay.url, blob), "h1")])
        base = relay.tls_url if proto.endswith("-tls") else relay.url
        assert base is not None
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            out = profile / f"{tree.name}-{mode}-{proto}-{time.monotonic_ns()}.raw"
            spy = subprocess.Popen(
                ["py-spy", "record", "-r", "250", "-f", "raw", "-o", str(out),
                 "-p", str(relay.pid), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # py-spy attaches
        url = bench.blob_url(base, blob)
        return bench.measure(relay, [(url, CURL_PROTOCOL[proto])], f"{mode} {proto}")
    finally:
        try:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
        finally:
            relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", metavar="CASE", help="MODE:PROTO, e.g. hit:h2-tls")
    parser.add_argument("--before", type=Path, help="another checkout to alternate with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="MiB of the blob")
    parser.add_argument("--profile", type=Path, help="write py-spy raw profiles here")
    args = parser.parse_args()
    cases = [parse_case(text) for text in args.cases]
    if args.profile is not None and shutil.which("py-spy") is None:
        sys.exit("ab: --profile needs py-spy on PATH (.venv/bin/pip install py-spy)")
    this = bench.ROOT
    trees = [args.before.resolve(), this] if args.before else [this]
    for tree in trees:
        if not (tree / "bench" / "relay.py").exists():
            sys.exit(f"ab: {tree} has no bench/relay.py")
    tls = any(proto.endswith("-tls") for _, proto in cases)
    work = Path(tempfile.mkdtemp(prefix="vpsrelay-ab-"))
    results: dict[tuple[Path, str, str], list[bench.Row]] = {}
    try:
        setup = bench.Bench(work, tls, args.size * bench.MiB, bench.MiB)
        try:
            for _ in range(args.rounds):
                for mode, proto in cases:
                    for tree in trees:
                        row = measure_once(setup, tree, mode, proto, args.profile)
                        results.setdefault((tree, mode, proto), []).append(row)
                        print(f"{tree.name:>12} {mode}:{proto}: {row.mib_s:.0f} MiB/s,"
                              f" {row.cpu_per_gib:.2f} CPU s/GiB", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            setup.upstream.stop()
    finally:
        bench.ROOT = this
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, trees, cases)


def summary(rows: list[bench.Row]) -> tuple[str, str]:
    speeds = [row.mib_s for row in rows]
    cpu = statistics.median(row.cpu_per_gib or 0.0 for row in rows)
    return f"{statistics.median(speeds):.0f} [{min(speeds):.0f}..{max(speeds):.0f}]", f"{cpu:.2f}"


def print_table(
    results: dict[tuple[Path, str, str], list[bench.Row]],
    trees: list[Path],
    cases: list[tuple[str, str]],
) -> None:
    names = [tree.name for tree in trees]
    print("| case | " + " | ".join(f"{n} MiB/s" for n in names) + " | CPU s/GiB " + " -> ".join(names) + " |")  # fmt: skip
    print("|---|" + "---:|" * len(trees) + "---:|")
    for mode, proto in cases:
        cells = [summary(results[(tree, mode, proto)]) for tree in trees]
        speeds = " | ".join(speed for speed, _ in cells)
        cpus = " -> ".join(cpu for _, cpu in cells)
        print(f"| {mode} {proto} | {speeds} | {cpus} |")


if __name__ == "__main__":
    main()
