"""Issue 16: blob bodies that break off upstream are resumed, and the client never sees it.

One 300 MiB layer (pushed once for the module) pulled by skopeo through a real relay while
the hub's CDN resets every response after 64 MiB: through the pass-through and through a
cache fill (with a second client joined to the fill); with signed CDN URLs that expire after
5 s and a slowly reading client; with upstream tokens that live 5 s.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.oci import BuiltImage, build_image
from tests.infra.relay import RelayProcess
from tests.integration.test_pull import assert_blobs_pulled, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
MiB = 1024 * 1024
BIG = 300 * MiB
CUT = 64 * MiB
REPO = "someuser/resume-big"
SMALL_REPO = "someuser/resume-slow"
SMALL = 32 * MiB
# The slow client: the relay may read ahead of it by the socket buffers (a few MiB), so with
# a cut every 6 MiB the later resumes come well after 5 s.
SLOW_RATE = 1.5 * MiB
SLOW_CUT = 6 * MiB


@pytest.fixture(scope="module")
def big(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A fresh image with one 300 MiB layer, in the hub (pushed once for the module)."""
    tmp = tmp_path_factory.mktemp("resume-big")
    image = build_image(
        tmp / "oci", "1", files={"etc/marker": uuid.uuid4().hex.encode()}, extra_layer_bytes=BIG
    )
    hub.push_image(image, f"{REPO}:1")
    return image


