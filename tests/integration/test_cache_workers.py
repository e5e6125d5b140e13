"""Issue 14: one cache for every worker. Two relay processes on one `--data-dir`
(different ports) are what workers are: a blob is fetched from the upstream once whichever
process its clients reach, a leader SIGKILLed mid-fill is taken over and leaves nothing
partial, and a tag is revalidated once per TTL, not once per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import RelayProcess, pull_token
from tests.integration.test_cache import (
    MiB,
    host,
    push_unique,
    sha256_file,
    wait_until,
)
from tests.integration.test_pull import assert_blobs_pulled, pulled_manifest_digest, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

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


def start_worker(tmp: Path, name: str, hub: Hub, data: Path, **cache: str) -> RelayProcess:
    variables = {f"VPSRELAY_CACHE__{key.upper()}": value for key, value in cache.items()}
    return RelayProcess(
        tmp / name,
        "--upstream",
        f"docker.io={hub.registry_url}",
        "--data-dir",
        str(data),
        env=variables,
    )


@contextlib.contextmanager
def two_workers(tmp: Path, hub: Hub, **cache: str) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    data = tmp / "data"
    with (
        start_worker(tmp, "a", hub, data, **cache) as a,
        start_worker(tmp, "b", hub, data, **cache) as b,
    ):
        yield a, b


def cdn_gets(hub: Hub, digest: str) -> list[str]:
    """The CDN's full (unranged) GETs of `digest`."""
    hexpart = digest.removeprefix("sha256:")
    return [
        r.path
        for r in hub.cdn.requests()
        if hexpart in r.path and r.method == "GET" and "range" not in {k.lower() for k in r.headers}
    ]


def cache_results(relay: RelayProcess, digest: str) -> list[str]:
    """The `cache=` field of the relay's access-log lines for GETs of blob `digest`."""
    return [
        line.split(" cache=", 1)[1].split()[0]
        for line in relay.log_text().splitlines()
        if "logger=vpsrelay.access" in line
        and "method=GET" in line
        and f"/blobs/{digest}" in line
        and " cache=" in line
    ]


def test_ten_pulls_over_two_workers_fetch_the_layer_once(clean_hub: Hub, tmp_path: Path) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/workers", 32 * MiB)
    clean_hub.clear()
    clean_hub.cdn.throttle = 24 * MiB  # about 1.3 s a fill: the pulls overlap it
    with two_workers(tmp_path, clean_hub) as (a, b):

        def pull(i: int) -> None:
            out = tmp_path / f"client{i}"
            out.mkdir()
            skopeo_copy(out, f"{host(a if i % 2 else b)}/someuser/workers:1")
            assert pulled_manifest_digest(out) == image.manifest_digest
            assert_blobs_pulled(out, image)

        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(pull, range(10)))
        big = max(image.layers, key=lambda blob: blob.size)
        served = {relay.url: cache_results(relay, big.digest) for relay in (a, b)}
    # Both processes served the layer; one of them asked the upstream, once.
    assert all(served.values()), served
    assert sum(results.count("miss") for results in served.values()) == 1, served
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


def _stream(url: str, token: str, got: Got) -> None:
    digest = hashlib.sha256()
    try:
        with httpx.stream(
            "GET", url, headers={"authorization": f"Bearer {token}"}, timeout=30
        ) as response:
            got.status = response.status_code
            for chunk in response.iter_raw():
                digest.update(chunk)
                got.size += len(chunk)
    except httpx.HTTPError as exc:
        got.error = repr(exc)
    got.digest = "sha256:" + digest.hexdigest()


def test_a_leader_killed_mid_fill_is_taken_over_and_leaves_nothing_partial(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/killed", 24 * MiB)
    big = max(image.layers, key=lambda blob: blob.size)
    clean_hub.clear()
    clean_hub.cdn.throttle = 6 * MiB  # 4 s a fill: time to kill its leader midway
    data = tmp_path / "data"
    claim = data / "claims" / big.digest.removeprefix("sha256:")
    with two_workers(tmp_path, clean_hub) as (a, b):
        token = pull_token(a.url, "someuser/killed")
        path = f"/v2/someuser/killed/blobs/{big.digest}"
        results = [Got() for _ in range(3)]
        with ThreadPoolExecutor(max_workers=3) as pool:
            pool.submit(_stream, a.url + path, token, results[0])
            # The leader is whoever holds the claim: its note names a file with its pid.
            assert wait_until(lambda: claim.exists() and claim.read_text().strip() != "")
            assert f".{a.process.pid}." in claim.read_text()
            joiners = [pool.submit(_stream, b.url + path, token, r) for r in results[1:]]
            assert wait_until(lambda: all(r.size > MiB for r in results))
            dead_tmp = data / "tmp" / claim.read_text().split()[0]
            assert dead_tmp.exists()
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(10)
            for joiner in joiners:
                joiner.result(timeout=60)
        for result in results[1:]:
            # Taken over: what the dead leader wrote, then a ranged request to the
            # upstream, all of it hashed again before the last byte.
            assert (result.size, result.digest, result.error) == (big.size, big.digest, "")
        assert results[0].size != big.size or results[0].digest == big.digest
        assert wait_until(lambda: not dead_tmp.exists())
        # A new pull through the survivor: byte-exact.
        again = Got()
        _stream(b.url + path, token, again)
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
    with two_workers(tmp_path, clean_hub, tag_ttl=str(int(ttl))) as (a, b):
        token = pull_token(a.url, "someuser/tagged")
        headers = {**ACCEPT, "authorization": f"Bearer {token}"}
        url = "/v2/someuser/tagged/manifests/1"
        # Each worker sees the credential accepted once (a GET, then a HEAD).
        clean_hub.clear()
        assert httpx.get(a.url + url, headers=headers).status_code == 200
        reply = httpx.get(b.url + url, headers=headers)
        assert reply.status_code == 200
        assert reply.headers["x-vpsrelay-cache"] == "revalidated"
        for _ in range(2):
            time.sleep(ttl + 0.5)
            clean_hub.clear_registry_requests()
            with ThreadPoolExecutor(max_workers=6) as pool:
                answers = list(
                    pool.map(
                        lambda relay: httpx.get(relay.url + url, headers=headers, timeout=30),
                        [a, b, a, b, a, b],
                    )
                )
            assert [r.status_code for r in answers] == [200] * 6
            kinds = sorted(r.headers["x-vpsrelay-cache"] for r in answers)
            assert kinds == ["hit"] * 5 + ["revalidated"], kinds
            clean_hub.wait_registry_requests(
                lambda log: bool(manifest_requests(log, "someuser/tagged")), timeout=5
            )
            time.sleep(0.3)  # a second revalidation, if there were one, would show by now
            requests = clean_hub.registry_requests()
            assert manifest_requests(requests, "someuser/tagged") == ["HEAD"]
