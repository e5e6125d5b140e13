"""vpsrelay with 1 and 2 worker processes beside nginx (2 workers) and Caddy, in one run.

The rows issue 14 asks for, over TLS (trustme certificates, the relay's own TLS listener):
20 clients x 100 MiB pass-through, fill (cache on and empty, all 20 on the same blob) and
hit, over HTTP/1.1 and HTTP/2; one 1 GiB stream for reference; the upstream bytes of the
fill rows (single-flight across workers: 1.00x is one upstream read for 20 clients).
Everything runs on this machine, on 127.0.0.1; `bench/bench.py` has the peers.

    .venv/bin/python bench/workers.py                  # ~5 minutes on 2 cores
    .venv/bin/python bench/workers.py --big 256 --rounds 3 --json /tmp/workers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench as peers  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = peers.MiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=1024, help="MiB of the single-stream blob")
    parser.add_argument("--medium", type=int, default=100, help="MiB of the concurrent blob")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each row (median)")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    for tool in ("docker-registry", "nginx", "caddy", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is missing; see docs/benchmarks.md for the install step")
    work = Path(tempfile.mkdtemp(prefix="vpsrelay-bench-workers-"))
    work.chmod(0o755)
    rows: list[dict[str, object]] = []
    running: list[peers.Proc] = []
    try:
        bench = peers.Bench(work, True, args.big * MiB, args.medium * MiB)
        running.append(bench.upstream)
        big, medium = bench.blobs["big"], bench.blobs["medium"]
        starters: dict[str, Callable[[], peers.Proc]] = {
            "nginx proxy (2 workers)": lambda: bench.nginx(workers=2),
            "caddy proxy": bench.caddy,
        }
        for mode, cache in (("pass-through", False), ("fill", True), ("hit", True)):
            for workers in (1, 2):
                starters[f"vpsrelay {mode} w{workers}"] = lambda m=mode, c=cache, w=workers: (
                    bench.vpsrelay(f"vpsrelay {m}", c, w)
                )

        def run(peer: str, case: str, blob: peers.Blob, clients: int, proto: str) -> None:
            mib_s: list[float] = []
            cpu: list[float] = []
            rss: list[float] = []
            ratio: list[float] = []
            for _ in range(args.rounds):
                proc = starters[peer]()
                running.append(proc)
                try:
                    assert proc.tls_url is not None
                    url = peers.blob_url(proc.tls_url, blob)
                    if peer.startswith("vpsrelay hit"):
                        peers.run_clients([(url, "h1")])  # fill first
                    since = bench.upstream.access_log.stat().st_size  # type: ignore[attr-defined]
                    row = peers.measure(proc, [(url, proto)] * clients, case)
                    mib_s.append(row.mib_s)
                    if row.cpu_per_gib is not None:
                        cpu.append(row.cpu_per_gib)
                    rss.append(peers.peak_rss_per_process(proc.pid) / MiB)
                    if peer.startswith("vpsrelay fill"):
                        time.sleep(1.0)  # Distribution logs a request after its response
                        sent = peers.upstream_bytes(bench, since, blob.digest)
                        ratio.append(sent / blob.size)
                finally:
                    proc.stop()
                    running.remove(proc)
            result: dict[str, object] = {
                "case": case,
                "peer": peer,
                "mib_s": statistics.median(mib_s),
                "mib_s_range": [min(mib_s), max(mib_s)],
                "cpu_s_per_gib": statistics.median(cpu) if cpu else None,
                "rss_mib_per_process": max(rss),
                "upstream_ratio": max(ratio) if ratio else None,
            }
            rows.append(result)
            print(result, file=sys.stderr, flush=True)

        for proto, label in (("h1", "h1-tls"), ("h2", "h2-tls")):
            case = f"{args.clients} clients x {args.medium} MiB {label}"
            for peer in starters:
                run(peer, case, medium, args.clients, proto)
        case = f"1 blob {args.big} MiB h2-tls"
        for peer in starters:
            if not peer.startswith("vpsrelay fill"):
                run(peer, case, big, 1, "h2")
    finally:
        for proc in reversed(running):
            with contextlib.suppress(Exception):
                proc.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict[str, object]]) -> None:
    """One line per row, with its ratio to nginx (2 workers) and to the same mode's w1."""
    value = {(str(r["case"]), str(r["peer"])): float(r["mib_s"]) for r in rows}  # type: ignore[arg-type]

    def ratio(mine: float, base: float | None) -> str:
        return f"{mine / base:.2f}" if base else "-"

    def number(x: object, form: str) -> str:
        return format(x, form) if isinstance(x, float) else "-"

    print()
    print(
        "| case | peer | MiB/s [min..max] | x nginx w2 | x w1 | CPU s/GiB | RSS MiB/process | upstream |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        case, peer = str(r["case"]), str(r["peer"])
        mine = value[(case, peer)]
        nginx = value.get((case, "nginx proxy (2 workers)"))
        one = value.get((case, peer[:-1] + "1")) if peer.endswith(" w2") else None
        low, high = r["mib_s_range"]  # type: ignore[misc]
        print(
            f"| {case} | {peer} | {mine:.0f} [{low:.0f}..{high:.0f}] | {ratio(mine, nginx)} "
            f"| {ratio(mine, one)} | {number(r['cpu_s_per_gib'], '.2f')} "
            f"| {number(r['rss_mib_per_process'], '.0f')} | {number(r['upstream_ratio'], '.2f')} |"
        )


if __name__ == "__main__":
    main()
