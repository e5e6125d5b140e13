"""Issue 5: a public relay that only its owners can use.

Real parts throughout: the relay as a subprocess, the Docker Hub stand-in (Distribution
with token auth, its token server and CDN), skopeo, dockerd in a loopback-only network
namespace, raw sockets for what no polite client sends. Attacks aim at sentinels on
loopback addresses (they count connections); targets that are not on this machine
(169.254.169.254, 10.1.2.3, fd00::1) are refused before any connect, which the relay's
log states, so no packet leaves the machine.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.clients import DockerDaemon
from tests.infra.limitsdb import budget_counters
from tests.infra.oci import BuiltImage
from tests.infra.relay import RelayProcess, pull_token
from tests.integration.test_registries import Sentinel, assert_pulled, skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
PULL_TOKEN = "static-pull-token-0123456789abcdef"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _alpine(hub: Hub) -> BuiltImage:
    image = hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    return image


def _host(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


def _write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _refusals(relay: RelayProcess, mark: int = 0) -> list[str]:
    """The reasons of the guard's `refused ... reason=X: ...` log lines (logfmt)."""
    return [
        found[1]
        for line in relay.log_text()[mark:].splitlines()
        if "logger=vpsrelay.guard" in line and "refused" in line
        if (found := re.search(r"reason=([a-z_]+)", line))
    ]


