"""Finding 12: `vpsrelay config show` must not print a secret, however it was set.

The command runs as the operator would run it (a subprocess, the real CLI), with a secret
in every place one can be set: the TOML file, `VPSRELAY_*` variables, a `password_file`
and a `password_env` variable. None of them may appear in what it prints; settings that
are no secrets (`auth.token_ttl`) must still be shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from pathlib import Path

FILE_SECRETS = {
    "eab": "file-eab-hmac-key-b64url-AAAA",
    "metrics": "file-metrics-token-BBBB",
    "pull": "file-pull-token-CCCC",
    "password": "file-registry-password-DDDD",
}
ENV_SECRETS = {
    "VPSRELAY_TLS__EAB_HMAC_KEY": "env-eab-hmac-key-EEEE",
    "VPSRELAY_METRICS__TOKEN": "env-metrics-token-FFFF",
    "VPSRELAY_AUTH__PULL_TOKENS": "env-pull-token-GGGG,env-pull-token-HHHH",
}
PASSWORD_FILE_SECRET = "password-file-secret-IIII"
PASSWORD_ENV_SECRET = "password-env-secret-JJJJ"


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
        [*FILE_SECRETS.values(), PASSWORD_FILE_SECRET, PASSWORD_ENV_SECRET],
    )
    shown = json.loads(result.stdout)
    assert shown["tls"]["eab_hmac_key"] == "***"
    assert shown["metrics"]["token"] == "***"
    assert shown["auth"]["pull_tokens"] == ["***"]
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
