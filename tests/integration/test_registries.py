"""Issue 4: several upstream registries behind one relay, picked by subdomain, path prefix
or containerd's `ns`; per-registry token flows, operator credentials, closed-world lookup.

Upstreams, all on loopback at once: the session `hub` (Docker Hub stand-in), a second
token-auth Distribution standing in for ghcr.io (its own token server, service name and
realm; blob redirects with a *relative* Location, as Google's registries send), and an
anonymous Distribution with no auth at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.clients import Containerd, DeadPort, Podman
from tests.infra.hub import RegistryProcess, _registry_config, start_hub, start_registry
from tests.infra.oci import BuiltImage, build_image, push
from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration

GHCR_SERVICE = "ghcr-test-service"
APP_FILES = {"app/bin": b"#!/bin/sh\necho owner app\n"}
PRIVATE_FILES = {"app/secret": b"ghcr private\n"}
TOOL_FILES = {"tool": b"anonymous registry tool\n"}
SKOPEO_TIMEOUT = 180


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    registry = require_binary("docker-registry")
    require_binary("skopeo")
    images = [
        ("owner/app:1.0", APP_FILES),
        ("private/app:1.0", PRIVATE_FILES),
        *((f"owner/paged:p{i}", {"p": str(i).encode()}) for i in range(1, 6)),
    ]
    stand_in = start_hub(
        tmp_path_factory.mktemp("ghcr"),
        registry_binary=registry,
        service=GHCR_SERVICE,
        images=images,
        relative_redirects=True,
    )
    try:
        yield stand_in
    finally:
        stand_in.close(remove_data=True)


class Anonymous:
    def __init__(self, process: RegistryProcess, image: BuiltImage) -> None:
        self.process = process
        self.image = image
        self.url = process.url


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Anonymous]:
    """A registry without any authentication (answers 200 on /v2/)."""
    binary = require_binary("docker-registry")
    workdir = tmp_path_factory.mktemp("anon")
    process = start_registry(binary, workdir / "logs", "anon", _registry_config(workdir / "data"))
    try:
        image = build_image(workdir / "oci", "2.0", files=TOOL_FILES)
        push(image, f"{process.host}/team/tool:2.0")
        yield Anonymous(process, image)
    finally:
        process.stop()


def _config(tmp_path: Path, ghcr: Hub, anon: Anonymous, extra: str = "") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[server]\nbase_domains = ["relay.test"]\n'
        f'[registries."ghcr.io"]\nurl = "{ghcr.registry_url}"\n{extra}'
        f'[registries."anon.test"]\nurl = "{anon.url}"\naliases = ["anon"]\nsubdomain = "anon"\n'
    )
    return path


@pytest.fixture(scope="module")
def relay(
    hub: Hub, ghcr: Hub, anon: Anonymous, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RelayProcess]:
    workdir = tmp_path_factory.mktemp("relay")
    config = _config(workdir, ghcr, anon)
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    # Pass-through, so every pull here shows the upstream conversation (tokens, redirects);
    # the cache has its own tests, including per-registry separation.
    with RelayProcess(workdir, *args, env={"VPSRELAY_CACHE__ENABLED": "false"}) as process:
        yield process


def _registries_env(tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors\n")
    return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}


def skopeo_copy(
    tmp_path: Path,
    source: str,
    *extra: str,
    hosts: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`skopeo copy` to an OCI layout; with `hosts`, in a mount namespace whose private
    /etc/hosts maps those names (so `ghcr.relay.test` reaches the relay on loopback)."""
    skopeo = require_binary("skopeo")
    dest = tmp_path / "out"
    shutil.rmtree(dest, ignore_errors=True)
    command = [
        skopeo, "copy", "--src-tls-verify=false", "--preserve-digests", *extra,
        f"docker://{source}", f"oci:{dest}:pulled",
    ]  # fmt: skip
    if hosts:
        hosts_file = tmp_path / "hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in hosts.items())
        )
        unshare = require_binary("unshare")
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        command = [unshare, "--mount", "--propagation", "private", "sh", "-c", script,
                   str(hosts_file), *command]  # fmt: skip
    return subprocess.run(
        command, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT, check=check,
        env=_registries_env(tmp_path),
    )  # fmt: skip


