"""Issue 14: one cache for every worker. One relay with `--workers 2` (the real
supervisor): a blob is fetched from the upstream once whichever worker its clients reach,
a leader SIGKILLed mid-fill is taken over, leaves nothing partial and is replaced, and a
tag is revalidated once per TTL, not once per worker. Which worker served a request is
read from the access log's `worker=` label.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import RelayProcess, pull_token
from tests.infra.workers import clients_by_worker, current_pids, label_of, new_marker, wait_for
from tests.integration.test_cache import (
    MiB,
    host,
    push_unique,
    sha256_file,
    wait_until,
)
from tests.integration.test_pull import assert_blobs_pulled, pulled_manifest_digest, skopeo_copy

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import BuiltImage

pytestmark = pytest.mark.integration
ACCEPT = {  # every type, as pulling clients ask: only such an answer is kept for the tag
    "accept": ", ".join(
        [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ]
    )
}


PROBES = 40  # new connections before each worker must hold the ones a test asks for


def start_worker(tmp: Path, name: str, hub: Hub, data: Path, **cache: str) -> RelayProcess:
    """One relay process alone on `data` (`--workers 1`)."""
    variables = {f"VPSRELAY_CACHE__{key.upper()}": value for key, value in cache.items()}
    return RelayProcess(
        tmp / name,
        "--upstream",
        f"docker.io={hub.registry_url}",
        "--data-dir",
        str(data),
        env=variables,
    )


def two_workers(tmp: Path, hub: Hub, **cache: str) -> RelayProcess:
    """One relay of two workers, its data dir `tmp / "data"`."""
    variables = {f"VPSRELAY_CACHE__{key.upper()}": value for key, value in cache.items()}
    return RelayProcess(
        tmp / "relay",
        "--workers",
        "2",
        "--upstream",
        f"docker.io={hub.registry_url}",
        "--data-dir",
        str(tmp / "data"),
        env=variables,
    )


def cdn_gets(hub: Hub, digest: str) -> list[str]:
    """The CDN's full (unranged) GETs of `digest`."""
    hexpart = digest.removeprefix("sha256:")
    return [
        r.path
        for r in hub.cdn.requests()
        if hexpart in r.path and r.method == "GET" and "range" not in {k.lower() for k in r.headers}
    ]


def cache_results(relay: RelayProcess, digest: str) -> list[tuple[str, str]]:
    """(worker, `cache=` field) of the relay's access-log lines for GETs of blob `digest`."""
    return [
        (line.split(" worker=", 1)[1].split()[0], line.split(" cache=", 1)[1].split()[0])
        for line in relay.log_text().splitlines()
        if "logger=vpsrelay.access" in line
        and "method=GET" in line
        and f"/blobs/{digest}" in line
        and " cache=" in line
    ]


ATTEMPTS = 3  # fresh images to pull before the kernel must have spread the pulls


def test_ten_pulls_over_two_workers_fetch_the_layer_once(clean_hub: Hub, tmp_path: Path) -> None:
    clean_hub.cdn.throttle = 24 * MiB  # about 1.3 s a fill: the pulls overlap it
    with two_workers(tmp_path, clean_hub) as relay:
        # Skopeo opens its own connections: the kernel decides which worker gets each. If
        # all ten land on one worker, the same again with a fresh image (bounded).
        for attempt in range(ATTEMPTS):
            repo = f"someuser/workers{attempt}"
            image = push_unique(clean_hub, tmp_path, repo, 32 * MiB)
            clean_hub.clear()

            def pull(i: int, repo: str = repo, image: BuiltImage = image) -> None:
                out = tmp_path / f"client-{repo.rpartition('/')[2]}-{i}"
                out.mkdir()
                skopeo_copy(out, f"{host(relay)}/{repo}:1")
                assert pulled_manifest_digest(out) == image.manifest_digest
                assert_blobs_pulled(out, image)

            with ThreadPoolExecutor(max_workers=10) as pool:
                list(pool.map(pull, range(10)))
            big = max(image.layers, key=lambda blob: blob.size)
            served = cache_results(relay, big.digest)
            if {worker for worker, _ in served} == {"w1", "w2"}:
                break
        else:
            raise AssertionError(f"{ATTEMPTS} rounds of 10 pulls never reached both workers")
    # Both workers served the layer; one of them asked the upstream, once.
    assert len(served) >= 10, served
    assert [result for _, result in served].count("miss") == 1, served
    for blob in [image.config, *image.layers]:
        assert len(cdn_gets(clean_hub, blob.digest)) == 1, blob
    assert clean_hub.cdn.bytes_sent == sum(b.size for b in [image.config, *image.layers])
    stored = tmp_path / "data" / "blobs" / "sha256" / big.digest[7:9] / big.digest[7:]
    assert sha256_file(stored) == big.digest
    assert list((tmp_path / "data" / "tmp").iterdir()) == []


@dataclass
class Got:
    """What one client received: the status, how many bytes and their hash, or the error."""

    status: int = 0
    size: int = 0
    digest: str = ""
    error: str = ""


def _stream(url: str, token: str, got: Got, client: httpx.Client | None = None) -> None:
    """GET `url` (on `client`'s connection if given), hashing what arrives."""
    digest = hashlib.sha256()
    headers = {"authorization": f"Bearer {token}"}
    try:
        if client is None:
            opened = httpx.stream("GET", url, headers=headers, timeout=30)
        else:
            opened = client.stream("GET", url, headers=headers)
        with opened as response:
            got.status = response.status_code
            for chunk in response.iter_raw():
                digest.update(chunk)
                got.size += len(chunk)
    except httpx.HTTPError as exc:
        got.error = repr(exc)
    got.digest = "sha256:" + digest.hexdigest()


