"""Issue 12, finding 1: HTTP/2 streams and connections opened, read, reset, cut and abandoned
in random orders against one relay for a bounded time. The relay must live through it,
serve a pull at the end, and hold no more than 64 MiB beyond what it held at the start.

The seed is printed and in every failure message; `VPSRELAY_CHAOS_SEED=N` replays one.
"""

from __future__ import annotations

import contextlib
import os
import random
import ssl
import time
from typing import TYPE_CHECKING

import h2.events
import h2.exceptions
import pytest

from tests.infra.relay import RelayProcess, pull_token
from tests.security.wire import (
    H2Client,
    assert_serving,
    big_layer,
    connect,
    cut,
    make_pki,
    plain_url,
    pull_alpine,
    tls_args,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

DURATION = 30.0  # seconds of chaos
MAX_ACTIONS = 3000
MAX_CONNECTIONS = 12
MiB = 1024 * 1024
RSS_SLACK = 64 * MiB


class Chaos:
    def __init__(self, relay: RelayProcess, hub: Hub, pki: dict[str, Path], seed: int) -> None:
        self.relay, self.pki, self.seed = relay, pki, seed
        self.rng = random.Random(seed)
        self.clients: list[H2Client] = []
        image = hub.images["library/alpine:latest"]
        assert hasattr(image, "layers")
        bearer = pull_token(plain_url(relay), "big")
        alpine = pull_token(plain_url(relay), "alpine")
        big = (("authorization", f"Bearer {bearer}"),)
        small = (("authorization", f"Bearer {alpine}"),)
        self.requests: list[tuple[str, tuple[tuple[str, str], ...]]] = [
            (f"/v2/big/blobs/{big_layer(hub)}", big),
            (f"/v2/alpine/blobs/{image.layers[0].digest}", small),
            ("/v2/alpine/manifests/latest", small),
            ("/token?service=registry.docker.io&scope=repository:library/alpine:pull", ()),
            ("/v2/", ()),
            ("/v2/nope/manifests/latest", small),
        ]
        self.counts: dict[str, int] = {}

    def _client(self) -> H2Client | None:
        return self.rng.choice(self.clients) if self.clients else None

    def _drop(self, client: H2Client, how: str) -> None:
        self.clients.remove(client)
        if how == "rst":
            cut(client.sock)
        elif how == "goaway":
            with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
                client.conn.close_connection()
                client.flush()
            client.sock.close()
        else:  # a close with whatever the relay sent still unread
            client.sock.close()

    def step(self) -> None:
        action = self.rng.choices(
            ["open", "stream", "read", "reset", "rst", "close", "goaway", "garbage", "idle"],
            weights=[3, 6, 6, 3, 2, 2, 1, 1, 1],
        )[0]
        if len(self.clients) >= MAX_CONNECTIONS and action == "open":
            action = "rst"
        self.counts[action] = self.counts.get(action, 0) + 1
        client = self._client()
        if action == "open" or client is None:
            transport = self.rng.choice(["h2c", "h2tls"])
            try:
                sock = connect(self.relay, transport, self.pki)
            except OSError as exc:
                self.assert_alive(f"connect: {exc!r}")
                return  # refused at the cap, or cut during the handshake: no harm
            try:
                self.clients.append(H2Client(sock, "127.0.0.1"))
            except OSError as exc:
                cut(sock)
                self.assert_alive(f"preface: {exc!r}")
            return
        try:
            if action == "stream":
                for _ in range(self.rng.randint(1, 4)):
                    path, headers = self.rng.choice(self.requests)
                    client.get(path, headers)
            elif action == "read":
                events = client.read(timeout=0.2, want_data=self.rng.choice([1, 65536, MiB]))
                if self.rng.random() < 0.5:  # open the windows: the relay sends more
                    for event in events:
                        if isinstance(event, h2.events.DataReceived) and event.stream_id:
                            with contextlib.suppress(h2.exceptions.ProtocolError):
                                client.conn.acknowledge_received_data(
                                    event.flow_controlled_length, event.stream_id
                                )
                    client.flush()
            elif action == "reset":
                open_streams = list(client.conn.streams)
                if open_streams:
                    client.reset(self.rng.choice(open_streams))
            elif action in ("rst", "close", "goaway"):
                self._drop(client, action)
            elif action == "garbage":
                client.sock.sendall(self.rng.randbytes(self.rng.randint(1, 64)))
                self._drop(client, "close")
            # "idle": the connection is left as it is, maybe for good
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            if client in self.clients:  # the relay ended it (a timeout, our garbage)
                self._drop(client, "rst")

    def assert_alive(self, after: str) -> None:
        assert self.relay.process.poll() is None, (
            f"seed {self.seed}: the relay exited ({after}) after {self.counts}:\n"
            f"{self.relay.log_text()[-3000:]}"
        )

    def close(self) -> None:
        for client in list(self.clients):
            self._drop(client, "rst")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


def test_random_h2_chaos_leaves_the_relay_serving_in_bounded_memory(
    hub: Hub, tmp_path: Path, pki: dict[str, Path]
) -> None:
    seed = int(os.environ.get("VPSRELAY_CHAOS_SEED", "0")) or random.randrange(1, 2**32)
    print(f"chaos seed {seed}")
    with RelayProcess(
        tmp_path / "relay",
        "--upstream", f"docker.io={hub.registry_url}", *tls_args(pki),
        env={"VPSRELAY_CACHE__ENABLED": "false"},
    ) as relay:  # fmt: skip
        pull_alpine(tmp_path / "warm", relay, hub)  # imports, pools, buffers
        start_rss = relay.rss_bytes()
        chaos = Chaos(relay, hub, pki, seed)
        began = time.monotonic()
        actions = 0
        try:
            while actions < MAX_ACTIONS and time.monotonic() - began < DURATION:
                chaos.step()
                actions += 1
                if actions % 20 == 0:
                    chaos.assert_alive(f"{actions} actions")
        finally:
            chaos.close()
        print(f"seed {seed}: {actions} actions {chaos.counts}")
        time.sleep(2.0)  # the relay notices the last cuts
        assert relay.process.poll() is None, f"seed {seed}:\n{relay.log_text()[-3000:]}"
        assert_serving(relay, pki)
        pull_alpine(tmp_path / "end", relay, hub)
        grown = relay.rss_bytes() - start_rss
        print(f"seed {seed}: RSS {start_rss / MiB:.1f} MiB at start, grew {grown / MiB:.1f} MiB")
        assert grown < RSS_SLACK, f"seed {seed}: RSS grew {grown / MiB:.0f} MiB"
        # Contained errors (logged, counted) are survivable; say how many there were.
        print(f"seed {seed}: {relay.log_text().count('ended by an error')} contained errors")
