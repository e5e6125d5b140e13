"""Issue 12, findings 11 and 14: the traffic budget and per-client limits, attacked.

* Budgets: many downloads started at once must not spend more than the budget (the
  charge used to come only at each download's end, so every concurrent one was let in).
* IPv6: one host owns a whole /64; keyed by exact address it would get a fresh rate
  bucket and stream count per address it picks. This machine has one IPv6 loopback
  address, so the addresses come through a trusted proxy's `X-Forwarded-For` (the relay
  listens on [::1] and trusts ::1), which is how the relay learns them behind one anyway.
"""

from __future__ import annotations

import re
import threading
import time
from typing import TYPE_CHECKING

import httpx

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import Blob

ONE_64 = "2001:db8:1:2"  # the attacker's /64
MiB = 1024 * 1024
BUDGET = 1 * MiB


def _refusals(relay: RelayProcess) -> list[str]:
    return [
        found[1]
        for line in relay.log_text().splitlines()
        if "logger=vpsrelay.guard" in line and "refused" in line
        if (found := re.search(r"reason=([a-z_]+)", line))
    ]


def _big_layer(hub: Hub) -> Blob:
    big = hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    return max(big.layers, key=lambda blob: blob.size)


def _behind_proxy(tmp_path: Path, hub: Hub, limits: str) -> RelayProcess:
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\ntrusted_proxies = ["::1/128"]\n[limits]\n{limits}')
    return RelayProcess(
        tmp_path / "relay", "--config", str(config), "--listen", "[::1]:0",
        "--upstream", f"docker.io={hub.registry_url}",
    )  # fmt: skip


def test_one_ipv6_64_shares_one_request_rate_bucket(hub: Hub, tmp_path: Path) -> None:
    attempts = 12
    with (
        _behind_proxy(tmp_path, hub, "requests_per_second = 0.01\nburst = 3\n") as relay,
        httpx.Client(timeout=10) as client,
    ):
        assert relay.url.startswith("http://[::1]:")
        statuses = [
            client.get(f"{relay.url}/", headers={"x-forwarded-for": f"{ONE_64}::{n:x}"}).status_code
            for n in range(1, attempts + 1)
        ]
        other = client.get(f"{relay.url}/", headers={"x-forwarded-for": "2001:db8:1:3::1"})
    # Three for the burst, then the /64's bucket is empty, whichever address it picks.
    assert statuses == [200] * 3 + [429] * (attempts - 3), statuses
    assert other.status_code == 200  # the next /64 is another client
    assert _refusals(relay).count("rate_limited") == attempts - 3


def test_one_ipv6_64_shares_one_stream_count(hub: Hub, tmp_path: Path) -> None:
    layer = _big_layer(hub)
    limits = "streams_per_ip = 1\nstream_bytes_per_second = 1048576\n"
    with _behind_proxy(tmp_path, hub, limits) as relay, httpx.Client(timeout=30) as client:
        token = pull_token(relay.url, "big")
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"

        def get_from(address: str) -> httpx.Response:
            # A range passes through (no 300 MiB cache fill); 64 MiB at 1 MiB/s outlasts the test.
            headers = {
                "authorization": f"Bearer {token}",
                "x-forwarded-for": address,
                "range": f"bytes=0-{64 * MiB - 1}",
            }
            return client.send(client.build_request("GET", url, headers=headers), stream=True)

        first = get_from(f"{ONE_64}::1")
        try:
            assert first.status_code == 206
            first_chunks = first.iter_raw(4096)  # kept: a dropped iterator closes the stream
            next(first_chunks)  # streaming, slowly, and holding its slot
            statuses = []
            for n in range(2, 6):
                second = get_from(f"{ONE_64}::{n:x}")
                statuses.append(second.status_code)
                second.close()
            other = get_from("2001:db8:1:3::1")
            other_status = other.status_code
            other.close()
        finally:
            first.close()
    assert statuses == [429] * 4, statuses
    assert other_status == 206
    assert _refusals(relay).count("concurrency_limited") == 4


# --- finding 11: the traffic budget under concurrent downloads ------------------------------


def _served_bytes(relay: RelayProcess) -> int:
    """What the relay's access log says it sent for blob downloads."""
    return sum(
        int(found[1])
        for line in relay.log_text().splitlines()
        if "logger=vpsrelay.access" in line and "kind=blob" in line
        if (found := re.search(r" bytes=(\d+)", line))
    )


