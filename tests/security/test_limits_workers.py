"""Issue 14: a client spreading its requests over the relay's processes to multiply its limits.

The relay's workers are processes sharing one data dir; two `RelayProcess`es on one
`--data-dir` (different ports), each told which worker it is as the supervisor tells
them (`_VPSRELAY_WORKER`), are that, whatever starts them. A client that reaches
both must get no more than one client's rate, streams and share of the traffic budget,
and a token one process issued must be good in the other.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from typing import TYPE_CHECKING

import httpx

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token
from tests.security.test_limits import _refusals
from vpsrelay.access.clientauth import add_user
from vpsrelay.worker_identity import ENVIRONMENT_NAME as WORKER

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


@contextlib.contextmanager
def _two_processes(tmp_path: Path, hub: Hub, toml: str) -> Iterator[list[RelayProcess]]:
    """Two relays on one data dir, started at once (as a supervisor starts its workers)."""
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    args = ("--config", str(config), "--data-dir", str(tmp_path / "data"),
            "--upstream", f"docker.io={hub.registry_url}")  # fmt: skip
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [
            # What the supervisor tells each worker (the rate check shares its buckets then).
            pool.submit(RelayProcess, tmp_path / f"w{n}", *args, env={WORKER: f"{n}/2"})
            for n in (1, 2)
        ]
        yield [stack.enter_context(future.result(timeout=60)) for future in starting]


def _assert_oci_429(response: httpx.Response, reason_words: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "TOOMANYREQUESTS"
    assert reason_words in error["message"]
    assert int(response.headers["retry-after"]) > 0


# --- the traffic budget --------------------------------------------------------------------


def test_a_budget_holds_for_downloads_through_both_processes(hub: Hub, tmp_path: Path) -> None:
    """Eight 600 KiB downloads at once, four through each process, against 2 MiB a day:
    what the clients receive in all stays within the 2 MiB (each process sends only bytes
    the shared counters granted it), the rest are refused with OCI 429s."""
    budget, length, count = 2 * MiB, 600 * KiB, 8
    layer = _big_layer(hub)
    toml = f"[limits]\nbudget_daily = {budget}\nstream_bytes_per_second = 262144\n"
    with _two_processes(tmp_path, hub, toml) as relays:
        headers = {
            "authorization": f"Bearer {pull_token(relays[0].url, 'big')}",
            "range": f"bytes=0-{length - 1}",
        }
        start = threading.Barrier(count, timeout=30)
        results: list[tuple[int, int, bytes]] = [(0, 0, b"")] * count

        def get(slot: int) -> None:
            url = f"{relays[slot % 2].url}/v2/big/blobs/{layer.digest}"
            with httpx.Client(timeout=30) as client:
                start.wait()
                with client.stream("GET", url, headers=headers) as response:
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
        # What is left of the budget is less than the whole layer, whichever process asks.
        whole = {"authorization": headers["authorization"]}
        after = [
            httpx.get(f"{relay.url}/v2/big/blobs/{layer.digest}", headers=whole, timeout=30)
            for relay in relays
        ]
    received = sum(size for status, size, _ in results if status == 206)
    assert received <= budget, f"{received} bytes received against a {budget}-byte budget"
    complete = [status for status, size, _ in results if status == 206 and size == length]
    assert len(complete) >= 2, results  # 2 MiB takes three; contention may cost one
    for status, _, body in results:
        assert status in (206, 429)
        if status == 429:
            _assert_oci_429(httpx.Response(429, content=body, headers={"retry-after": "1"}),
                            "traffic budget")  # fmt: skip
    for answer in after:
        _assert_oci_429(answer, "traffic budget")
    refused = sum(_refusals(relay).count("budget_exhausted") for relay in relays)
    assert refused >= count - len(complete)


# --- the request rate ----------------------------------------------------------------------


def test_a_request_rate_holds_across_both_processes(hub: Hub, tmp_path: Path) -> None:
    """A burst of 5 (and one request a minute after): 20 requests alternating between the
    processes get 5 answers between them, not 5 from each."""
    toml = "[limits]\nrequests_per_second = 0.0166\nburst = 5\n"
    with _two_processes(tmp_path, hub, toml) as relays, httpx.Client(timeout=10) as client:
        began = time.monotonic()
        answers = [client.get(f"{relays[n % 2].url}/v2/") for n in range(20)]
        elapsed = time.monotonic() - began
    allowed = 5 + int(elapsed * 0.0166) + 1  # the burst, and what refilled meanwhile
    passed = [a for a in answers if a.status_code != 429]
    assert 5 <= len(passed) <= allowed, [a.status_code for a in answers]
    assert {a.status_code for a in passed} <= {200, 401}
    for answer in answers:
        if answer.status_code == 429:
            _assert_oci_429(answer, "too many requests")
    refused = sum(_refusals(relay).count("rate_limited") for relay in relays)
    assert refused == 20 - len(passed)


# --- streams per client, and a process killed while holding one -----------------------------


def test_streams_per_ip_hold_across_processes_and_a_killed_holders_slot_frees(
    hub: Hub, tmp_path: Path
) -> None:
    layer = _big_layer(hub)
    toml = "[limits]\nstreams_per_ip = 1\nstream_bytes_per_second = 1048576\n"
    with _two_processes(tmp_path, hub, toml) as (first, second):
        headers = {
            "authorization": f"Bearer {pull_token(first.url, 'big')}",
            # A range passes through: 64 MiB at 1 MiB/s outlasts the test.
            "range": f"bytes=0-{64 * MiB - 1}",
        }
        path = f"/v2/big/blobs/{layer.digest}"
        with httpx.Client(timeout=30) as client:
            holding = client.send(
                client.build_request("GET", first.url + path, headers=headers), stream=True
            )
            try:
                assert holding.status_code == 206
                chunks = holding.iter_raw(4096)  # kept: a dropped iterator closes the stream
                next(chunks)
                refused = client.get(second.url + path, headers=headers)
                _assert_oci_429(refused, "too many downloads at once")
                assert _refusals(second) == ["concurrency_limited"]
                # The holder dies without a word: no release, no cleanup of its own.
                first.process.kill()
                first.process.wait(10)
                deadline = time.monotonic() + 10
                statuses = []
                while time.monotonic() < deadline:
                    with client.stream("GET", second.url + path, headers=headers) as again:
                        statuses.append(again.status_code)
                        if again.status_code == 206:
                            break
                    time.sleep(0.2)
            finally:
                holding.close()
    assert statuses[-1] == 206, statuses
    assert len(statuses) == 1  # freed at once: the kernel released the dead owner's lock
    assert "released the stream slots of process" in second.log_text()


# --- one signing key for every process ------------------------------------------------------


def test_a_token_from_one_process_is_good_in_the_other(hub: Hub, tmp_path: Path) -> None:
    """Both processes start on a fresh data dir and issue their first tokens at once:
    there is one signing key, and each accepts the other's tokens."""
    users = tmp_path / "htpasswd"
    add_user(users, "alice", "alice's password", rounds=4)
    toml = f'[auth]\nenabled = true\nusers_file = "{users}"\n'
    with _two_processes(tmp_path, hub, toml) as relays:
        assert not (tmp_path / "data" / "token.key").exists()  # made at the first token
        start = threading.Barrier(2, timeout=30)
        tokens: list[str] = ["", ""]

        def login(slot: int) -> None:
            start.wait()
            reply = httpx.get(
                f"{relays[slot].url}/token",
                params={"service": "vpsrelay", "scope": "repository:alpine:pull"},
                auth=("alice", "alice's password"),
                timeout=30,
            )
            assert reply.status_code == 200, reply.text
            tokens[slot] = str(reply.json()["token"])

        threads = [threading.Thread(target=login, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(tokens), "a login failed"
        for issuer, checker in ((0, 1), (1, 0)):
            answer = httpx.get(
                f"{relays[checker].url}/v2/alpine/manifests/latest",
                headers={"authorization": f"Bearer {tokens[issuer]}", "accept": OCI_MANIFEST},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
        forged = httpx.get(
            f"{relays[1].url}/v2/alpine/manifests/latest",
            headers={"authorization": f"Bearer {tokens[0][:-4]}AAAA", "accept": OCI_MANIFEST},
            timeout=30,
        )
        assert forged.status_code == 401
