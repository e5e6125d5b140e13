"""Issue 14: a client spreading its requests over the relay's workers to multiply its limits.

One relay with `--workers 2` (the real supervisor); each test first holds keep-alive
connections that each worker accepted (found by the access log's `worker=` label) and
checks the label of every request it makes. A client that reaches both workers must get
no more than one client's rate, streams and share of the traffic budget, and a token one
worker issued must be good in the other.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import httpx

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess
from tests.infra.workers import clients_by_worker, current_pids, label_of, new_marker, wait_for
from tests.security.test_limits import _refusals
from vpsrelay.access.clientauth import add_user

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import Blob

KiB = 1024
MiB = 1024 * KiB
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _big_layer(hub: Hub) -> Blob:
    big = hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    return max(big.layers, key=lambda blob: blob.size)


PROBES = 40  # new connections before each worker must hold the ones a test asks for


@contextlib.contextmanager
def _two_workers(tmp_path: Path, hub: Hub, toml: str) -> Iterator[RelayProcess]:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    with RelayProcess(tmp_path / "relay", "--workers", "2", *args) as relay:
        yield relay


def _probe(url: str) -> tuple[str, str]:
    """`url` with a fresh `probe=` marker, and the marker (to find who served it)."""
    marker = new_marker()
    return f"{url}{'&' if '?' in url else '?'}probe={marker}", marker


def _assert_oci_429(response: httpx.Response, reason_words: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert reason_words in error["message"]
    assert int(response.headers["retry-after"]) > 0


# --- the traffic budget --------------------------------------------------------------------


def test_a_budget_holds_for_downloads_through_both_workers(hub: Hub, tmp_path: Path) -> None:
    """Eight 600 KiB downloads at once, four on each worker, against 2 MiB a day: what the
    clients receive in all stays within the 2 MiB (each worker sends only bytes the shared
    counters granted it), the rest are refused with OCI 429s."""
    budget, length, count = 2 * MiB, 600 * KiB, 8
    layer = _big_layer(hub)
    toml = f"[limits]\nbudget_daily = {budget}\nstream_bytes_per_second = 262144\n"
    with (
        _two_workers(tmp_path, hub, toml) as relay,
        clients_by_worker(relay, count // 2, PROBES) as by_worker,
    ):
        clients = [client for pair in zip(*by_worker.values(), strict=True) for client in pair]
        headers = {
            "authorization": f"Bearer {_token(clients[0], relay.url, 'big')}",
            "range": f"bytes=0-{length - 1}",
        }
        start = threading.Barrier(count, timeout=30)
        results: list[tuple[int, int, bytes]] = [(0, 0, b"")] * count
        markers = [""] * count

        def get(slot: int) -> None:
            url, markers[slot] = _probe(f"{relay.url}/v2/big/blobs/{layer.digest}")
            start.wait()
            with clients[slot].stream("GET", url, headers=headers) as response:
                received, first = 0, b""
                for chunk in response.iter_raw(65536):
                    received += len(chunk)
                    first = first or chunk
                    if received >= length:
                        break
                results[slot] = (response.status_code, received, first)

        threads = [threading.Thread(target=get, args=(n,)) for n in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert not any(thread.is_alive() for thread in threads), "a download hung"
        served_by = [label_of(relay, marker) for marker in markers]
        # What is left of the budget is less than the whole layer, whichever worker asks.
        whole = {"authorization": headers["authorization"]}
        after = []
        for clients_of_one in by_worker.values():
            url, marker = _probe(f"{relay.url}/v2/big/blobs/{layer.digest}")
            after.append((clients_of_one[0].get(url, headers=whole), marker))
        after_by = {label_of(relay, marker) for _, marker in after}
        refused = _refusals(relay).count("budget_exhausted")
    assert sorted(served_by) == ["w1"] * 4 + ["w2"] * 4, served_by
    assert after_by == {"w1", "w2"}
    received = sum(size for status, size, _ in results if status == 206)
    assert received <= budget, f"{received} bytes received against a {budget}-byte budget"
    complete = [status for status, size, _ in results if status == 206 and size == length]
    assert len(complete) >= 2, results  # 2 MiB takes three; contention may cost one
    for status, _, body in results:
        assert status in (206, 429)
        if status == 429:
            _assert_oci_429(httpx.Response(429, content=body, headers={"retry-after": "1"}),
                            "traffic budget")  # fmt: skip
    for answer, _ in after:
        _assert_oci_429(answer, "traffic budget")
    assert refused >= count - len(complete)


def _token(client: httpx.Client, base_url: str, repository: str) -> str:
    response = client.get(
        f"{base_url}/token",
        params={"service": "registry.docker.io", "scope": f"repository:{repository}:pull"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


# --- the request rate ----------------------------------------------------------------------


def test_a_request_rate_holds_across_both_workers(hub: Hub, tmp_path: Path) -> None:
    """A burst of 5 (and one request a minute after): 20 requests alternating between the
    workers get 5 answers between them, not 5 from each."""
    toml = "[limits]\nrequests_per_second = 0.0166\nburst = 5\n"
    with (
        _two_workers(tmp_path, hub, toml) as relay,
        clients_by_worker(relay, 1, PROBES) as by_worker,  # /healthz is not rate-limited
    ):
        pair = [by_worker["w1"][0], by_worker["w2"][0]]
        began = time.monotonic()
        answers, markers = [], []
        for n in range(20):
            url, marker = _probe(f"{relay.url}/v2/")
            answers.append(pair[n % 2].get(url))
            markers.append(marker)
        elapsed = time.monotonic() - began
        served_by = [label_of(relay, marker) for marker in markers]
        refused = _refusals(relay).count("rate_limited")
    assert served_by == ["w1", "w2"] * 10  # both workers answered, in turn
    allowed = 5 + int(elapsed * 0.0166) + 1  # the burst, and what refilled meanwhile
    passed = [a for a in answers if a.status_code != 429]
    assert 5 <= len(passed) <= allowed, [a.status_code for a in answers]
    assert {a.status_code for a in passed} <= {200, 401}
    for answer in answers:
        if answer.status_code == 429:
            _assert_oci_429(answer, "too many requests")
    assert refused == 20 - len(passed)


# --- streams per client, and a worker killed while holding one ------------------------------


def test_streams_per_ip_hold_across_workers_and_a_killed_holders_slot_frees(
    hub: Hub, tmp_path: Path
) -> None:
    layer = _big_layer(hub)
    toml = "[limits]\nstreams_per_ip = 1\nstream_bytes_per_second = 1048576\n"
    with (
        _two_workers(tmp_path, hub, toml) as relay,
        clients_by_worker(relay, 1, PROBES) as by_worker,
    ):
        holder, other = by_worker["w1"][0], by_worker["w2"][0]
        headers = {
            "authorization": f"Bearer {_token(holder, relay.url, 'big')}",
            # A range passes through: 64 MiB at 1 MiB/s outlasts the test.
            "range": f"bytes=0-{64 * MiB - 1}",
        }
        path = f"{relay.url}/v2/big/blobs/{layer.digest}"
        # On w1's connection (its probe said so); w1 dies before it logs this one.
        holding = holder.send(holder.build_request("GET", path, headers=headers), stream=True)
        try:
            assert holding.status_code == 206
            chunks = holding.iter_raw(4096)  # kept: a dropped iterator closes the stream
            next(chunks)
            url, refused_marker = _probe(path)
            refused = other.get(url, headers=headers)
            _assert_oci_429(refused, "too many downloads at once")
            assert label_of(relay, refused_marker) == "w2"
            assert _refusals(relay) == ["concurrency_limited"]
            # The holder dies without a word: no release, no cleanup of its own.
            killed = current_pids(relay)["w1"]
            os.kill(killed, signal.SIGKILL)
            # Reaped (every thread gone, so its descriptors and locks are released): the
            # supervisor logs the exit after `wait` returns.
            said = f"worker w1 (pid {killed}) exited with"
            wait_for("w1 reaped", lambda: said in relay.log_text(), 10)
            deadline = time.monotonic() + 10
            statuses, markers = [], []
            while time.monotonic() < deadline:
                url, again_marker = _probe(path)
                markers.append(again_marker)
                with other.stream("GET", url, headers=headers) as again:
                    statuses.append(again.status_code)
                    if again.status_code == 206:
                        break
                time.sleep(0.2)
        finally:
            holding.close()
        assert {label_of(relay, m) for m in markers} == {"w2"}
        wait_for("w1 replaced", lambda: current_pids(relay)["w1"] != killed, 20)
    assert statuses[-1] == 206, statuses
    assert len(statuses) == 1  # freed at once: the kernel released the dead owner's lock
    assert f"released the stream slots of process {killed}" in relay.log_text()


# --- one signing key for every worker -------------------------------------------------------


def test_a_token_from_one_worker_is_good_in_the_other(hub: Hub, tmp_path: Path) -> None:
    """Both workers start on a fresh data dir and issue their first tokens at once: there
    is one signing key, and each accepts the other's tokens."""
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "alice's password", rounds=4)
    toml = f'[auth]\nenabled = true\nusers_file = "{users}"\n'
    with (
        _two_workers(tmp_path, hub, toml) as relay,
        clients_by_worker(relay, 1, PROBES) as by_worker,
    ):
        assert not (tmp_path / "relay" / "data" / "token.key").exists()  # made at first token
        pair = [by_worker["w1"][0], by_worker["w2"][0]]
        start = threading.Barrier(2, timeout=30)
        tokens: list[str] = ["", ""]
        login_markers = ["", ""]

        def login(slot: int) -> None:
            login_markers[slot] = marker = new_marker()
            start.wait()
            reply = pair[slot].get(
                f"{relay.url}/token",
                params={
                    "service": "vpsrelay",
                    "scope": "repository:alpine:pull",
                    "probe": marker,
                },
                auth=("alice", "alice's password"),
            )
            assert reply.status_code == 200, reply.text
            tokens[slot] = str(reply.json()["token"])

        threads = [threading.Thread(target=login, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(tokens), "a login failed"
        assert [label_of(relay, m) for m in login_markers] == ["w1", "w2"]
        for issuer, checker in ((0, 1), (1, 0)):
            url, marker = _probe(f"{relay.url}/v2/alpine/manifests/latest")
            answer = pair[checker].get(
                url,
                headers={"authorization": f"Bearer {tokens[issuer]}", "accept": OCI_MANIFEST},
            )
            assert answer.status_code == 200, answer.text
            assert label_of(relay, marker) == f"w{checker + 1}"
        forged = pair[1].get(
            f"{relay.url}/v2/alpine/manifests/latest",
            headers={"authorization": f"Bearer {tokens[0][:-4]}AAAA", "accept": OCI_MANIFEST},
        )
        assert forged.status_code == 401
