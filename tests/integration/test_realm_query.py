"""Issue 13, one token client: a token realm that already carries a query string.

The stand-in registry (Distribution with token auth) announces
`realm="http://127.0.0.1:T/token?account=...&tenant=a%2Fb"`, and the token server
answers 400 to any token request that does not bring that query back. Pulls through an
open relay (anonymous, the client's own credentials, the OAuth2 form), with the
operator's credentials, the cache's public-repository probe, `vpsrelay warm` and
`vpsrelay check` must all keep it. Then `check` and `warm` against a registry whose
realm is malformed or unreachable: one line, a non-zero exit, no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.clients import DeadPort
from tests.infra.hub import _registry_config, start_hub, start_registry
from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.tokenserver import ALICE
from tests.integration.test_pull import skopeo_copy

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub, RegistryProcess

pytestmark = pytest.mark.integration

REALM_QUERY = "account=vpsrelay-test&tenant=a%2Fb"
EXPECTED = [("account", "vpsrelay-test"), ("tenant", "a/b")]
PUBLIC = "library/qalpine:1"
PRIVATE = "private/qapp:1"
COMMAND_TIMEOUT = 120


@pytest.fixture(scope="module")
def qhub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    registry = require_binary("docker-registry")
    require_binary("skopeo")
    images = [
        (PUBLIC, {"hello.txt": b"realm with a query\n"}),
        (PRIVATE, {"secret.txt": b"private, behind a realm with a query\n"}),
    ]
    stand_in = start_hub(
        tmp_path_factory.mktemp("qhub"),
        registry_binary=registry,
        images=images,
        realm_query=REALM_QUERY,
    )
    try:
        yield stand_in
    finally:
        stand_in.close(remove_data=True)


@pytest.fixture
def hub_q(qhub: Hub) -> Hub:
    qhub.clear()
    assert qhub.tokens.realm.endswith(f"/token?{REALM_QUERY}")
    return qhub


def assert_token_requests_kept_the_query(hub: Hub, *, at_least: int = 1) -> list[str]:
    """Every token request carried the realm's query; the methods they used."""
    requests = hub.tokens.requests()
    assert len(requests) >= at_least, requests
    for request in requests:
        sent = parse_qsl(urlsplit(request.path).query, keep_blank_values=True)
        assert all(pair in sent for pair in EXPECTED), request.path
    return [request.method for request in requests]


def host(relay: RelayProcess) -> str:
    return relay.url.removeprefix("http://")


def vpsrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", *args],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, cwd=REPO_ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")},
            "PYTHONPATH": str(REPO_ROOT),
        },
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


# --- through the relay


def test_open_relay_anonymous_pull_keeps_the_realm_query(hub_q: Hub, tmp_path: Path) -> None:
    with RelayProcess(tmp_path / "relay", "--upstream", f"docker.io={hub_q.registry_url}") as relay:
        skopeo_copy(tmp_path, f"{host(relay)}/qalpine:1")
        assert_token_requests_kept_the_query(hub_q)
        # The cache asked, anonymously, whether anyone may read it: the same token client.
        deadline = time.monotonic() + 10
        while "library/qalpine is public" not in relay.log_text():
            assert time.monotonic() < deadline, relay.log_text()
            time.sleep(0.1)