def with_probe(url: str) -> tuple[str, str]:
    """`url` with a fresh `probe=` marker, and the marker (to find who served it)."""
    marker = new_marker()
    return f"{url}?probe={marker}", marker


def test_a_leader_killed_mid_fill_is_taken_over_and_leaves_nothing_partial(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/killed", 24 * MiB)
    big = max(image.layers, key=lambda blob: blob.size)
    clean_hub.clear()
    clean_hub.cdn.throttle = 6 * MiB  # 4 s a fill: time to kill its leader midway
    data = tmp_path / "data"
    claim = data / "claims" / big.digest.removeprefix("sha256:")
    with (
        two_workers(tmp_path, clean_hub) as relay,
        clients_by_worker(relay, 2, PROBES) as by_worker,
    ):
        token = pull_token(relay.url, "someuser/killed")
        blob_url = f"{relay.url}/v2/someuser/killed/blobs/{big.digest}"
        before = current_pids(relay)
        results = [Got() for _ in range(3)]
        markers = [with_probe(blob_url) for _ in results]
        with ThreadPoolExecutor(max_workers=3) as pool:
            pool.submit(_stream, markers[0][0], token, results[0], by_worker["w1"][0])
            # The leader is whoever holds the claim: its note names a file with its pid.
            assert wait_until(lambda: claim.exists() and claim.read_text().strip() != "")
            assert f".{before['w1']}." in claim.read_text()
            joiners = [
                pool.submit(_stream, url, token, result, client)
                for (url, _), result, client in zip(
                    markers[1:], results[1:], by_worker["w2"], strict=True
                )
            ]
            assert wait_until(lambda: all(r.size > MiB for r in results))
            dead_tmp = data / "tmp" / claim.read_text().split()[0]
            assert dead_tmp.exists()
            os.kill(before["w1"], signal.SIGKILL)
            for joiner in joiners:
                joiner.result(timeout=60)
        # The joiners were on the other worker; the leader's request died unlogged.
        assert [label_of(relay, marker) for _, marker in markers[1:]] == ["w2", "w2"]
        for result in results[1:]:
            # Taken over: what the dead leader wrote, then a ranged request to the
            # upstream, all of it hashed again before the last byte.
            assert (result.size, result.digest, result.error) == (big.size, big.digest, "")
        assert results[0].size != big.size or results[0].digest == big.digest
        assert wait_until(lambda: not dead_tmp.exists())
        # The dead worker is replaced: the same label, a new pid.
        wait_for("w1 replaced", lambda: current_pids(relay)["w1"] != before["w1"], 20)
        assert current_pids(relay)["w2"] == before["w2"]
        assert relay.process.poll() is None
        # A new pull, on a new connection: byte-exact.
        again = Got()
        _stream(blob_url, token, again)
        assert (again.status, again.size, again.digest) == (200, big.size, big.digest)
        assert not again.error
    for stored in (data / "blobs" / "sha256").glob("*/*"):
        assert sha256_file(stored) == f"sha256:{stored.name}"
    assert list((data / "tmp").iterdir()) == []


def manifest_requests(requests: list[tuple[str, str]], repository: str) -> list[str]:
    return [m for m, p in requests if p.startswith(f"/v2/{repository}/manifests/1")]


def test_one_tag_revalidation_per_ttl_across_workers(clean_hub: Hub, tmp_path: Path) -> None:
    push_unique(clean_hub, tmp_path, "someuser/tagged", 1024)
    ttl = 2.0
    with (
        two_workers(tmp_path, clean_hub, tag_ttl=str(int(ttl))) as relay,
        clients_by_worker(relay, 3, PROBES) as by_worker,
    ):
        a, b = by_worker["w1"], by_worker["w2"]
        token = pull_token(relay.url, "someuser/tagged")
        headers = {**ACCEPT, "authorization": f"Bearer {token}"}
        url = f"{relay.url}/v2/someuser/tagged/manifests/1"
        # Each worker sees the credential accepted once (a GET, then a HEAD).
        clean_hub.clear()
        assert a[0].get(url, headers=headers).status_code == 200
        reply = b[0].get(url, headers=headers)
        assert reply.status_code == 200
        assert reply.headers["x-vpsrelay-cache"] == "revalidated"
        for _ in range(2):
            time.sleep(ttl + 0.5)
            clean_hub.clear_registry_requests()
            asked = [with_probe(url) for _ in range(6)]
            clients = [a[0], b[0], a[1], b[1], a[2], b[2]]
            with ThreadPoolExecutor(max_workers=6) as pool:
                answers = list(
                    pool.map(
                        lambda job: job[0].get(job[1], headers=headers),
                        [(c, u) for c, (u, _) in zip(clients, asked, strict=True)],
                    )
                )
            assert [r.status_code for r in answers] == [200] * 6
            assert [label_of(relay, m) for _, m in asked] == ["w1", "w2"] * 3
            kinds = sorted(r.headers["x-vpsrelay-cache"] for r in answers)
            assert kinds == ["hit"] * 5 + ["revalidated"], kinds
            clean_hub.wait_registry_requests(
                lambda log: bool(manifest_requests(log, "someuser/tagged")), timeout=5
            )
            time.sleep(0.3)  # a second revalidation, if there were one, would show by now
            requests = clean_hub.registry_requests()
            assert manifest_requests(requests, "someuser/tagged") == ["HEAD"]
