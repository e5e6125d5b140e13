"""A blob stored by one worker is served from disk by the others (review finding 4 of
issue 14), with two workers (`--workers 2`) of one relay on one data dir:

- a verified file under `blobs/` whose index row was never written (its writer's index
  write failed) is adopted, not passed through to the upstream on every request;
- many concurrent pulls of a small blob (a config blob, filled within one poll of the
  other worker's follower) still fetch it from the upstream once.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.infra.relay import RelayProcess, pull_token
from tests.infra.workers import current_pids, labels_seen, wait_for
from tests.integration.test_cache import blob_file, push_unique, wait_until
from tests.integration.test_cache_workers import Got, _stream, cache_results, cdn_gets

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
TIMEOUT = 60.0
REQUESTS = 8
ROUNDS = 4  # fresh blobs, each pulled by CONCURRENT clients at once
CONCURRENT = 12


def two_worker_relay(tmp: Path, hub: Hub) -> RelayProcess:
    relay = RelayProcess(
        tmp / "relay", "--upstream", f"docker.io={hub.registry_url}", "--workers", "2"
    )
    try:
        wait_for("two workers", lambda: len(current_pids(relay)) == 2, 20)
        assert len(labels_seen(relay, 40)) == 2  # both answer before the test starts
    except BaseException:
        relay.close()
        raise
    return relay


def fetch_all(url: str, token: str, count: int) -> list[Got]:
    """`count` GETs at once, each on a connection of its own (spread over the workers)."""
    results = [Got() for _ in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(_stream, url, token, got) for got in results]
        for future in futures:
            future.result(timeout=TIMEOUT)
    return results


def test_a_stored_blob_without_its_index_row_is_served_from_disk(
    clean_hub: Hub, tmp_path: Path
) -> None:
    image = push_unique(clean_hub, tmp_path, "someuser/rowless", 64 * 1024)
    blob = image.config
    clean_hub.clear()
    with two_worker_relay(tmp_path, clean_hub) as relay:
        # Renamed into place by a process whose index write then failed: no row.
        hexpart = blob.digest.removeprefix("sha256:")
        stored = relay.workdir / "data" / "blobs" / "sha256" / hexpart[:2] / hexpart
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob_file(image, blob.digest), stored)
        token = pull_token(relay.url, "someuser/rowless")
        url = f"{relay.url}/v2/someuser/rowless/blobs/{blob.digest}"
        for _ in range(REQUESTS):  # one at a time: each may reach either worker
            got = Got()
            _stream(url, token, got)
            assert (got.status, got.size, got.digest, got.error) == (
                200,
                blob.size,
                blob.digest,
                "",
            )
        assert cdn_gets(clean_hub, blob.digest) == []  # never fetched again
        # The access-log line is written after the response: wait for the last one.
        assert wait_until(lambda: len(cache_results(relay, blob.digest)) == REQUESTS)
        assert [result for _, result in cache_results(relay, blob.digest)] == ["hit"] * REQUESTS
        assert relay.process.poll() is None


def test_concurrent_pulls_of_a_small_blob_over_two_workers_fetch_it_once(
    clean_hub: Hub, tmp_path: Path
) -> None:
    images = [
        push_unique(clean_hub, tmp_path, f"someuser/small{n}", 4 * 1024) for n in range(ROUNDS)
    ]
    clean_hub.clear()
    # The leader's upstream answer is late: the other worker's clients join the fill while
    # it is pending, then the whole blob lands between two of their polls.
    clean_hub.cdn.answer_delay = 0.3
    with two_worker_relay(tmp_path, clean_hub) as relay:
        for n, image in enumerate(images):
            repo = f"someuser/small{n}"
            token = pull_token(relay.url, repo)
            url = f"{relay.url}/v2/{repo}/blobs/{image.config.digest}"
            for got in fetch_all(url, token, CONCURRENT):
                assert (got.status, got.size, got.digest, got.error) == (
                    200,
                    image.config.size,
                    image.config.digest,
                    "",
                )
            assert len(cdn_gets(clean_hub, image.config.digest)) == 1, n
            digest = image.config.digest
            assert wait_until(lambda: len(cache_results(relay, digest)) == CONCURRENT)  # noqa: B023
            results = [result for _, result in cache_results(relay, digest)]
            assert results.count("miss") == 1, results
        assert relay.process.poll() is None
