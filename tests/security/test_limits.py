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
from typing import TYPE_CHECKING

import httpx

from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub
    from tests.infra.oci import Blob

ONE_64 = "2001:db8:1:2"  # the attacker's /64


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
            headers = {"authorization": f"Bearer {token}", "x-forwarded-for": address}
            return client.send(client.build_request("GET", url, headers=headers), stream=True)

        first = get_from(f"{ONE_64}::1")
        try:
            assert first.status_code == 200
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
    assert other_status == 200
    assert _refusals(relay).count("concurrency_limited") == 4