def test_open_relay_passes_the_clients_own_credentials_with_the_realm_query(
    hub_q: Hub, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with RelayProcess(tmp_path / "relay", "--upstream", f"docker.io={hub_q.registry_url}") as relay:
        anonymous = skopeo_copy(tmp_path / "a", f"{host(relay)}/{PRIVATE}", check=False)
        assert anonymous.returncode != 0
        hub_q.clear()
        skopeo_copy(tmp_path / "b", f"{host(relay)}/{PRIVATE}", f"--src-creds={':'.join(ALICE)}")
        assert_token_requests_kept_the_query(hub_q)
        hub_q.clear()
        # The OAuth2 form goes to the realm (its query kept) as a POST.
        form = {
            "grant_type": "password", "username": ALICE[0], "password": ALICE[1],
            "service": "registry.docker.io", "scope": f"repository:{PRIVATE[:-2]}:pull",
            "client_id": "vpsrelay-test",
        }  # fmt: skip
        answer = httpx.post(f"{relay.url}/token", data=form, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["access_token"]
        assert assert_token_requests_kept_the_query(hub_q) == ["POST"]


def test_operator_credentials_keep_the_realm_query(hub_q: Hub, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[registries."docker.io"]\nusername = "{ALICE[0]}"\npassword = "{ALICE[1]}"\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub_q.registry_url}")
    with RelayProcess(tmp_path / "relay", *args) as relay:
        skopeo_copy(tmp_path, f"{host(relay)}/{PRIVATE}")  # anonymous client
        assert_token_requests_kept_the_query(hub_q)
        operator = [r for r in hub_q.tokens.requests() if "authorization" in r.headers]
        assert operator, "the relay never asked with the operator's credentials"
        assert ALICE[1] not in relay.log_text()


# --- warm and check, as the relay's clients (pointed at a registry whose realm carries the
# query: a relay announces its own /token, which has none)


@pytest.fixture(scope="module")
def direct(qhub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """Distribution on the hub's storage with the same token auth, serving blobs itself
    (`warm` talks to a relay, which never sends a client to a CDN)."""
    auth = {
        "token": {
            "realm": qhub.tokens.realm,
            "service": "registry.docker.io",
            "issuer": qhub.tokens.issuer,
            "rootcertbundle": str(qhub.tokens.cert_path),
        }
    }
    registry = start_registry(
        require_binary("docker-registry"),
        tmp_path_factory.mktemp("direct"),
        "direct",
        _registry_config(qhub.storage_dir, auth=auth),
    )
    try:
        yield registry
    finally:
        registry.stop()


def test_warm_keeps_the_realm_query(hub_q: Hub, direct: RegistryProcess) -> None:
    done = vpsrelay("warm", "--relay", direct.url, PUBLIC)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_token_requests_kept_the_query(hub_q)


def test_check_gets_a_token_from_a_realm_with_a_query(hub_q: Hub, direct: RegistryProcess) -> None:
    done = vpsrelay("check", "--url", direct.url, "--image", f"docker.io={PUBLIC}", "--json")
    assert "Traceback" not in done.stderr
    rows = {row["check"]: row for row in json.loads(done.stdout)["rows"]}
    assert rows["token docker.io"]["result"] == "ok", rows
    assert rows["manifest GET docker.io"]["result"] == "ok", rows
    assert_token_requests_kept_the_query(hub_q)


# --- a realm that cannot be used


@pytest.fixture(scope="module")
def dead() -> Iterator[DeadPort]:
    with DeadPort() as port:
        yield port


@pytest.fixture(
    scope="module",
    params=["malformed", "unreachable"],
)
def bad_realm(
    request: pytest.FixtureRequest,
    qhub: Hub,
    dead: DeadPort,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, RegistryProcess]]:
    """A Distribution whose token realm is malformed (no scheme, a port that is not a
    number) or names a port nothing listens on."""
    realm = {
        "malformed": "127.0.0.1:notaport/token?account=x",
        "unreachable": f"{dead.url}/token?account=x",
    }[request.param]
    workdir = tmp_path_factory.mktemp(f"realm-{request.param}")
    auth = {
        "token": {
            "realm": realm,
            "service": "registry.docker.io",
            "issuer": qhub.tokens.issuer,
            "rootcertbundle": str(qhub.tokens.cert_path),
        }
    }
    registry = start_registry(
        require_binary("docker-registry"),
        workdir,
        "bad-realm",
        _registry_config(workdir / "storage", auth=auth),
    )
    try:
        yield request.param, registry
    finally:
        registry.stop()


def test_warm_with_a_bad_realm_says_one_line(bad_realm: tuple[str, RegistryProcess]) -> None:
    kind, registry = bad_realm
    done = vpsrelay("warm", "--relay", registry.url, PUBLIC)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    expected = "not an absolute http(s) URL" if kind == "malformed" else "unreachable"
    assert expected in lines[0]


def test_check_with_a_bad_realm_fails_its_row(bad_realm: tuple[str, RegistryProcess]) -> None:
    kind, registry = bad_realm
    done = vpsrelay("check", "--url", registry.url, "--image", f"docker.io={PUBLIC}", "--json")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == ""
    rows = {row["check"]: row for row in json.loads(done.stdout)["rows"]}
    if kind == "malformed":
        assert rows["/v2/"]["result"] == "FAIL"
        assert "not an absolute http(s) URL" in rows["/v2/"]["detail"]
    else:
        assert rows["token docker.io"]["result"] == "FAIL"
        assert "unreachable" in rows["token docker.io"]["detail"]
