"""`cache.backend = "s3"` and `[cache.s3]`: loading, validation, secrets (issue 15)."""

from __future__ import annotations

import subprocess
import textwrap
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from tests.infra.binaries import require_binary
from tests.infra.relay import REPO_ROOT
from vpsrelay import config
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

GOOD = """
[cache]
backend = "s3"
[cache.s3]
endpoint = "https://s3.example.net"
bucket = "relay-cache"
access_key = "AKIAEXAMPLE"
secret_key = "s3cr3t-value-9"
prefix = "nodes"
max_size = "200GiB"
redirect = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_section_loads_from_a_file(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, GOOD), {})
    s3 = settings.cache.s3
    assert settings.cache.backend == "s3"
    assert (s3.endpoint, s3.bucket, s3.prefix, s3.max_size) == (
        "https://s3.example.net", "relay-cache", "nodes/", 200 * 1024**3,
    )  # fmt: skip
    assert s3.secret() == "s3cr3t-value-9"
    assert s3.redirect
    assert "s3cr3t" not in repr(settings)


def test_the_section_loads_from_the_environment_and_a_key_file(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("from-a-file\n")
    settings = config.load(None, {
        "VPSRELAY_CACHE__BACKEND": "s3",
        "VPSRELAY_CACHE__S3__ENDPOINT": "http://127.0.0.1:9000",
        "VPSRELAY_CACHE__S3__BUCKET": "bucket",
        "VPSRELAY_CACHE__S3__ACCESS_KEY": "id",
        "VPSRELAY_CACHE__S3__SECRET_KEY_FILE": str(key),
        "VPSRELAY_CACHE__S3__ADDRESSING": "virtual",
    })  # fmt: skip
    assert settings.cache.s3.secret() == "from-a-file"
    assert settings.cache.s3.addressing == "virtual"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[cache]\nbackend = "s3"\n', "relay.toml: cache.s3.endpoint: needed"),
        ('[cache]\nbackend = "s3"\n[cache.s3]\nendpoint = "http://x"\n', "cache.s3.bucket"),
        ('[cache.s3]\nbukcet = "b"\n', "cache.s3.bukcet: unknown key (did you mean 'bucket'?)"),
        ('[cache.s3]\nbucket = "Bad_Name"\n', "cache.s3.bucket: expected an S3 bucket name"),
        ('[cache.s3]\npart_size = "1MiB"\n', "cache.s3.part_size: expected a part size"),
        ("[cache.s3]\nredirect_expiry = 86400\n", "cache.s3.redirect_expiry: expected at most"),
        # below 1 s it would presign with X-Amz-Expires=0: every redirect a 500
        ("[cache.s3]\nredirect_expiry = 0.5\n", "cache.s3.redirect_expiry: expected a positive"),
        ("[cache.s3]\nredirect_expiry = 0\n", "cache.s3.redirect_expiry: expected a positive"),
        ("[cache.s3]\nredirect_expiry = 1.5\n", "cache.s3.redirect_expiry: expected a positive"),
        ('[cache.s3]\nprefix = "../x"\n', "cache.s3.prefix"),
        ("[cache]\ns3 = 1\n", "cache.s3: expected a table"),
        ('[cache]\nbackend = "ftp"\n', "cache.backend: expected one of disk, s3"),
        (GOOD + "lease_ttl = 60\nlease_wait = 30\n", "cache.s3.lease_wait: must be at least"),
        (GOOD + "evict_grace = 30\nredirect_expiry = 60\n", "cache.s3.evict_grace: must be"),
    ],
)
def test_errors_are_one_line_naming_the_file_and_key(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), {})
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_a_mistyped_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match="did you mean 'VPSRELAY_CACHE__S3__BUCKET'"):
        config.load(None, {"VPSRELAY_CACHE__S3__BUKET": "b"})


def test_config_show_hides_the_secret_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config", "show", "--config", str(write(tmp_path, GOOD))])
    assert result.exit_code == 0, result.output
    assert "s3cr3t" not in result.output
    assert '"secret_key": "***"' in result.output


@pytest.mark.integration
def test_the_bucket_compose_file_is_valid(tmp_path: Path) -> None:
    compose = require_binary("docker-compose")
    (tmp_path / "s3-secret-key").write_text("x")
    env = {
        "PATH": "/usr/bin:/bin", "DOCKER_HOST": "unix:///nonexistent.sock",
        "VPSRELAY_DOMAIN": "relay.example.com", "VPSRELAY_EMAIL": "a@example.com",
        "VPSRELAY_CACHE__S3__ENDPOINT": "https://s3.example.net",
        "VPSRELAY_CACHE__S3__BUCKET": "b", "VPSRELAY_CACHE__S3__ACCESS_KEY": "k",
    }  # fmt: skip
    for name in ("docker-compose.yml", "docker-compose.bucket.yml", "Dockerfile"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    (tmp_path / ".env").write_text("")
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.bucket.yml"]
    shown = subprocess.run(
        [compose, *files, "config"], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "VPSRELAY_CACHE__BACKEND: s3" in shown.stdout
    assert "/run/secrets/s3_secret_key" in shown.stdout


def test_the_disk_cache_commands_say_the_cache_is_in_a_bucket(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["cache", "stats", "--config", str(write(tmp_path, GOOD))])
    assert result.exit_code == 1
    assert "the cache is in a bucket" in result.output
