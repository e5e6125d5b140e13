"""Issue 12, findings 12 and 14: what other local users (and terminals, and logs) get to see.

* Finding 14: the data dir holds cached layers of private images and the signing keys;
  it must be 0700 and its files 0600 even when the relay runs with umask 0022 (as it
  does outside the systemd unit, whose `UMask=` was the only protection).
* Finding 12: `vpsrelay config show` must not print a secret, however it was set. The
  command runs as the operator would run it (a subprocess, the real CLI), with a secret
in every place one can be set: the TOML file, `VPSRELAY_*` variables, a `password_file`
and a `password_env` variable. None of them may appear in what it prints; settings that
are no secrets (`auth.token_ttl`) must still be shown.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from typing import TYPE_CHECKING

import bcrypt
import httpx

from tests.infra.oci import BuiltImage
from tests.infra.relay import REPO_ROOT, RelayProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

PULL_TOKEN = "local-exposure-pull-token-0123456789"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

FILE_SECRETS = {
    "eab": "file-eab-hmac-key-b64url-AAAA",
    "metrics": "file-metrics-token-BBBB",
    "pull": "file-pull-token-CCCC",
    "password": "file-registry-password-DDDD",
}
ENV_SECRETS = {
    "VPSRELAY_TLS__EAB_HMAC_KEY": "env-eab-hmac-key-EEEE",
    "VPSRELAY_METRICS__TOKEN": "env-metrics-token-FFFF",
    "VPSRELAY_AUTH__PULL_TOKENS": "env-pull-token-GGGGGG,env-pull-token-HHHHHH",
}
PASSWORD_FILE_SECRET = "password-file-secret-IIII"
PASSWORD_ENV_SECRET = "password-env-secret-JJJJ"
USER_HASH = bcrypt.hashpw(b"alice's password", bcrypt.gensalt(rounds=4)).decode()


def _config_show(
    tmp_path: Path, env: dict[str, str], config: Path
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    full_env.update(env, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "vpsrelay", "config", "show", "--config", str(config)],
        env=full_env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _assert_no_secret(output: str, secrets: list[str]) -> None:
    leaked = [secret for secret in secrets if secret in output]
    assert leaked == [], f"config show printed secrets: {leaked}"


def test_config_show_prints_no_secret_from_the_file(tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD_FILE_SECRET + "\n")
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[tls]
domains = ["relay.example.com"]
eab_kid = "kid-1"
eab_hmac_key = "{FILE_SECRETS["eab"]}"
[metrics]
token = "{FILE_SECRETS["metrics"]}"
[auth]
users = ["alice:{USER_HASH}"]
pull_tokens = ["{FILE_SECRETS["pull"]}"]
token_ttl = 123
[registries."docker.io"]
username = "operator"
password = "{FILE_SECRETS["password"]}"
[registries."ghcr.io"]
username = "operator"
password_file = "{password_file}"
[registries."quay.io"]
username = "operator"
password_env = "QUAY_PASSWORD"
""")
    result = _config_show(tmp_path, {"QUAY_PASSWORD": PASSWORD_ENV_SECRET}, config)
    assert result.returncode == 0, result.stderr
    _assert_no_secret(
        result.stdout + result.stderr,
        [*FILE_SECRETS.values(), PASSWORD_FILE_SECRET, PASSWORD_ENV_SECRET, USER_HASH],
    )
    shown = json.loads(result.stdout)
    assert shown["tls"]["eab_hmac_key"] == "***"
    assert shown["metrics"]["token"] == "***"
    assert shown["auth"]["pull_tokens"] == ["***"]
    assert shown["auth"]["users"] == ["***"]  # a bcrypt hash can be cracked offline
    passwords = {r["name"]: r["password"] for r in shown["registries"]}
    assert passwords["docker.io"] == passwords["ghcr.io"] == passwords["quay.io"] == "***"
    assert shown["auth"]["token_ttl"] == 123  # no secret: shown as it is


def test_config_show_prints_no_secret_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[tls]\ndomains = ["relay.example.com"]\neab_kid = "kid-1"\n')
    result = _config_show(tmp_path, ENV_SECRETS, config)
    assert result.returncode == 0, result.stderr
    secrets = [part for value in ENV_SECRETS.values() for part in value.split(",")]
    _assert_no_secret(result.stdout + result.stderr, secrets)
    shown = json.loads(result.stdout)
    assert shown["tls"]["eab_hmac_key"] == "***"
    assert shown["auth"]["pull_tokens"] == ["***", "***"]
    assert shown["auth"]["token_ttl"] == 300


def test_a_mistyped_secret_is_not_quoted_in_the_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[metrics]\ntoken = 918273645546372819\n")  # a number, not a string
    result = _config_show(tmp_path, {}, config)
    assert result.returncode == 2
    assert "metrics.token" in result.stderr
    assert "Traceback" not in result.stderr
    _assert_no_secret(result.stdout + result.stderr, ["918273645546372819"])


# --- finding 14: modes under the data dir ---------------------------------------------------


def _modes(root: Path) -> Iterator[tuple[str, str, int]]:
    """(path relative to root, kind, permission bits) of root and everything below it."""
    yield ".", "dir", stat.S_IMODE(root.stat().st_mode)
    for path in sorted(root.rglob("*")):
        try:
            info = path.lstat()
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
        yield str(path.relative_to(root)), kind, stat.S_IMODE(info.st_mode)


def test_data_dir_is_private_whatever_the_umask(hub: Hub, tmp_path: Path) -> None:
    image = hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)  # left by an earlier run (or `mkdir`) world-readable
    data.chmod(0o755)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[auth]\nenabled = true\npull_tokens = ["{PULL_TOKEN}"]\n[limits]\nbudget_daily = "1GiB"\n'
    )
    args = ("--config", str(config), "--upstream", f"docker.io={hub.registry_url}",
            "--data-dir", str(data))  # fmt: skip
    previous = os.umask(0o022)  # the relay inherits it, as from a shell or cron
    try:
        relay = RelayProcess(tmp_path / "relay", *args)
    finally:
        os.umask(previous)
    with relay, httpx.Client(timeout=30) as client:
        # A relay token is signed with the key the relay makes on first use.
        token = client.get(
            f"{relay.url}/token",
            params={"scope": "repository:alpine:pull"},
            auth=("ci", PULL_TOKEN),
        )
        assert token.status_code == 200, token.text
        headers = {"authorization": f"Bearer {token.json()['token']}"}
        manifest = client.get(
            f"{relay.url}/v2/alpine/manifests/latest", headers={**headers, "accept": OCI_MANIFEST}
        )
        assert manifest.status_code == 200, manifest.text
        for blob in (image.config, *image.layers):
            answer = client.get(f"{relay.url}/v2/alpine/blobs/{blob.digest}", headers=headers)
            assert answer.status_code == 200
            assert answer.headers.get("x-vpsrelay-cache") == "miss"
        assert client.get(f"{relay.url}/readyz").status_code in (200, 503)
        found = list(_modes(data))
    kinds = {kind for _, kind, _ in found}
    names = {name for name, _, _ in found}
    # The walk saw what matters: cached blobs, the index, the key, the budget.
    assert kinds == {"dir", "file"}
    assert {"cache.db", "token.key", "limits.db", "blobs/sha256"} <= names
    assert any(name.startswith("blobs/sha256/") and name.count("/") == 3 for name in names)
    exposed = [
        f"{name} {oct(mode)}"
        for name, kind, mode in found
        if mode != (0o700 if kind == "dir" else 0o600)
    ]
    assert exposed == [], f"readable by others: {exposed}"