def assert_pulled(tmp_path: Path, image: BuiltImage) -> None:
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for blob in (image.config, *image.layers):
        data = (tmp_path / "out" / "blobs" / "sha256" / blob.digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


def _image(stand_in: Hub, ref: str) -> BuiltImage:
    image = stand_in.images[ref]
    assert isinstance(image, BuiltImage)
    return image


def host_port(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


# --- by path prefix -------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["ghcr.io", "ghcr"])
def test_pull_by_path_prefix(relay: RelayProcess, ghcr: Hub, tmp_path: Path, prefix: str) -> None:
    ghcr.clear()
    skopeo_copy(tmp_path, f"{host_port(relay)}/{prefix}/owner/app:1.0")
    assert_pulled(tmp_path, _image(ghcr, "owner/app:1.0"))
    # The ghcr stand-in's own token service issued the token, for its own service name.
    (issued,) = {json.dumps(claims["access"]) for claims in ghcr.tokens.issued}
    assert "owner/app" in issued
    assert all(claims["aud"] == GHCR_SERVICE for claims in ghcr.tokens.issued)
    # Its blobs came through a relative Location (/_cdn/...) that the relay followed.
    assert any(
        path.startswith("/docker/registry") for path in (r.path for r in ghcr.cdn.requests())
    )


def test_pull_from_anonymous_registry_by_prefix(
    relay: RelayProcess, anon: Anonymous, tmp_path: Path
) -> None:
    skopeo_copy(tmp_path, f"{host_port(relay)}/anon/team/tool:2.0")
    assert_pulled(tmp_path, anon.image)


def test_docker_hub_still_default(relay: RelayProcess, hub: Hub, tmp_path: Path) -> None:
    skopeo_copy(tmp_path, f"{host_port(relay)}/alpine:latest")
    assert_pulled(tmp_path, _image(hub, "library/alpine:latest"))


# --- by subdomain ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "path", "which"),
    [("ghcr", "owner/app:1.0", "ghcr"), ("anon", "team/tool:2.0", "anon"),
     ("docker", "alpine:latest", "hub")],
)  # fmt: skip
def test_pull_by_subdomain(
    relay: RelayProcess, hub: Hub, ghcr: Hub, anon: Anonymous, tmp_path: Path,
    label: str, path: str, which: str,
) -> None:  # fmt: skip
    name = f"{label}.relay.test"
    skopeo_copy(tmp_path, f"{name}:{relay.port}/{path}", hosts={name: "127.0.0.1"})
    expected = {
        "ghcr": lambda: _image(ghcr, "owner/app:1.0"),
        "anon": lambda: anon.image,
        "hub": lambda: _image(hub, "library/alpine:latest"),
    }[which]()
    assert_pulled(tmp_path, expected)


def test_subdomain_challenge_points_at_that_host(relay: RelayProcess) -> None:
    response = httpx.get(f"{relay.url}/v2/", headers={"host": f"ghcr.relay.test:{relay.port}"})
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert f'realm="http://ghcr.relay.test:{relay.port}/token/ghcr.io"' in challenge
    assert f'service="{GHCR_SERVICE}"' in challenge


# --- by containerd's ns --------------------------------------------------------------------


def test_containerd_default_hosts_with_ns(
    relay: RelayProcess, hub: Hub, ghcr: Hub, anon: Anonymous, tmp_path: Path
) -> None:
    with DeadPort() as dead, Containerd(tmp_path / "containerd") as containerd:
        containerd.write_hosts("_default", mirror_url=relay.url, dead_server=dead.url)
        mark = len(relay.log_text())
        for ref, image in [
            ("ghcr.io/owner/app:1.0", _image(ghcr, "owner/app:1.0")),
            ("anon.test/team/tool:2.0", anon.image),
            ("docker.io/library/alpine:latest", _image(hub, "library/alpine:latest")),
        ]:
            containerd.pull(ref)
            assert image.manifest_digest in containerd.ctr("images", "ls").stdout
        log = relay.log_text()[mark:]
        for ns in ("ns=ghcr.io", "ns=anon.test", "ns=docker.io"):
            assert ns in log


# --- closed world ----------------------------------------------------------------------------


class Sentinel:
    """Listens on a loopback address and counts every connection it accepts."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.accepted = 0
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def sentinels() -> Iterator[list[Sentinel]]:
    # 127.0.0.77 is the host the attacks name; ports 80 and 443 are where a relay that
    # trusted the name would connect, and one more for `ns=127.0.0.77:PORT`.
    made = [Sentinel("127.0.0.77", 80), Sentinel("127.0.0.77", 443), Sentinel("127.0.0.77")]
    yield made
    for sentinel in made:
        sentinel.close()


def test_unknown_registries_are_refused_without_connecting(
    relay: RelayProcess, sentinels: list[Sentinel]
) -> None:
    extra = sentinels[2]
    attempts = [
        (f"/v2/x/manifests/latest?ns=127.0.0.77:{extra.port}", {}),
        ("/v2/x/manifests/latest?ns=127.0.0.77", {}),
        ("/v2/127.0.0.77/x/manifests/latest", {}),
        ("/v2/unknown.example/x/manifests/latest", {}),
        ("/v2/x/manifests/latest", {"host": "nope.relay.test"}),
        ("/v2/", {"host": "nope.relay.test"}),
        ("/token?scope=repository:127.0.0.77/x:pull", {}),
        (f"/token/127.0.0.77:{extra.port}?scope=repository:x:pull", {}),
    ]
    for path, headers in attempts:
        response = httpx.get(f"{relay.url}{path}", headers=headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["errors"][0]["code"] == "NAME_UNKNOWN", path
    assert [s.accepted for s in sentinels] == [0, 0, 0]


# --- credentials, scopes, pagination ---------------------------------------------------------


def test_operator_credentials_open_private_repositories(
    hub: Hub, ghcr: Hub, anon: Anonymous, tmp_path: Path
) -> None:
    user, password = ghcr.creds
    extra = f'username = "{user}"\npassword = "{password}"\n'
    config = _config(tmp_path, ghcr, anon, extra)
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay:
        ref = f"{host_port(relay)}/ghcr.io/private/app:1.0"
        skopeo_copy(tmp_path, ref)  # anonymous client, operator's credentials upstream
        assert_pulled(tmp_path, _image(ghcr, "private/app:1.0"))
        # The client's own credentials win and are never mixed with the operator's.
        wrong = skopeo_copy(tmp_path, ref, "--src-creds=alice:not-the-password", check=False)
        assert wrong.returncode != 0
        assert "401" in wrong.stderr or "unauthorized" in wrong.stderr.lower()
        skopeo_copy(tmp_path, ref, f"--src-creds={user}:{password}")
        assert "wonderland" not in relay.log_text()


def test_private_repository_without_operator_credentials_fails(
    relay: RelayProcess, tmp_path: Path
) -> None:
    result = skopeo_copy(tmp_path, f"{host_port(relay)}/ghcr/private/app:1.0", check=False)
    assert result.returncode != 0


def test_scope_with_several_repositories(relay: RelayProcess, ghcr: Hub) -> None:
    ghcr.clear()
    ghcr.tokens.issued.clear()
    response = httpx.get(
        f"{relay.url}/token",
        params=[
            ("service", GHCR_SERVICE),
            ("scope", "repository:ghcr.io/owner/app:pull"),
            ("scope", "repository:ghcr/owner/paged:pull repository:ghcr.io/private/app:pull"),
        ],
    )
    assert response.status_code == 200
    (request,) = ghcr.tokens.requests()
    assert "repository%3Aowner%2Fapp%3Apull" in request.path
    assert "repository%3Aowner%2Fpaged%3Apull" in request.path
    names = {grant["name"] for grant in ghcr.tokens.issued[-1]["access"]}
    assert names == {"owner/app", "owner/paged", "private/app"}


def test_scope_across_registries_is_refused(relay: RelayProcess) -> None:
    response = httpx.get(
        f"{relay.url}/token",
        params=[("scope", "repository:ghcr/owner/app:pull"), ("scope", "repository:alpine:pull")],
    )
    assert response.status_code == 400


def test_tags_pagination_on_another_registry(relay: RelayProcess) -> None:
    token = httpx.get(
        f"{relay.url}/token", params={"scope": "repository:ghcr.io/owner/paged:pull"}
    ).json()["token"]
    url: str | None = f"{relay.url}/v2/ghcr.io/owner/paged/tags/list?n=2"
    seen: list[str] = []
    for _ in range(10):
        if url is None:
            break
        response = httpx.get(url, headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        seen += response.json()["tags"]
        link = response.headers.get("link")
        url = None
        if link is not None:
            assert link.startswith("</v2/ghcr.io/owner/paged/tags/list?"), link
            url = relay.url + link[1 : link.index(">")]
    assert seen == [f"p{i}" for i in range(1, 6)]


def test_relative_location_is_resolved(relay: RelayProcess, ghcr: Hub) -> None:
    image = _image(ghcr, "owner/app:1.0")
    layer = image.layers[0]
    token = httpx.get(
        f"{relay.url}/token", params={"scope": "repository:ghcr/owner/app:pull"}
    ).json()["token"]
    direct = httpx.get(
        f"{ghcr.registry_url}/v2/owner/app/blobs/{layer.digest}",
        headers={"authorization": f"Bearer {token}"},
    )
    assert direct.status_code == 307
    assert direct.headers["location"].startswith("/_cdn/")
    response = httpx.get(
        f"{relay.url}/v2/ghcr/owner/app/blobs/{layer.digest}",
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest


# --- Docker Hub search -----------------------------------------------------------------------


def test_v1_search_is_forwarded(tmp_path: Path, hub: Hub) -> None:
    seen: list[str] = []

    class Search(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = json.dumps({"num_results": 1, "query": "alp", "results": [{"name": "alpine"}]})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Search)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = tmp_path / "relay.toml"
        config.write_text(
            f'[registries."docker.io"]\nurl = "{hub.registry_url}"\n'
            f'search_url = "http://127.0.0.1:{server.server_address[1]}"\n'
        )
        with RelayProcess(tmp_path / "relay", "--config", str(config)) as relay:
            response = httpx.get(f"{relay.url}/v1/search", params={"q": "alp", "n": "5", "x": "1"})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert response.status_code == 200
    assert response.json()["results"] == [{"name": "alpine"}]
    assert seen == ["/v1/search?q=alp&n=5"]


def test_podman_with_the_generated_snippet_pulls_other_registries(
    relay: RelayProcess, ghcr: Hub, hub: Hub, tmp_path: Path
) -> None:
    """`vpsrelay snippets --format podman` as printed, with each real registry's location
    swapped for a dead loopback port (so a failing mirror cannot fall back off the box)."""
    result = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "snippets", "--format", "podman", "--url", relay.url],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    conf = result.stdout.split("\n", 1)[1].split("# ---")[0]  # the file, without the commands
    assert f'location = "{host_port(relay)}/ghcr.io"' in conf
    with (
        DeadPort() as dead,
        Podman(tmp_path / "podman", mirror=host_port(relay), dead_location=dead.address) as podman,
    ):
        safe = re.sub(
            r'(?m)^location = "(?!127\.0\.0\.1)[^"]*"$', f'location = "{dead.address}"', conf
        )
        podman.registries_conf.write_text('short-name-mode = "permissive"\n' + safe)
        podman.pull("ghcr.io/owner/app:1.0")
        digest = podman.podman(
            "image", "inspect", "--format", "{{.Digest}}", "ghcr.io/owner/app:1.0"
        ).stdout.strip()
        assert digest == _image(ghcr, "owner/app:1.0").manifest_digest
        podman.pull("docker.io/library/alpine:latest")
