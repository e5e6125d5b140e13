"""Parallel ranged fetch against a CDN that throttles each connection (issue 16).

Starts the test suite's Docker Hub stand-in (Distribution with token auth, the CDN it
redirects blobs to) on loopback, pushes one image with a big random layer, throttles each
CDN connection to `--rate` MiB/s and pulls the layer through a relay with
`upstream.parallel_connections` = 1, 2, 4 (cache off: the pass-through; and cache on: a
cold fill), checking every byte. Prints one markdown table. Not part of CI.

    .venv/bin/python bench/parallel.py --size 200 --rate 20
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.infra.hub import start_hub
from tests.infra.oci import build_image
from tests.infra.relay import RelayProcess

MiB = 1024 * 1024
REPO = "bench/parallel"


def pull(relay: RelayProcess, digest: str) -> tuple[float, str]:
    token = httpx.get(
        f"{relay.url}/token", params={"scope": f"repository:{REPO}:pull"}, timeout=30
    ).json()["token"]
    sha, size = hashlib.sha256(), 0
    began = time.monotonic()
    with httpx.stream(
        "GET",
        f"{relay.url}/v2/{REPO}/blobs/{digest}",
        headers={"authorization": f"Bearer {token}"},
        timeout=120,
    ) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_raw(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    seconds = time.monotonic() - began
    return size / MiB / seconds, f"sha256:{sha.hexdigest()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=200, help="MiB of the layer")
    parser.add_argument("--rate", type=int, default=20, help="MiB/s per CDN connection")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        work = Path(tmp)
        hub = start_hub(work / "hub", images=[])
        try:
            image = build_image(
                work / "oci", "1", files={"m": uuid.uuid4().hex.encode()},
                extra_layer_bytes=args.size * MiB,
            )  # fmt: skip
            hub.push_image(image, f"{REPO}:1")
            layer = max(image.layers, key=lambda blob: blob.size)
            rows = []
            for cache in (False, True):
                for connections in (1, 2, 4):
                    rates = []
                    for run in range(args.runs):
                        env = {
                            "VPSRELAY_CACHE__ENABLED": "true" if cache else "false",
                            "VPSRELAY_UPSTREAM__PARALLEL_CONNECTIONS": str(connections),
                            "VPSRELAY_UPSTREAM__PARALLEL_MIN_SIZE": "64MiB",
                        }
                        hub.clear()
                        hub.cdn.throttle = args.rate * MiB
                        where = work / f"relay-{cache}-{connections}-{run}"
                        with RelayProcess(
                            where, "--upstream", f"docker.io={hub.registry_url}", env=env
                        ) as relay:
                            rate, digest = pull(relay, layer.digest)
                        if digest != layer.digest:
                            raise SystemExit(f"wrong bytes: {digest} != {layer.digest}")
                        rates.append(rate)
                    rates.sort()
                    rows.append((cache, connections, rates))
        finally:
            hub.close(remove_data=True)
    single = {cache: rates[len(rates) // 2] for cache, k, rates in rows if k == 1}
    print("| path | connections | median MiB/s [min..max] | speed-up | CDN limit |")
    print("|---|---:|---:|---:|---:|")
    for cache, connections, rates in rows:
        median = rates[len(rates) // 2]
        path = "cache fill (cold)" if cache else "pass-through"
        print(
            f"| {path} | {connections} | {median:.1f} [{rates[0]:.1f}..{rates[-1]:.1f}]"
            f" | {median / single[cache]:.2f}x | {args.rate} MiB/s per connection |"
        )


if __name__ == "__main__":
    main()
