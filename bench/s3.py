"""Hits from a shared bucket beside a disk hit, and upstream bytes across two nodes (issue 15).

Starts the test suite's Docker Hub stand-in (Distribution with token auth, the CDN it
redirects blobs to) and a SeaweedFS (`weed server -s3`) on loopback, pushes one image with a
big random layer, and measures a warm GET of the layer (best of `--runs`, every byte
checked) from: a relay with the disk cache; a relay on the bucket streaming it; a relay on
the bucket answering with a presigned redirect (the client then reads the store). The relay
CPU seconds each GET cost are from /proc. Then `--clients` concurrent GETs of a second,
uncached layer, split across two nodes on the bucket: the bytes the CDN sent. Prints
markdown tables. Not part of CI.

    .venv/bin/python bench/s3.py --size 256 --clients 10
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.infra.hub import start_hub
from tests.infra.oci import build_image
from tests.infra.relay import RelayProcess
from tests.infra.seaweed import ACCESS_KEY, SECRET_KEY, Seaweed

MiB = 1024 * 1024
REPO = "bench/s3"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def token(relay: RelayProcess) -> str:
    answer = httpx.get(
        f"{relay.url}/token", params={"scope": f"repository:{REPO}:pull"}, timeout=30
    )
    return str(answer.json()["token"])


def get(relay: RelayProcess, digest: str) -> tuple[float, str, str]:
    """(MiB/s, digest of the bytes, how it was served)."""
    sha, size = hashlib.sha256(), 0
    began = time.monotonic()
    with (
        httpx.Client(follow_redirects=True, timeout=300) as client,
        client.stream(
            "GET",
            f"{relay.url}/v2/{REPO}/blobs/{digest}",
            headers={"authorization": f"Bearer {token(relay)}"},
        ) as answer,
    ):
        answer.raise_for_status()
        how = "redirect" if answer.history else answer.headers.get("x-vpsrelay-cache", "?")
        for chunk in answer.iter_raw(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size / MiB / (time.monotonic() - began), f"sha256:{sha.hexdigest()}", how


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256, help="MiB of the layer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp:
        work = Path(tmp)
        store = Seaweed(work / "seaweed")
        store.start()
        try:
            with start_hub(work / "hub") as hub:
                run(args, work, hub, store)
        finally:
            store.close()


def run(args: argparse.Namespace, work: Path, hub: object, store: Seaweed) -> None:
    from tests.infra.hub import Hub

    assert isinstance(hub, Hub)
    images = []
    for n in range(2):
        image = build_image(
            work / f"oci{n}", "1", files={"m": uuid.uuid4().bytes},
            extra_layer_bytes=args.size * MiB,
        )  # fmt: skip
        hub.push_image(image, f"{REPO}:{n}")
        images.append(image)
    first, second = (max(i.layers, key=lambda b: b.size) for i in images)
    bucket = f"bench{uuid.uuid4().hex[:12]}"
    store.create_bucket(bucket)
    s3 = {
        "VPSRELAY_CACHE__BACKEND": "s3", "VPSRELAY_CACHE__S3__ENDPOINT": store.endpoint,
        "VPSRELAY_CACHE__S3__BUCKET": bucket, "VPSRELAY_CACHE__S3__ACCESS_KEY": ACCESS_KEY,
        "VPSRELAY_CACHE__S3__SECRET_KEY": SECRET_KEY,
    }  # fmt: skip
    redirect = {**s3, "VPSRELAY_CACHE__S3__REDIRECT": "true"}
    upstream = ("--upstream", f"docker.io={hub.registry_url}")
    rows = []
    for name, env in (("disk cache", {}), ("bucket, streamed", s3), ("bucket, redirect", redirect)):
        with RelayProcess(
            work / name.replace(" ", "-").replace(",", ""), *upstream, env=env
        ) as relay:
            get(relay, first.digest)  # fill (or find it in the bucket)
            best, cpu, how = 0.0, 0.0, ""
            for _ in range(args.runs):
                before = cpu_seconds(relay.process.pid)
                rate, digest, how = get(relay, first.digest)
                assert digest == first.digest, name
                if rate > best:
                    best, cpu = rate, cpu_seconds(relay.process.pid) - before
            rows.append((name, how, best, cpu))
    print(f"\nWarm GET of a {args.size} MiB layer (best of {args.runs}):\n")
    print("| relay | served as | MiB/s | relay CPU s |")
    print("|---|---|---:|---:|")
    for name, how, rate, cpu in rows:
        print(f"| {name} | {how} | {rate:.0f} | {cpu:.2f} |")

    hub.clear()
    with (
        RelayProcess(work / "node-a", *upstream, env=s3) as a,
        RelayProcess(work / "node-b", *upstream, env=s3) as b,
        ThreadPoolExecutor(args.clients) as pool,
    ):
        nodes = [a, b]
        results = list(pool.map(lambda i: get(nodes[i % 2], second.digest), range(args.clients)))
    assert all(digest == second.digest for _, digest, _ in results)
    sent = hub.cdn.bytes_sent
    print(f"\n{args.clients} concurrent GETs of an uncached {args.size} MiB layer, 2 nodes:\n")
    print("| layer bytes | CDN bytes sent | upstream fetches |")
    print("|---:|---:|---:|")
    print(f"| {second.size} | {sent} | {sent / second.size:.2f} |")


if __name__ == "__main__":
    main()