@pytest.fixture(scope="module")
def small(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    tmp = tmp_path_factory.mktemp("resume-small")
    image = build_image(
        tmp / "oci",
        "1",
        files={"etc/marker": uuid.uuid4().hex.encode()},
        extra_layer_bytes=SMALL,
    )
    hub.push_image(image, f"{SMALL_REPO}:1")
    return image


@pytest.fixture
def faulty_hub(hub: Hub) -> Iterator[Hub]:
    hub.clear()
    try:
        yield hub
    finally:
        hub.clear()
        hub.tokens.expires_in, hub.tokens.leeway = 300, 0


def start_relay(tmp: Path, hub: Hub, *, cache: bool) -> RelayProcess:
    env = {"VPSRELAY_CACHE__ENABLED": "true" if cache else "false"}
    return RelayProcess(tmp, "--upstream", f"docker.io={hub.registry_url}", env=env)


def access_lines(relay: RelayProcess, digest: str) -> list[str]:
    return [line for line in relay.log_text().splitlines() if digest in line and "status=" in line]


def resumes_logged(relay: RelayProcess, digest: str, at_least: int) -> int:
    """The resumes the access log shows for `digest`, waiting (bounded) for `at_least`: a
    request's line is written after its last byte went out."""
    deadline = time.monotonic() + 5
    while True:
        found = [re.search(r"\bresumes=(\d+)", line) for line in access_lines(relay, digest)]
        count = sum(int(m[1]) for m in found if m is not None)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def metric(relay: RelayProcess, name: str) -> float:
    text = httpx.get(f"{relay.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def layer_of(image: BuiltImage) -> str:
    return max(image.layers, key=lambda blob: blob.size).digest


def layer_size(image: BuiltImage) -> int:
    return max(blob.size for blob in image.layers)


def anonymous_token(relay: RelayProcess, repo: str) -> str:
    answer = httpx.get(
        f"{relay.url}/token", params={"scope": f"repository:{repo}:pull"}, timeout=10
    )
    answer.raise_for_status()
    return str(answer.json()["token"])


def read_blob(
    relay: RelayProcess, repo: str, digest: str, *, rate: float | None = None
) -> tuple[str, str, int]:
    """GET a blob through the relay (at most `rate` bytes/s): its hash, cache header, size."""
    headers = {"authorization": f"Bearer {anonymous_token(relay, repo)}"}
    sha, size = hashlib.sha256(), 0
    began = time.monotonic()
    with httpx.stream(
        "GET", f"{relay.url}/v2/{repo}/blobs/{digest}", headers=headers, timeout=60
    ) as answer:
        assert answer.status_code == 200, answer.read()
        for chunk in answer.iter_raw(256 * 1024):
            sha.update(chunk)
            size += len(chunk)
            if rate is not None:
                ahead = began + size / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        how = answer.headers.get("x-vpsrelay-cache", "")
    return f"sha256:{sha.hexdigest()}", how, size


def test_pass_through_resumes_a_layer_the_cdn_cuts_every_64_mib(
    faulty_hub: Hub, big: BuiltImage, tmp_path: Path
) -> None:
    layer = layer_of(big)
    faulty_hub.cdn.reset_after = CUT
    with start_relay(tmp_path / "relay", faulty_hub, cache=False) as relay:
        skopeo_copy(tmp_path, f"{relay.url.removeprefix('http://')}/{REPO}:1")
        assert_blobs_pulled(tmp_path, big)
        assert faulty_hub.cdn.resets >= BIG // CUT
        assert resumes_logged(relay, layer, BIG // CUT) >= BIG // CUT
        assert metric(relay, "vpsrelay_upstream_resumes_total") >= BIG // CUT


def test_cache_fill_resumes_and_a_joined_client_gets_the_exact_bytes(
    faulty_hub: Hub, big: BuiltImage, tmp_path: Path
) -> None:
    layer = layer_of(big)
    faulty_hub.cdn.reset_after = CUT
    faulty_hub.cdn.throttle = 200 * MiB  # the fill lasts long enough for a join
    with start_relay(tmp_path / "relay", faulty_hub, cache=True) as relay:
        joined: list[tuple[str, str, int]] = []

        def join() -> None:
            deadline = time.monotonic() + 30
            while not any(
                layer.removeprefix("sha256:") in r.path for r in faulty_hub.cdn.requests()
            ):
                assert time.monotonic() < deadline, "the fill never began"
                time.sleep(0.02)
            joined.append(read_blob(relay, REPO, layer))

        second = threading.Thread(target=join)
        second.start()
        skopeo_copy(tmp_path, f"{relay.url.removeprefix('http://')}/{REPO}:1")
        second.join(timeout=120)
        assert_blobs_pulled(tmp_path, big)
        assert joined, "the second client did not finish"
        digest, how, size = joined[0]
        assert (digest, size) == (layer, layer_size(big))
        assert how == "join"
        # One fill from the CDN: its bodies were resumed, never started over.
        assert faulty_hub.cdn.bytes_sent < layer_size(big) + CUT
        assert resumes_logged(relay, layer, BIG // CUT) >= BIG // CUT
        cached = tmp_path / "relay" / "data" / "blobs" / "sha256"
        assert any(p.name == layer.removeprefix("sha256:") for p in cached.glob("*/*"))


def test_expired_cdn_urls_are_fetched_again_for_a_slow_client(
    faulty_hub: Hub, small: BuiltImage, tmp_path: Path
) -> None:
    """URLs live 5 s, the body is cut every 6 MiB, the client reads 1.5 MiB/s: the later
    resumes find their URL expired (403) and go back to the registry for a fresh redirect."""
    layer = layer_of(small)
    faulty_hub.cdn.reset_after = SLOW_CUT
    faulty_hub.cdn.url_ttl = 5.0
    with start_relay(tmp_path / "relay", faulty_hub, cache=False) as relay:
        digest, _, size = read_blob(relay, SMALL_REPO, layer, rate=SLOW_RATE)
        assert (digest, size) == (layer, layer_size(small))
        assert resumes_logged(relay, layer, 2) >= 2
        # A resume found its URL expired and went back to the registry for a fresh one.
        assert re.search(r"resuming \S+ at byte \d+ \(registry\): .*answered 403", relay.log_text())
        blob_gets = [p for m, p, _ in faulty_hub.registry_log() if p.endswith(layer) and m == "GET"]
        assert len(blob_gets) >= 2


def test_tokens_that_live_5_s_do_not_end_a_long_pull(
    faulty_hub: Hub, small: BuiltImage, tmp_path: Path
) -> None:
    """Tokens the registry honours for 5 s; URLs that expire; a slow client: the resumes go
    back to the registry, which refuses the client's expired token, and the relay gets a
    fresh one of its own."""
    layer = layer_of(small)
    faulty_hub.tokens.expires_in, faulty_hub.tokens.leeway = 5, 60
    faulty_hub.cdn.reset_after = SLOW_CUT
    faulty_hub.cdn.url_ttl = 2.0
    with start_relay(tmp_path / "relay", faulty_hub, cache=False) as relay:
        digest, _, size = read_blob(relay, SMALL_REPO, layer, rate=SLOW_RATE)
        assert (digest, size) == (layer, layer_size(small))
        refused = [s for m, p, s in faulty_hub.registry_log() if p.endswith(layer) and s == 401]
        assert refused, "the registry never refused an expired token: the test proves nothing"
        assert resumes_logged(relay, layer, 2) >= 2


@pytest.mark.parametrize("cache", [False, True])
def test_parallel_ranged_fetch_is_byte_exact_over_k_connections(
    faulty_hub: Hub, big: BuiltImage, tmp_path: Path, cache: bool
) -> None:
    """4 ranged connections to a CDN that throttles each one: skopeo gets the exact bytes;
    the CDN saw at most 5 connections for the layer (the first response and 4 ranges)
    and ranged requests on more than one of them. The speed-up is measured in bench/."""
    layer = layer_of(big)
    faulty_hub.cdn.throttle = 100 * MiB
    env = {
        "VPSRELAY_CACHE__ENABLED": "true" if cache else "false",
        "VPSRELAY_UPSTREAM__PARALLEL_CONNECTIONS": "4",
        "VPSRELAY_UPSTREAM__PARALLEL_MIN_SIZE": "64MiB",
    }
    relay_dir = tmp_path / "relay"
    with RelayProcess(
        relay_dir, "--upstream", f"docker.io={faulty_hub.registry_url}", env=env
    ) as relay:
        skopeo_copy(tmp_path, f"{relay.url.removeprefix('http://')}/{REPO}:1")
        assert_blobs_pulled(tmp_path, big)
        assert "ranges over 4 connections" in relay.log_text()
    hexpart = layer.removeprefix("sha256:")
    seen = [r for r in faulty_hub.cdn.requests() if hexpart in r.path and r.method == "GET"]
    connections = {r.client for r in seen}
    ranged = {r.client for r in seen if r.header("range")}
    assert len(ranged) >= 2, connections
    assert len(connections) <= 5, connections
    # Every byte was fetched once (plus what the first response sent before it closed).
    assert faulty_hub.cdn.bytes_sent < layer_size(big) + 16 * MiB


def test_a_cdn_that_cuts_only_the_first_response_costs_one_resume(
    faulty_hub: Hub, small: BuiltImage, tmp_path: Path
) -> None:
    layer = layer_of(small)
    faulty_hub.cdn.reset_after = SLOW_CUT
    faulty_hub.cdn.reset_first_only = True
    with start_relay(tmp_path / "relay", faulty_hub, cache=False) as relay:
        assert read_blob(relay, SMALL_REPO, layer)[::2] == (layer, layer_size(small))
        assert resumes_logged(relay, layer, 1) == 1
    assert faulty_hub.cdn.resets == 1
    ranged = [r.header("range") or "" for r in faulty_hub.cdn.requests() if r.header("range")]
    assert len(ranged) == 1, ranged
    # From the byte the relay had read: a reset drops what the kernel held unread.
    first, _, last = ranged[0].removeprefix("bytes=").partition("-")
    assert 0 < int(first) <= SLOW_CUT
    assert int(last) == layer_size(small) - 1


PARALLEL_ENV = {
    "VPSRELAY_CACHE__ENABLED": "false",
    "VPSRELAY_UPSTREAM__PARALLEL_CONNECTIONS": "4",
    "VPSRELAY_UPSTREAM__PARALLEL_MIN_SIZE": "8MiB",
}


def test_a_parallel_fetch_from_a_cdn_that_ignores_ranges_reads_on_over_one_stream(
    faulty_hub: Hub, small: BuiltImage, tmp_path: Path
) -> None:
    """The CDN says it takes ranges but answers each with the whole body: the relay keeps
    its first answer open until a range came, and reads the blob from it, byte-exact."""
    layer = layer_of(small)
    faulty_hub.cdn.ignore_range = True
    with RelayProcess(
        tmp_path / "relay", "--upstream", f"docker.io={faulty_hub.registry_url}", env=PARALLEL_ENV
    ) as relay:
        digest, _, size = read_blob(relay, SMALL_REPO, layer)
        log = relay.log_text()
    assert (digest, size) == (layer, layer_size(small))
    assert "ranges over 4 connections" in log
    assert "reading on over one connection" in log
    hexpart = layer.removeprefix("sha256:")
    ranged = [r for r in faulty_hub.cdn.requests() if hexpart in r.path and r.header("range")]
    assert 1 <= len(ranged) <= 2 * 4, ranged  # the workers stopped


def test_parallel_fetches_at_once_are_capped_for_the_process(
    faulty_hub: Hub, small: BuiltImage, tmp_path: Path
) -> None:
    """With `parallel_max_fetches = 1`, of two big blob reads at once one goes parallel
    and the other over one stream; both are byte-exact."""
    layer = layer_of(small)
    faulty_hub.cdn.throttle = 16 * MiB  # per connection: the reads overlap
    env = {**PARALLEL_ENV, "VPSRELAY_UPSTREAM__PARALLEL_MAX_FETCHES": "1"}
    results: list[tuple[str, str, int]] = []
    with RelayProcess(
        tmp_path / "relay", "--upstream", f"docker.io={faulty_hub.registry_url}", env=env
    ) as relay:
        readers = [
            threading.Thread(target=lambda: results.append(read_blob(relay, SMALL_REPO, layer)))
            for _ in range(2)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=30)
        log = relay.log_text()
    assert [(d, s) for d, _, s in results] == [(layer, layer_size(small))] * 2
    assert log.count("ranges over 4 connections") == 1