def _served_bytes_once_logged(relay: RelayProcess, downloads: int, timeout: float = 10) -> int:
    """`_served_bytes`, once `downloads` blob downloads are logged (a client may have read
    the last byte before the relay writes its line)."""
    deadline = time.monotonic() + timeout
    while relay.log_text().count("kind=blob") < downloads and time.monotonic() < deadline:
        time.sleep(0.05)
    return _served_bytes(relay)


def _concurrent_gets(
    url: str, headers: dict[str, str], count: int, read_cap: int
) -> list[tuple[int, int]]:
    """`count` GETs started together (one thread each); (status, bytes read) for each,
    each read stopped at `read_cap` bytes and bounded in time by the client's timeouts."""
    results: list[tuple[int, int]] = [(0, 0)] * count
    start = threading.Barrier(count, timeout=30)

    def get(slot: int) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            with client.stream("GET", url, headers=headers) as response:
                received = 0
                for chunk in response.iter_raw(65536):
                    received += len(chunk)
                    if received >= read_cap:
                        break
                results[slot] = (response.status_code, received)

    threads = [threading.Thread(target=get, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "a download hung"
    return results


def _budget_relay(tmp_path: Path, hub: Hub, limits: str) -> RelayProcess:
    config = tmp_path / "relay.toml"
    config.write_text(f"[limits]\nbudget_daily = {BUDGET}\n{limits}")
    return RelayProcess(
        tmp_path / "relay", "--config", str(config), "--upstream", f"docker.io={hub.registry_url}"
    )


def test_concurrent_downloads_stay_within_the_budget(hub: Hub, tmp_path: Path) -> None:
    """Eight 400 KiB downloads at once against 1 MiB a day: two fit, six get 429.

    Paced at 128 KiB/s each, so all eight are in flight together: before the fix none had
    been charged when the others were admitted, and all eight were served (3.2 MiB).
    """
    layer = _big_layer(hub)
    length, count = 400 * 1024, 8
    with _budget_relay(tmp_path, hub, "stream_bytes_per_second = 131072\n") as relay:
        headers = {
            "authorization": f"Bearer {pull_token(relay.url, 'big')}",
            "range": f"bytes=0-{length - 1}",
        }
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        results = _concurrent_gets(url, headers, count, read_cap=length)
        served = _served_bytes(relay)
        refused = httpx.get(url, headers=headers, timeout=30)
    received = sum(size for _, size in results)
    statuses = sorted(status for status, _ in results)
    assert received <= BUDGET, f"{received} bytes received against a {BUDGET}-byte budget"
    assert served <= BUDGET, f"{served} bytes served against a {BUDGET}-byte budget"
    assert statuses == [206] * (BUDGET // length) + [429] * (count - BUDGET // length), statuses
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    assert _refusals(relay).count("budget_exhausted") == count - BUDGET // length + 1


def test_a_blob_bigger_than_the_budget_is_refused_before_its_first_byte(
    hub: Hub, tmp_path: Path
) -> None:
    """Four downloads at once of a 300 MiB layer against 1 MiB: before the fix each was
    admitted (nothing charged yet) and streamed; each client here stops at 2 MiB."""
    layer = _big_layer(hub)
    assert layer.size > BUDGET
    with _budget_relay(tmp_path, hub, "") as relay:
        headers = {"authorization": f"Bearer {pull_token(relay.url, 'big')}"}
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        results = _concurrent_gets(url, headers, 4, read_cap=2 * MiB)
        served = _served_bytes(relay)
    received = sum(size for _, size in results)
    assert received <= BUDGET, f"{received} bytes received against a {BUDGET}-byte budget"
    assert served <= BUDGET, f"{served} bytes served against a {BUDGET}-byte budget"
    assert [status for status, _ in results] == [429] * 4
    # Refused before the hook too: no cache fill began for the refused download.
    hexpart = layer.digest.removeprefix("sha256:")
    data = tmp_path / "relay" / "data"
    assert not (data / "blobs" / "sha256" / hexpart[:2] / hexpart).exists()
    assert list((data / "tmp").iterdir()) == []


# --- the budget's holds: slow readers must not lock everyone else out ------------------------

ATTACKER = "127.0.0.2"  # one client (limit key); the relay listens on 127.0.0.1
VICTIM = "127.0.0.3"


def _client_from(address: str) -> httpx.Client:
    """A client whose connections leave from `address` (any 127/8 address is loopback)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_slow_readers_of_big_downloads_do_not_exhaust_the_budget_for_others(
    hub: Hub, tmp_path: Path
) -> None:
    """One client opens four downloads whose lengths add up to the whole budget (the 300 MiB
    layer twice: one cache fill and one fill join; two 32 MiB ranges, passed through) and
    reads them a trickle at a time. Before the fix each download held its whole length
    until it ended, so the budget counted as spent and every other client got 429
    budget_exhausted for as long as the attacker kept reading; now a download holds only a
    bounded look-ahead past what it has sent, and the small download goes through."""
    layer = _big_layer(hub)
    alpine = hub.images["library/alpine:latest"]
    assert isinstance(alpine, BuiltImage)
    range_length = 32 * MiB
    budget = 2 * layer.size + 2 * range_length
    config = tmp_path / "relay.toml"
    config.write_text(f"[limits]\nstreams_per_ip = 8\nbudget_daily = {budget}\n")
    with (
        RelayProcess(
            tmp_path / "relay", "--config", str(config),
            "--upstream", f"docker.io={hub.registry_url}",
        ) as relay,
        _client_from(ATTACKER) as attacker,
        _client_from(VICTIM) as victim,
    ):  # fmt: skip
        big_token = pull_token(relay.url, "big")
        big_url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        ranges = [None, None, f"bytes=0-{range_length - 1}", f"bytes=1-{range_length}"]
        streams: list[httpx.Response] = []
        try:
            for byte_range in ranges:
                headers = {"authorization": f"Bearer {big_token}"}
                if byte_range is not None:
                    headers["range"] = byte_range
                request = attacker.build_request("GET", big_url, headers=headers)
                streams.append(attacker.send(request, stream=True))
            assert [s.status_code for s in streams] == [200, 200, 206, 206]
            # Kept: a dropped iterator closes its stream.
            trickles = [stream.iter_raw(16384) for stream in streams]
            for _ in range(5):  # a trickle: 16 KiB a stream now and then, never the whole
                for trickle in trickles:
                    next(trickle)
            alpine_token = pull_token(relay.url, "alpine")
            small = victim.get(
                f"{relay.url}/v2/alpine/blobs/{alpine.config.digest}",
                headers={"authorization": f"Bearer {alpine_token}"},
            )
            for trickle in trickles:  # the attacker's downloads are all still going
                next(trickle)
        finally:
            for stream in streams:
                stream.close()
    assert small.status_code == 200, small.text
    assert len(small.content) == alpine.config.size
    assert "budget_exhausted" not in _refusals(relay)


def _read_until_cut(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[int, int]:
    """(status, bytes read) of one GET, read to its end or to where the relay cut it."""
    received = 0
    with client.stream("GET", url, headers=headers) as response:
        try:
            for chunk in response.iter_raw(65536):
                received += len(chunk)
        except httpx.RemoteProtocolError:
            pass  # cut off mid-body: a short read
        return response.status_code, received


def test_downloads_admitted_together_are_cut_at_the_budget_never_past_it(
    hub: Hub, tmp_path: Path
) -> None:
    """Two 8 MiB downloads from two clients against 12 MiB: each fits what is left when it
    starts (neither holds its whole length), so both are admitted; paced, they run side by
    side, and the budget runs out under them: cut off mid-body, never served past it."""
    layer = _big_layer(hub)
    length, budget = 8 * MiB, 12 * MiB
    config = tmp_path / "relay.toml"
    config.write_text(f"[limits]\nbudget_daily = {budget}\nstream_bytes_per_second = {2 * MiB}\n")
    results: list[tuple[int, int]] = [(0, 0), (0, 0)]
    with RelayProcess(
        tmp_path / "relay", "--config", str(config), "--upstream", f"docker.io={hub.registry_url}"
    ) as relay:
        headers = {
            "authorization": f"Bearer {pull_token(relay.url, 'big')}",
            "range": f"bytes=0-{length - 1}",
        }
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        start = threading.Barrier(2, timeout=30)

        def get(slot: int, address: str) -> None:
            with _client_from(address) as client:
                start.wait()
                results[slot] = _read_until_cut(client, url, headers)

        threads = [
            threading.Thread(target=get, args=(n, address))
            for n, address in enumerate((ATTACKER, VICTIM))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads), "a download hung"
        served = _served_bytes_once_logged(relay, downloads=2)
        after = httpx.get(url, headers=headers, timeout=30)
    assert [status for status, _ in results] == [206, 206], results
    received = sum(size for _, size in results)
    assert received <= budget, f"{received} bytes received against a {budget}-byte budget"
    assert served <= budget, f"{served} bytes served against a {budget}-byte budget"
    assert min(size for _, size in results) < length  # one (at least) was cut off
    assert after.status_code == 429
    assert "budget_exhausted" in _refusals(relay)  # the cut is counted, though no 429 told it