# --- client authentication ------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An htpasswd file written by the real `vpsrelay user add`."""
    path = tmp_path_factory.mktemp("users") / "htpasswd"
    for user in ("alice", "bob"):
        subprocess.run(
            [sys.executable, "-m", "vpsrelay", "user", "add", user, "--password-stdin",
             "--file", str(path)],
            input=f"{PASSWORD}-{user}\n" if user == "bob" else f"{PASSWORD}\n",
            text=True, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    assert path.stat().st_mode & 0o777 == 0o600
    return path


@pytest.fixture(scope="module")
def auth_relay(
    hub: Hub, users_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("auth-relay")
    config = _write_config(
        workdir / "relay.toml",
        f'[auth]\nenabled = true\nusers_file = "{users_file}"\npull_tokens = ["{PULL_TOKEN}"]\n',
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    with RelayProcess(workdir, *args) as process:
        yield process


def test_skopeo_with_credentials_pulls_and_without_fails(
    auth_relay: RelayProcess, clean_hub: Hub, tmp_path: Path
) -> None:
    ref = f"{_host(auth_relay)}/alpine:latest"
    for extra in ((), ("--src-creds=alice:wrong",), ("--src-creds=mallory:" + PASSWORD,)):
        failed = skopeo_copy(tmp_path, ref, *extra, check=False)
        assert failed.returncode != 0, extra
        assert "401" in failed.stderr or "unauthorized" in failed.stderr.lower(), failed.stderr
    # Nothing was fetched upstream for the refused clients.
    assert not [p for _, p in clean_hub.registry_requests() if "/manifests/" in p]
    skopeo_copy(tmp_path, ref, f"--src-creds=alice:{PASSWORD}")
    assert_pulled(tmp_path, _alpine(clean_hub))
    # The relay obtained the upstream token itself, anonymously (no operator credentials).
    token_requests = clean_hub.tokens.requests()
    assert token_requests
    assert all(r.header("authorization") is None for r in token_requests)
    # A static pull token works as the password, with any user name.
    skopeo_copy(tmp_path, ref, f"--src-creds=ci:{PULL_TOKEN}")
    assert_pulled(tmp_path, _alpine(clean_hub))
    assert PASSWORD not in auth_relay.log_text()


def test_relay_token_is_scoped_to_the_repositories_asked_for(
    auth_relay: RelayProcess, clean_hub: Hub
) -> None:
    url = auth_relay.url
    base = httpx.get(f"{url}/v2/")
    assert base.status_code == 401
    assert base.headers["www-authenticate"] == f'Bearer realm="{url}/token",service="vpsrelay"'
    refused = httpx.get(f"{url}/token", params={"scope": "repository:alpine:pull"})
    assert refused.status_code == 401
    wrong = httpx.get(
        f"{url}/token", params={"scope": "repository:alpine:pull"}, auth=("bob", PASSWORD)
    )
    assert wrong.status_code == 401
    reply = httpx.get(
        f"{url}/token",
        params={"service": "vpsrelay", "scope": "repository:alpine:pull"},
        auth=("alice", PASSWORD),
    )
    assert reply.status_code == 200, reply.text
    token = reply.json()["token"]
    assert 0 < reply.json()["expires_in"] <= 300
    bearer = {"authorization": f"Bearer {token}", "accept": OCI_MANIFEST}
    assert httpx.get(f"{url}/v2/", headers=bearer).status_code == 200
    ok = httpx.get(f"{url}/v2/alpine/manifests/latest", headers=bearer)
    assert ok.status_code == 200, ok.text
    assert ok.headers["docker-content-digest"] == _alpine(clean_hub).manifest_digest
    clean_hub.clear_registry_requests()
    for other in ("someuser/tool/manifests/1.0", "library/multi/manifests/latest"):
        response = httpx.get(f"{url}/v2/{other}", headers=bearer)
        assert response.status_code == 401, other
        challenge = response.headers["www-authenticate"]
        repository = other.rsplit("/manifests/", 1)[0]
        assert f'scope="repository:{repository}:pull"' in challenge
        assert f'realm="{url}/token"' in challenge
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert httpx.get(f"{url}/v2/", headers={"authorization": f"Bearer {forged}"}).status_code == 401
    # None of the refused requests reached the upstream.
    assert clean_hub.registry_requests() == []
    # A static pull token opens everything, directly as a Bearer token.
    static = {"authorization": f"Bearer {PULL_TOKEN}", "accept": OCI_MANIFEST}
    assert httpx.get(f"{url}/v2/someuser/tool/manifests/1.0", headers=static).status_code == 200
    reasons = _refusals(auth_relay)
    assert {"no_credentials", "bad_credentials", "token_scope", "token_invalid"} <= set(reasons)


def test_oauth2_post_flow_and_refresh_tokens(auth_relay: RelayProcess, clean_hub: Hub) -> None:
    url = auth_relay.url
    form = {
        "grant_type": "password", "username": "alice", "password": PASSWORD,
        "service": "vpsrelay", "client_id": "test", "access_type": "offline",
        "scope": "repository:alpine:pull",
    }  # fmt: skip
    reply = httpx.post(f"{url}/token", data=form)
    assert reply.status_code == 200, reply.text
    refresh = reply.json()["refresh_token"]
    assert reply.json()["scope"] == "repository:library/alpine:pull"
    renewed = httpx.post(
        f"{url}/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh, "service": "vpsrelay",
              "client_id": "test", "scope": "repository:alpine:pull"},
    )  # fmt: skip
    assert renewed.status_code == 200, renewed.text
    headers = {"authorization": f"Bearer {renewed.json()['access_token']}", "accept": OCI_MANIFEST}
    assert httpx.get(f"{url}/v2/alpine/manifests/latest", headers=headers).status_code == 200
    # A refresh token is no access token, and an access token is no refresh token.
    assert (
        httpx.get(f"{url}/v2/", headers={"authorization": f"Bearer {refresh}"}).status_code == 401
    )
    swapped = httpx.post(
        f"{url}/token",
        data={"grant_type": "refresh_token", "refresh_token": renewed.json()["access_token"],
              "service": "vpsrelay"},
    )  # fmt: skip
    assert swapped.status_code == 401
    wrong = httpx.post(f"{url}/token", data={**form, "password": "nope"})
    assert wrong.status_code == 401


@pytest.mark.clients
def test_docker_login_then_pull(auth_relay: RelayProcess, clean_hub: Hub, tmp_path: Path) -> None:
    image = _alpine(clean_hub)
    registry = _host(auth_relay)
    with DockerDaemon(tmp_path / "dockerd", forward_ports=[auth_relay.port]) as dockerd:
        anonymous = dockerd.docker("pull", f"{registry}/alpine", check=False)
        assert anonymous.returncode != 0
        assert "unauthorized" in (anonymous.stderr + anonymous.stdout).lower()
        bad = dockerd.docker("login", "-u", "alice", "-p", "wrong", registry, check=False)
        assert bad.returncode != 0
        mark = len(auth_relay.log_text())
        dockerd.docker("login", "-u", "alice", "-p", PASSWORD, registry)
        dockerd.docker("pull", f"{registry}/alpine")
        image_id = dockerd.docker("image", "inspect", "--format", "{{.Id}}", f"{registry}/alpine")
        assert image_id.stdout.strip() == image.config.digest
        log = auth_relay.log_text()[mark:]
        assert "token for user=alice repositories=library/alpine" in log
        for layer in image.layers:
            assert any(layer.digest in line and "status=200" in line for line in log.splitlines())
        dockerd.docker("logout", registry)
        dockerd.docker("rmi", f"{registry}/alpine")
        again = dockerd.docker("pull", f"{registry}/alpine", check=False)
        assert again.returncode != 0


# --- who may connect: IP lists behind a trusted proxy ----------------------------------------


@pytest.fixture(scope="module")
def ip_relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("ip-relay")
    config = _write_config(
        workdir / "relay.toml",
        '[server]\ntrusted_proxies = ["127.0.0.2/32"]\n'
        '[access]\nallow_ips = ["203.0.113.0/24", "2001:db8::/32"]\ndeny_ips = ["203.0.113.66"]\n',
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    with RelayProcess(workdir, *args) as process:
        yield process


def _from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "allowed"),
    [
        ("127.0.0.2", "203.0.113.7", True),  # the trusted proxy vouches for an allowed client
        ("127.0.0.2", "2001:db8::7", True),
        ("127.0.0.2", "198.51.100.7", False),
        ("127.0.0.2", "203.0.113.66", False),  # on the deny list
        ("127.0.0.2", None, False),  # the proxy itself is not allowed
        ("127.0.0.2", "203.0.113.7, 198.51.100.9", False),  # rightmost untrusted hop counts
        ("127.0.0.1", "203.0.113.7", False),  # spoofed: the peer is no trusted proxy
        ("127.0.0.1", None, False),
    ],
)
def test_ip_allow_list_via_trusted_proxy(
    ip_relay: RelayProcess, clean_hub: Hub, peer: str, forwarded_for: str | None, allowed: bool
) -> None:
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    mark = len(ip_relay.log_text())
    with _from(peer) as client:
        response = client.get(f"{ip_relay.url}/v2/alpine/manifests/latest", headers=headers)
    if allowed:
        assert response.status_code == 401  # the hub's challenge: the request went through
        assert clean_hub.wait_registry_requests(bool)
    else:
        assert response.status_code == 403
        assert response.json()["errors"][0]["code"] == "DENIED"
        assert _refusals(ip_relay, mark)[0] in ("ip_not_allowed", "ip_denied")
        time.sleep(0.1)
        assert clean_hub.registry_requests() == []


# --- limits ------------------------------------------------------------------------------------


def test_rate_limit_trips_at_the_burst(hub: Hub, tmp_path: Path) -> None:
    config = _write_config(
        tmp_path / "relay.toml", "[limits]\nrequests_per_second = 0.001\nburst = 5\n"
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay, _from("127.0.0.3") as client:
        statuses = [client.get(f"{relay.url}/v2/").status_code for _ in range(6)]
        assert statuses == [401] * 5 + [429]
        limited = client.get(f"{relay.url}/v2/")
        assert limited.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert limited.headers["retry-after"] == "1000"
        with _from("127.0.0.4") as other:  # per client address
            assert other.get(f"{relay.url}/v2/").status_code == 401
        assert client.get(f"{relay.url}/healthz").status_code == 200  # probes are not limited
        assert _refusals(relay).count("rate_limited") == 2


def test_concurrent_streams_and_bandwidth_cap(hub: Hub, tmp_path: Path) -> None:
    config = _write_config(
        tmp_path / "relay.toml", "[limits]\nstreams_per_ip = 2\nstream_bytes_per_second = 131072\n"
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    big = hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    layer = max(big.layers, key=lambda blob: blob.size)
    with RelayProcess(tmp_path / "relay", *args) as relay, httpx.Client(timeout=30) as client:
        headers = {"authorization": f"Bearer {pull_token(relay.url, 'big')}"}
        url = f"{relay.url}/v2/big/blobs/{layer.digest}"
        with contextlib.ExitStack() as stack:
            opened = []
            for _ in range(2):
                response = stack.enter_context(client.stream("GET", url, headers=headers))
                assert response.status_code == 200
                chunks = response.iter_raw(4096)
                next(chunks)
                opened.append((response, chunks))  # both stay open and unread
            with client.stream("GET", url, headers=headers) as third:
                assert third.status_code == 429
                third.read()
                assert third.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
            opened[0][0].close()
            # The relay notices the close and frees the slot (bounded poll).
            status = 0
            elapsed = 0.0
            deadline = time.monotonic() + 10
            while status != 200 and time.monotonic() < deadline:
                with client.stream("GET", url, headers=headers) as response:
                    status = response.status_code
                    if status == 200:
                        # Bandwidth: 320 KiB at 128 KiB/s after a 128 KiB burst needs 1.5 s.
                        began = time.monotonic()
                        received = 0
                        for chunk in response.iter_raw(16384):
                            received += len(chunk)
                            if received >= 320 * 1024:
                                break
                        elapsed = time.monotonic() - began
                    else:
                        time.sleep(0.1)
            assert status == 200
        assert elapsed >= 1.3, elapsed
        assert _refusals(relay).count("concurrency_limited") >= 1


def test_a_download_longer_than_read_timeout_is_not_cut(hub: Hub, tmp_path: Path) -> None:
    """The read timeout is for request heads: a client receiving a blob sends nothing."""
    config = _write_config(
        tmp_path / "relay.toml",
        "[server]\nread_timeout = 1\n[limits]\nstream_bytes_per_second = 131072\n",
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    big = hub.images["library/big:latest"]
    assert isinstance(big, BuiltImage)
    layer = max(big.layers, key=lambda blob: blob.size)
    with RelayProcess(tmp_path / "relay", *args) as relay, httpx.Client(timeout=30) as client:
        headers = {"authorization": f"Bearer {pull_token(relay.url, 'big')}"}
        began = time.monotonic()
        received = 0
        with client.stream("GET", f"{relay.url}/v2/big/blobs/{layer.digest}", headers=headers) as r:
            for chunk in r.iter_raw(16384):
                received += len(chunk)
                if received >= 448 * 1024:  # 2.5 s at the cap: well past read_timeout
                    break
        assert time.monotonic() - began >= 2.0
        assert received >= 448 * 1024


def test_traffic_budget_trips_at_the_figure_and_survives_a_restart(
    hub: Hub, tmp_path: Path
) -> None:
    image = _alpine(hub)
    layer, config_blob = image.layers[0], image.config
    config = _write_config(tmp_path / "relay.toml", f"[limits]\nbudget_daily = {layer.size}\n")
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}",
            "--data-dir", str(tmp_path / "data"))  # fmt: skip
    with RelayProcess(tmp_path / "relay", *args) as relay:
        headers = {"authorization": f"Bearer {pull_token(relay.url, 'alpine')}"}
        blob = f"{relay.url}/v2/alpine/blobs/"
        # One byte short of the budget...
        partial = httpx.get(
            blob + layer.digest, headers={**headers, "range": f"bytes=0-{layer.size - 2}"}
        )
        assert partial.status_code == 206
        assert len(partial.content) == layer.size - 1
        # ...so a download longer than one byte would pass the line: refused before it starts.
        whole = httpx.get(blob + config_blob.digest, headers=headers)
        assert whole.status_code == 429
        assert "1 bytes left" in whole.json()["errors"][0]["message"]
        last = httpx.get(blob + layer.digest, headers={**headers, "range": "bytes=0-0"})
        assert last.status_code == 206  # the last byte fits exactly
        spent = httpx.get(blob + layer.digest, headers=headers)
        assert spent.status_code == 429
        assert spent.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert 0 < int(spent.headers["retry-after"]) <= 86400
        manifest = httpx.get(
            f"{relay.url}/v2/alpine/manifests/latest", headers={**headers, "accept": OCI_MANIFEST}
        )
        assert manifest.status_code == 200  # manifests still answer
    assert sorted(budget_counters(tmp_path / "data").values()) == [layer.size] * 2
    with RelayProcess(tmp_path / "restarted", *args) as relay:
        headers = {"authorization": f"Bearer {pull_token(relay.url, 'alpine')}"}
        after = httpx.get(f"{relay.url}/v2/alpine/blobs/{config_blob.digest}", headers=headers)
        assert after.status_code == 429
        assert _refusals(relay) == ["budget_exhausted"]


# --- attacks -------------------------------------------------------------------------------------


class EvilRegistry:
    """An anonymous "registry" whose blob answers are redirects to wherever `targets` says."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.targets = targets
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path == "/v2/":
                    self._send(200, {"content-type": "application/json"}, b"{}")
                    return
                name, sep, digest = self.path.removeprefix("/v2/").partition("/blobs/")
                if sep and name in owner.targets:
                    location = owner.targets[name].format(digest=digest)
                    self._send(307, {"location": location}, b"")
                    return
                self._send(404, {"content-type": "application/json"}, b'{"errors":[]}')

            do_HEAD = do_GET

            def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def sentinels() -> Iterator[dict[str, Sentinel]]:
    made = {"lo": Sentinel("127.0.0.1"), "lo2": Sentinel("127.0.0.2")}
    yield made
    for sentinel in made.values():
        sentinel.close()


@pytest.fixture
def attacked(
    hub: Hub, sentinels: dict[str, Sentinel], tmp_path: Path
) -> Iterator[tuple[RelayProcess, EvilRegistry]]:
    lo, lo2 = sentinels["lo"], sentinels["lo2"]
    evil = EvilRegistry(
        {
            "cdn": hub.cdn.url + "/docker/registry/v2/blobs/sha256/{digest}",
            "loopback": f"http://127.0.0.1:{lo.port}/steal",
            "loopback2": f"http://127.0.0.2:{lo2.port}/steal",
            "byname": f"http://localhost:{lo.port}/steal",
            "unspecified": f"http://0.0.0.0:{lo.port}/steal",
            "mapped": f"http://[::ffff:127.0.0.1]:{lo.port}/steal",
            "metadata": "http://169.254.169.254/latest/meta-data/",
            "private": "http://10.1.2.3/internal",
            "ula": "http://[fd00::1]/internal",
            "scheme": f"file:///etc/passwd?{lo.port}",
        }
    )
    config = _write_config(
        tmp_path / "relay.toml",
        '[server]\nallowed_hosts = ["127.0.0.1", "relay.test"]\nmax_headers = 50\n'
        f'[registries."evil.test"]\nurl = "{evil.url}"\naliases = ["evil"]\n',
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    # Only the hub's CDN origin may be reached although it is on loopback.
    # Pass-through: every request must follow the evil registry's redirect (a cached blob
    # would be served without one, once the evil registry vouches for the repository).
    env = {"VPSRELAY_ACCESS__REDIRECT_ALLOW": hub.cdn.url, "VPSRELAY_CACHE__ENABLED": "false"}
    try:
        with RelayProcess(tmp_path / "relay", *args, env=env) as relay:
            yield relay, evil
    finally:
        evil.close()


def _cdn_digest_path(digest: str) -> str:
    hexpart = digest.removeprefix("sha256:")
    return f"{hexpart[:2]}/{hexpart}/data"


def test_redirects_to_private_addresses_are_refused_before_connecting(
    attacked: tuple[RelayProcess, EvilRegistry], sentinels: dict[str, Sentinel], hub: Hub
) -> None:
    relay, evil = attacked
    layer = _alpine(hub).layers[0]
    # The allowed CDN origin works (the CDN path is built by the stand-in's layout).
    evil.targets["cdn"] = hub.cdn.url_for(layer.digest)
    good = httpx.get(f"{relay.url}/v2/evil/cdn/blobs/{layer.digest}")
    assert good.status_code == 200
    assert len(good.content) == layer.size
    refused_targets = {
        "loopback": "loopback", "loopback2": "loopback", "byname": "loopback",
        "unspecified": "unspecified", "mapped": "loopback", "metadata": "link-local",
        "private": "private", "ula": "private",
    }  # fmt: skip
    for name, kind in refused_targets.items():
        response = httpx.get(f"{relay.url}/v2/evil/{name}/blobs/{layer.digest}")
        assert response.status_code == 403, (name, response.text)
        error = response.json()["errors"][0]
        assert error["code"] == "DENIED"
        assert kind in error["message"], (name, error)
        assert "127.0.0" not in error["message"]
        assert "169.254" not in error["message"]
    scheme = httpx.get(f"{relay.url}/v2/evil/scheme/blobs/{layer.digest}")
    assert scheme.status_code == 502  # not http(s): never followed at all
    log = relay.log_text()
    # The far targets were refused on their address, before any connect was attempted.
    for target in ("169.254.169.254:80: link-local", "10.1.2.3:80: private", "fd00::1:80: private"):
        assert f"refused to connect to {target}" in log, target
    assert _refusals(relay).count("redirect_target") == len(refused_targets)
    assert [s.accepted for s in sentinels.values()] == [0, 0]


def _raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    return data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_proxy_requests_and_malformed_requests_get_4xx_and_reach_nothing(
    attacked: tuple[RelayProcess, EvilRegistry], sentinels: dict[str, Sentinel], clean_hub: Hub
) -> None:
    relay, evil = attacked
    lo = sentinels["lo"]
    target = f"127.0.0.1:{lo.port}"
    host = f"Host: 127.0.0.1:{relay.port}\r\n"
    many_headers = "".join(f"X-{i}: y\r\n" for i in range(60))
    heads: list[tuple[str, int, str]] = [
        (f"GET http://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\n", 400, "absolute_form"),
        (f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n", 405, "connect"),
        (f"GET /v2/x/manifests/latest?ns={target} HTTP/1.1\r\n{host}", 404, "name_unknown"),
        (f"GET /v2/library/../private/secret/manifests/1.0 HTTP/1.1\r\n{host}", 400,
         "name_invalid"),
        (f"GET /v2/evil/..%2f..%2fx/manifests/1 HTTP/1.1\r\n{host}", 400, "name_invalid"),
        ("GET /v2/ HTTP/1.1\r\nHost: evil.example\r\n", 421, "unknown_host"),
        (f"GET /v2/ HTTP/1.1\r\n{host}User-Agent: Mozilla/5.0 zgrab/0.x\r\n", 403,
         "user_agent_denied"),
        (f"GET /v2/ HTTP/1.1\r\n{host}{many_headers}", 431, "too_many_headers"),
    ]  # fmt: skip
    attacks = [((head + "\r\n").encode(), status, reason) for head, status, reason in heads]
    mark = len(relay.log_text())
    for request, status, _ in attacks:
        response = _raw(relay.port, request)
        assert _status(response) == status, (request[:60], response[:200])
        assert b"Traceback" not in response
    assert _refusals(relay, mark) == [reason for _, _, reason in attacks]
    # A head over the size limit, sent whole (the relay measures it) and in pieces (h11
    # does, before the relay sees anything).
    big_header = f"GET /v2/ HTTP/1.1\r\n{host}X-Big: {'a' * 20000}\r\n\r\n".encode()
    assert _status(_raw(relay.port, big_header)) == 431
    assert _refusals(relay, mark)[-1] == "headers_too_large"
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(big_header[:10000])
        time.sleep(0.2)
        sock.sendall(big_header[10000:])
        sock.settimeout(10)
        assert _status(sock.recv(65536)) == 431
    time.sleep(0.2)
    assert evil.requests == []
    assert clean_hub.registry_requests() == []
    assert [s.accepted for s in sentinels.values()] == [0, 0]


# --- slowloris, timeouts, the connection cap -----------------------------------------------------

IDLE_CONNECTIONS = 500


def _half_open(port: int, count: int, sources: int = 1) -> list[socket.socket]:
    """`count` connections with an unfinished head, from `sources` loopback addresses."""
    sockets = []
    try:
        for index in range(count):
            source = "127.0.0.1" if sources == 1 else f"127.0.0.{10 + index % sources}"
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=(source, 0)
            )
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_slowloris_does_not_stop_a_pull(hub: Hub, tmp_path: Path) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * IDLE_CONNECTIONS + 200  # this process's sockets and the relay's
    if soft < needed:
        pytest.fail(f"RLIMIT_NOFILE is {soft}; this test needs {needed} (ulimit -n)")
    # From 10 addresses (one address gets at most server.max_connections_per_ip), with
    # time to send their heads (server.head_timeout) longer than the test.
    config = _write_config(tmp_path / "r.toml", "[server]\nhead_timeout = 120\n")
    args = ("--upstream", f"docker.io={hub.registry_url}", "--config", str(config))
    with RelayProcess(tmp_path / "relay", *args) as relay:
        idle = _half_open(relay.port, IDLE_CONNECTIONS, sources=10)
        try:
            skopeo_copy(tmp_path, f"{_host(relay)}/alpine:latest")
            assert_pulled(tmp_path, _alpine(hub))
            # The idle connections were all held open while the pull ran.
            assert sum(_still_open(sock) for sock in idle) == IDLE_CONNECTIONS
        finally:
            for sock in idle:
                sock.close()


def test_idle_half_open_connections_are_closed(tmp_path: Path) -> None:
    args = ("--config", str(_write_config(tmp_path / "r.toml", "[server]\nread_timeout = 1\n")))
    with RelayProcess(tmp_path / "relay", *args) as relay:
        (sock,) = _half_open(relay.port, 1)
        with sock:
            deadline = time.monotonic() + 15
            while _still_open(sock) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _still_open(sock)


def test_connection_cap(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "r.toml", "[server]\nmax_connections = 20\n")
    with RelayProcess(tmp_path / "relay", "--config", str(config)) as relay:
        idle = _half_open(relay.port, 20)
        try:
            over = _raw(relay.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert over == b""  # closed without an answer
            assert "connection_cap" in relay.log_text()
            for sock in idle[:5]:
                sock.close()
            answer = b""
            deadline = time.monotonic() + 10
            while not answer and time.monotonic() < deadline:
                answer = _raw(relay.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _status(answer) == 200
        finally:
            for sock in idle:
                sock.close()
