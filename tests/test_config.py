"""Configuration: defaults, file, environment, flags, and errors that name their source."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from vpsrelay import config
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError
from vpsrelay.registry_config import BUILTIN_REGISTRIES


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults():
    settings = config.load(None, {})
    assert settings == config.Settings()
    assert settings.data_dir == Path("data")
    assert settings.server.listen == ("127.0.0.1:5000",)
    assert settings.server.public_url is None
    assert settings.server.trusted_proxies == ()
    assert settings.server.keep_alive_timeout == 75.0
    assert settings.server.read_timeout == 30.0
    assert settings.server.graceful_timeout == 30.0
    assert settings.upstream.connect_timeout == 10.0
    assert settings.upstream.read_timeout == 60.0
    assert settings.upstream.pool_timeout == 10.0
    assert settings.upstream.max_connections == 200
    assert settings.upstream.max_redirects == 5
    assert settings.upstream.ca_bundle is None
    assert settings.log.level == "info"
    assert settings.log.access_log is True
    assert settings.registries == BUILTIN_REGISTRIES
    assert len(settings.registries) == 10
    assert settings.registry("docker.io").url == config.DOCKER_HUB_URL


def test_unknown_registry_lookup_is_key_error():
    with pytest.raises(KeyError):
        config.Settings().registry("my.example")


def test_builtin_registries_and_operator_additions(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    path = write(
        tmp_path,
        '[registries."ghcr.io"]\nusername = "me"\n'
        f'password_file = "{secret}"\n'
        '[registries."quay.io"]\nenabled = false\n'
        '[registries."harbor.example"]\nurl = "https://harbor.example"\n'
        'aliases = ["harbor"]\nsubdomain = "harbor"\n',
    )
    settings = config.load(path, {})
    names = [r.name for r in settings.registries]
    assert "quay.io" not in names
    assert {"docker.io", "ghcr.io", "gcr.io", "registry.k8s.io", "harbor.example"} <= set(names)
    ghcr = settings.registry("ghcr.io")
    assert ghcr.username == "me"
    assert ghcr.password is not None
    assert ghcr.password.reveal() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.registry("harbor.example").aliases == ("harbor",)
    assert "k8s.gcr.io" in settings.registry("registry.k8s.io").aliases


def test_registry_password_from_environment(tmp_path):
    path = write(tmp_path, '[registries."ghcr.io"]\nusername = "me"\npassword_env = "GHCR_TOKEN"\n')
    settings = config.load(path, {"GHCR_TOKEN": "tok"})
    password = settings.registry("ghcr.io").password
    assert password is not None
    assert password.reveal() == "tok"


def test_env_name_and_option_keys():
    assert config.env_name("server.listen") == "VPSRELAY_SERVER__LISTEN"
    assert config.env_name("data_dir") == "VPSRELAY_DATA_DIR"
    keys = config.option_keys()
    assert keys[0] == "data_dir"
    assert {"server.listen", "server.public_url", "upstream.ca_bundle", "log.access_log"} <= set(
        keys
    )
    assert not any(key.startswith("registries") for key in keys)


def test_file_values(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    path = write(
        tmp_path,
        f"""
        data_dir = "{tmp_path / "state"}"

        [server]
        listen = ["0.0.0.0:5000", "[::]:5000"]
        public_url = "https://relay.example.com/"
        trusted_proxies = ["10.0.0.0/8", "192.168.1.1"]
        keep_alive_timeout = 5
        read_timeout = 2.5
        graceful_timeout = 1

        [upstream]
        connect_timeout = 3
        read_timeout = 4.5
        pool_timeout = 6
        max_connections = 7
        max_redirects = 2
        ca_bundle = "{ca}"

        [log]
        level = "DEBUG"
        access_log = false

        [registries."docker.io"]
        url = "http://hub.test:8080/"
        """,
    )
    settings = config.load(path, {})
    assert settings.data_dir == tmp_path / "state"
    assert settings.server.listen == ("0.0.0.0:5000", "[::]:5000")
    assert settings.server.public_url == "https://relay.example.com"
    assert settings.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.1/32"),
    )
    assert settings.server.keep_alive_timeout == 5.0
    assert isinstance(settings.server.keep_alive_timeout, float)
    assert settings.server.read_timeout == 2.5
    assert settings.server.graceful_timeout == 1.0
    assert settings.upstream.connect_timeout == 3.0
    assert settings.upstream.read_timeout == 4.5
    assert settings.upstream.pool_timeout == 6.0
    assert settings.upstream.max_connections == 7
    assert settings.upstream.max_redirects == 2
    assert settings.upstream.ca_bundle == ca
    assert settings.log.level == "debug"
    assert settings.log.access_log is False
    assert settings.registry("docker.io").url == "http://hub.test:8080"


def test_empty_file_gives_defaults(tmp_path):
    assert config.load(write(tmp_path, ""), {}) == config.Settings()


def test_empty_strings_mean_unset(tmp_path):
    path = write(
        tmp_path,
        """
        [server]
        public_url = ""
        [upstream]
        ca_bundle = ""
        """,
    )
    settings = config.load(path, {})
    assert settings.server.public_url is None
    assert settings.upstream.ca_bundle is None


def test_environment_overrides_file(tmp_path):
    path = write(
        tmp_path,
        """
        [server]
        listen = "127.0.0.1:6000"
        public_url = "https://from-file.example"
        [log]
        level = "warning"
        """,
    )
    environ = {
        "VPSRELAY_SERVER__LISTEN": "0.0.0.0:7000, [::1]:7001",
        "VPSRELAY_SERVER__TRUSTED_PROXIES": "10.0.0.1,fd00::/8",
        "VPSRELAY_UPSTREAM__MAX_REDIRECTS": " 3 ",
        "VPSRELAY_UPSTREAM__READ_TIMEOUT": "12.5",
        "VPSRELAY_LOG__ACCESS_LOG": "off",
        "VPSRELAY_DATA_DIR": str(tmp_path / "env-data"),
        "VPSRELAY_CONFIG": "not a setting: read by the command line",
        "OTHER": "ignored",
    }
    settings = config.load(path, environ)
    assert settings.server.listen == ("0.0.0.0:7000", "[::1]:7001")
    assert settings.server.public_url == "https://from-file.example"  # not in env: file wins
    assert settings.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert settings.upstream.max_redirects == 3
    assert settings.upstream.read_timeout == 12.5
    assert settings.log.access_log is False
    assert settings.log.level == "warning"
    assert settings.data_dir == tmp_path / "env-data"


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("YES", True), ("On", True),
     ("0", False), ("false", False), ("no", False), ("OFF", False)],
)  # fmt: skip
def test_boolean_spellings(text, value):
    assert config.load(None, {"VPSRELAY_LOG__ACCESS_LOG": text}).log.access_log is value


def test_flags_override_environment(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\n')
    environ = {"VPSRELAY_SERVER__LISTEN": "0.0.0.0:7000", "VPSRELAY_LOG__LEVEL": "error"}
    overrides = {"server.listen": ["0.0.0.0:8000"], "log.level": "debug"}
    settings = config.load(path, environ, overrides)
    assert settings.server.listen == ("0.0.0.0:8000",)
    assert settings.log.level == "debug"


def test_upstreams_from_environment_and_flags(tmp_path):
    path = write(tmp_path, '[registries."docker.io"]\nurl = "http://from-file.test"\n')
    env = {config.UPSTREAMS_ENV: "docker.io=http://from-env.test/"}
    assert config.load(path, {}).registry("docker.io").url == "http://from-file.test"
    assert config.load(path, env).registry("docker.io").url == "http://from-env.test"
    flagged = config.load(path, env, upstreams={"docker.io": "https://from-flag.test"})
    assert flagged.registry("docker.io").url == "https://from-flag.test"
    assert len(flagged.registries) == len(BUILTIN_REGISTRIES)


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["docker.io=http://a"], {"docker.io": "http://a"}),
        ([" docker.io = http://a ", "x=y=z"], {"docker.io": "http://a", "x": "y=z"}),
        ([], {}),
    ],
)
def test_parse_upstreams(items, expected):
    assert config.parse_upstreams(items, "--upstream") == expected


@pytest.mark.parametrize("item", ["docker.io", "=http://a", "docker.io=", ""])
def test_parse_upstreams_rejects(item):
    with pytest.raises(ConfigError, match=r"^--upstream: expected REGISTRY=URL"):
        config.parse_upstreams([item], "--upstream")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::]:5000", ("::", 5000)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_listen(listen, expected):
    assert config.parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["5000", ":5000", "host:", "host:65536", "host:-1", "host:http"])
def test_parse_listen_rejects(listen):
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        config.parse_listen(listen)


# --- errors name the source and the dotted key


def file_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, {})
    message = info.value.message
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    return message[len(f"{path}: ") :]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nlisen = "0.0.0.0:5000"\n',
         "server.lisen: unknown key (did you mean 'listen'?)"),
        ("[upstream]\nmax_redirect = 3\n",
         "upstream.max_redirect: unknown key (did you mean 'max_redirects'?)"),
        ("[server]\nzzz = 1\n", "server.zzz: unknown key"),
        ('data_dri = "x"\n', "data_dri: unknown key (did you mean 'data_dir'?)"),
        ("[serverr]\nlisten = 1\n", "serverr: unknown key (did you mean 'server'?)"),
        ("server = 1\n", "server: expected a table"),
        ("registries = 1\n", "registries: expected a table of registries"),
        ('[registries]\n"docker.io" = "http://x"\n', "registries.docker.io: expected a table"),
        ('[registries."docker.io"]\nurll = "http://x"\n',
         "registries.docker.io.urll: unknown key (did you mean 'url'?)"),
        ('[registries."my.example"]\naliases = ["mine"]\n',
         "registries.my.example.url: a new registry needs a url"),
        ('[registries."ghcr.io"]\nusername = "me"\n',
         "registries.ghcr.io: username and password go together"),
        ('[registries."ghcr.io"]\nusername = "me"\npassword = "a"\npassword_env = "B"\n',
         "registries.ghcr.io: set only one of password, password_env"),
        ('[registries."ghcr.io"]\nusername = "me"\npassword_env = "NOT_SET_ANYWHERE"\n',
         "registries.ghcr.io.password_env: environment variable 'NOT_SET_ANYWHERE' is not set"),
        ('[registries."ghcr.io"]\nsubdomain = "a.b"\n',
         "registries.ghcr.io.subdomain: expected one DNS label (a-z, 0-9, -), got 'a.b'"),
        ('[registries."ghcr.io"]\naliases = ["docker"]\n',
         "registries.ghcr.io: alias 'docker' already names docker.io"),
        ('[registries."docker.io"]\nurl = "ftp://x"\n',
         "registries.docker.io.url: expected an absolute http(s) URL, got 'ftp://x'"),
        ('[registries."docker.io"]\nurl = 5\n',
         "registries.docker.io.url: expected a non-empty string, got 5"),
        ('[server]\nlisten = "nonsense"\n', "server.listen: expected HOST:PORT, got 'nonsense'"),
        ("[server]\nlisten = []\n", "server.listen: expected at least one HOST:PORT"),
        ("[server]\nlisten = [1]\n", "server.listen: expected a list of strings, got [1]"),
        ('[server]\npublic_url = "relay.example.com"\n',
         "server.public_url: expected an absolute http(s) URL, got 'relay.example.com'"),
        ('[server]\npublic_url = "https://"\n',
         "server.public_url: expected an absolute http(s) URL, got 'https:'"),
        ('[server]\ntrusted_proxies = ["10.0.0.0/33"]\n',
         "server.trusted_proxies: expected IP addresses or CIDR networks:"),
        ("[server]\nkeep_alive_timeout = 0\n",
         "server.keep_alive_timeout: expected a positive number of seconds, got 0"),
        ("[server]\nkeep_alive_timeout = true\n",
         "server.keep_alive_timeout: expected a positive number of seconds, got True"),
        ('[server]\nread_timeout = "soon"\n',
         "server.read_timeout: expected a number of seconds, got 'soon'"),
        ("[upstream]\nmax_connections = 0\n",
         "upstream.max_connections: expected a positive whole number, got 0"),
        ("[upstream]\nmax_connections = 1.5\n",
         "upstream.max_connections: expected a positive whole number, got 1.5"),
        ('[upstream]\nca_bundle = "/does/not/exist.pem"\n',
         "upstream.ca_bundle: no such file: '/does/not/exist.pem'"),
        ('[log]\nlevel = "verbose"\n',
         "log.level: expected one of debug, info, warning, error, got 'verbose'"),
        ('[log]\naccess_log = "maybe"\n', "log.access_log: expected true or false, got 'maybe'"),
        ("data_dir = 3\n", "data_dir: expected a string, got 3"),
        ('data_dir = ""\n', "data_dir: expected a path, got an empty string"),
    ],
)  # fmt: skip
def test_file_errors_name_file_and_key(tmp_path, text, message):
    assert file_error(tmp_path, text).startswith(message)


def test_bad_toml(tmp_path):
    assert file_error(tmp_path, "[server\nlisten = 1\n").startswith("not valid TOML: ")


def test_not_utf8(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_bytes(b'data_dir = "\xff"\n')
    with pytest.raises(ConfigError, match=r"relay\.toml: not valid TOML"):
        config.load(path, {})


def test_missing_file(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        config.load(path, {})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VPSRELAY_SERVER__LISTEN": "nope"},
         "VPSRELAY_SERVER__LISTEN: server.listen: expected HOST:PORT, got 'nope'"),
        ({"VPSRELAY_SERVER__LISTEN": " , "},
         "VPSRELAY_SERVER__LISTEN: server.listen: expected at least one HOST:PORT"),
        ({"VPSRELAY_UPSTREAM__READ_TIMEOUT": "-1"},
         "VPSRELAY_UPSTREAM__READ_TIMEOUT: upstream.read_timeout: expected a positive number"),
        ({"VPSRELAY_UPSTREAM__MAX_CONNECTIONS": "many"},
         "VPSRELAY_UPSTREAM__MAX_CONNECTIONS: upstream.max_connections: expected a positive whole"),
        ({"VPSRELAY_SERVER__PUBLIC_URL": "ftp://x"},
         "VPSRELAY_SERVER__PUBLIC_URL: server.public_url: expected an absolute http(s) URL"),
        ({"VPSRELAY_SERVER__TRUSTED_PROXIES": "10.0.0.1,bogus"},
         "VPSRELAY_SERVER__TRUSTED_PROXIES: server.trusted_proxies: expected IP addresses"),
        ({"VPSRELAY_UPSTREAMS": "docker.io"}, "VPSRELAY_UPSTREAMS: expected REGISTRY=URL"),
        ({"VPSRELAY_UPSTREAMS": "quay.io=ftp://quay.io"},
         "VPSRELAY_UPSTREAMS: registries.quay.io.url: expected an absolute http(s) URL"),
        ({"VPSRELAY_UPSTREAMS": "docker.io=hub.test"},
         "VPSRELAY_UPSTREAMS: registries.docker.io.url: expected an absolute http(s) URL"),
    ],
)  # fmt: skip
def test_environment_errors_name_variable_and_key(environ, message):
    with pytest.raises(ConfigError) as info:
        config.load(None, environ)
    assert info.value.message.startswith(message)


@pytest.mark.parametrize(
    ("overrides", "upstreams", "message"),
    [
        ({"server.listen": ["bad"]}, None, "--listen: server.listen: expected HOST:PORT"),
        ({"server.public_url": "x"}, None, "--public-url: server.public_url: expected an absolute"),
        ({"data_dir": ""}, None, "--data-dir: data_dir: expected a path"),
        ({}, {"docker.io": "nope"}, "--upstream: registries.docker.io.url: expected an absolute"),
        ({}, {"ghcr.io": "ghcr.io"}, "--upstream: registries.ghcr.io.url: expected an absolute"),
    ],
)
def test_flag_errors_name_flag_and_key(overrides, upstreams, message):
    with pytest.raises(ConfigError) as info:
        config.load(None, {}, overrides, upstreams)
    assert info.value.message.startswith(message)


def test_config_error_is_a_relay_error():
    from vpsrelay.errors import RelayError

    assert issubclass(ConfigError, RelayError)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_seconds_rejected(value):
    with pytest.raises(ConfigError, match=r"upstream\.read_timeout"):
        config.load(None, {"VPSRELAY_UPSTREAM__READ_TIMEOUT": value})


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_seconds_rejected_from_file(tmp_path, value):
    path = write(tmp_path, f"[server]\nread_timeout = {value}\n")
    with pytest.raises(ConfigError, match=r"server\.read_timeout"):
        config.load(path, {})


# --- the CLI


def test_cli_config_check_bad_file(tmp_path):
    path = write(tmp_path, '[server]\nlisen = "0.0.0.0:5000"\n')
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [
        f"vpsrelay: config error: {path}: server.lisen: unknown key (did you mean 'listen'?)"
    ]
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[server]\nlisten = "bad"\n', "server.listen: expected HOST:PORT"),
        ("[server\n", "not valid TOML"),
        (
            '[registries."my.example"]\nsubdomain = "mine"\n',
            "registries.my.example.url: a new registry needs a url",
        ),
    ],
)
def test_cli_config_check_errors_are_one_line(tmp_path, text, fragment):
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(path) in result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.output


def test_cli_config_check_good_file(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "0.0.0.0:5000"\n')
    result = CliRunner().invoke(main, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: ok\n"


def test_cli_config_check_reads_environment(tmp_path):
    path = write(tmp_path, "")
    result = CliRunner().invoke(
        main, ["config", "check", str(path)], env={"VPSRELAY_SERVER__LISTEN": "bad"}
    )
    assert result.exit_code == 2
    assert "VPSRELAY_SERVER__LISTEN: server.listen" in result.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--listen", "bad"], "--listen: server.listen"),
        (["--upstream", "docker.io=nope"], "--upstream: registries.docker.io.url"),
    ],
)
def test_cli_serve_flag_errors_name_the_flag(args, flag):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"vpsrelay: config error: {flag}")


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--upstream-ca", "/does/not/exist.pem"], "--upstream-ca: upstream.ca_bundle"),
        (["--trusted-proxy", "bogus"], "--trusted-proxy: server.trusted_proxies"),
    ],
)
def test_cli_serve_flag_errors_name_the_real_flag(args, flag):
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"vpsrelay: config error: {flag}")


def test_cli_config_show(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "0.0.0.0:5000"\n')
    result = CliRunner().invoke(main, ["config", "show", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert '"0.0.0.0:5000"' in result.stdout
    assert config.DOCKER_HUB_URL in result.stdout


def test_environment_is_clean_for_each_test():
    import os

    leftovers = [
        name
        for name in os.environ
        if (name.startswith("VPSRELAY_") and name != "VPSRELAY_REQUIRE_INTEGRATION")
        or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    ]
    assert leftovers == []


def test_every_secret_setting_is_held_in_a_secret(tmp_path):
    path = write(
        tmp_path,
        '[tls]\ndomains = ["relay.example.com"]\neab_kid = "k"\neab_hmac_key = "hmac-1"\n'
        '[metrics]\ntoken = "metrics-1"\n[auth]\npull_tokens = ["pull-token-1-0123456789"]\n'
        '[registries."docker.io"]\nusername = "u"\npassword = "password-1"\n',
    )
    settings = config.load(path, {})
    assert settings.tls.eab_hmac_key == config.Secret("hmac-1")
    assert settings.metrics.token == config.Secret("metrics-1")
    assert settings.auth.pull_tokens == (config.Secret("pull-token-1-0123456789"),)
    # repr is what a stray log line or traceback would show.
    for secret in ("hmac-1", "metrics-1", "pull-token-1-0123456789", "password-1"):
        assert secret not in repr(settings)


def test_config_show_redacts_by_type_not_by_name():
    from vpsrelay.cli import shown_settings

    settings = config.load(None, {"VPSRELAY_METRICS__TOKEN": "m", "VPSRELAY_AUTH__TOKEN_TTL": "60"})
    shown = shown_settings(settings)
    assert shown["metrics"]["token"] == "***"
    assert shown["auth"]["token_ttl"] == 60.0  # "token" in its name, but no secret
    assert shown["tls"]["eab_hmac_key"] is None
    assert shown["data_dir"] == "data"


@pytest.mark.parametrize("key", ["metrics.token", "tls.eab_hmac_key", "auth.pull_tokens"])
def test_a_secret_parse_error_does_not_quote_the_value(key):
    with pytest.raises(ConfigError) as caught:
        config.load(None, {}, {key: 918273645})
    assert key in caught.value.message
    assert "918273645" not in caught.value.message


def test_ipv6_prefix_length():
    assert config.load(None, {}).limits.ipv6_prefix_length == 64
    env = {"VPSRELAY_LIMITS__IPV6_PREFIX_LENGTH": "48"}
    assert config.load(None, env).limits.ipv6_prefix_length == 48
    with pytest.raises(ConfigError, match=r"VPSRELAY_LIMITS__IPV6_PREFIX_LENGTH: limits\.ipv6"):
        config.load(None, {"VPSRELAY_LIMITS__IPV6_PREFIX_LENGTH": "129"})


# --- issue 12 follow-up, finding 7: no secret in a config error ---------------------------

HASH = "$2b$12$abcdefghijklmnopqrstuuq7Qv2eJq5oFvE4lfHTt7cQ1N8jCfxyz"


@pytest.mark.parametrize(
    "toml",
    [
        '[registries."ghcr.io"]\nusername = "me"\npassword = 987654321\n',
        '[registries."ghcr.io"]\nusername = "me"\npassword = ["987654321"]\n',
        f'[auth]\nusers = ["alice:{HASH}", 987654321]\n',
        f'[auth]\nusers = {{ alice = "{HASH}", pin = 987654321 }}\n',
        f'[auth]\nusers = ["alice:{HASH}", "bob:987654321"]\n',
    ],
)
def test_a_config_error_never_quotes_a_secret(tmp_path, toml):
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    message = caught.value.message
    assert "relay.toml" in message
    assert "registries.ghcr.io.password" in message or "auth.users" in message
    assert "987654321" not in message
    assert HASH not in message
    assert "\n" not in message


@pytest.mark.parametrize("key", ["url", "search_url"])
def test_a_registry_url_with_user_information_is_refused_unquoted(tmp_path, key):
    path = write(
        tmp_path, f'[registries."ghcr.io"]\n{key} = "https://me:hunter2-secret@ghcr.example"\n'
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    message = caught.value.message
    assert f"registries.ghcr.io.{key}" in message
    assert "user information" in message
    assert "hunter2-secret" not in message


@pytest.mark.parametrize(
    "url", ["https://me:hunter2-secret@relay.example", "https://hunter2-secret@relay.example:x"]
)
def test_the_public_url_with_user_information_is_refused_unquoted(url):
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"VPSRELAY_SERVER__PUBLIC_URL": url})
    assert "server.public_url" in caught.value.message
    assert "hunter2-secret" not in caught.value.message


def test_guesses_per_minute_has_a_default_and_is_checked():
    assert config.load(None, {}).auth.guesses_per_minute == 10
    assert (
        config.load(None, {"VPSRELAY_AUTH__GUESSES_PER_MINUTE": "60"}).auth.guesses_per_minute == 60
    )
    with pytest.raises(ConfigError, match=r"auth\.guesses_per_minute"):
        config.load(None, {"VPSRELAY_AUTH__GUESSES_PER_MINUTE": "0"})


# --- issue 13, configuration: the environment is checked like the file ----------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("VPSRELAY_SERVER__LISEN", "VPSRELAY_SERVER__LISTEN"),
        ("VPSRELAY_SERVER_LISTEN", "VPSRELAY_SERVER__LISTEN"),  # one underscore
        ("VPSRELAY_LISTEN", "VPSRELAY_SERVER__LISTEN"),  # the section left out
        ("VPSRELAY_DOMAINS", "VPSRELAY_TLS__DOMAINS"),
        ("VPSRELAY_CACHE_ENABLED", "VPSRELAY_CACHE__ENABLED"),
        ("VPSRELAY_DATADIR", "VPSRELAY_DATA_DIR"),
        ("VPSRELAY_UPSTREAMS_", "VPSRELAY_UPSTREAMS"),  # not a setting, but read all the same
        ("vpsrelay_server__listen", "VPSRELAY_SERVER__LISTEN"),  # the environment has case
    ],
)
def test_an_unknown_variable_is_an_error_with_a_suggestion(variable, meant):
    with pytest.raises(ConfigError) as caught:
        config.load(None, {variable: "0.0.0.0:5000"})
    assert caught.value.message == f"{variable}: unknown variable (did you mean {meant!r}?)"


def test_an_unknown_variable_like_no_setting_names_the_escape():
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"VPSRELAY_VERSION": "1.2"})
    message = caught.value.message
    assert message.startswith("VPSRELAY_VERSION: unknown variable (not a setting;")
    assert config.NOT_SETTINGS_ENV in message


def test_an_unknown_variable_never_quotes_its_value():
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"VPSRELAY_METRICS_TOKEN": "s3cret-value"})
    assert "VPSRELAY_METRICS__TOKEN" in caught.value.message
    assert "s3cret-value" not in caught.value.message


def test_the_environment_is_checked_after_the_file_and_with_a_file(tmp_path):
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:6000"\n')
    with pytest.raises(ConfigError, match=r"^VPSRELAY_SERVER__LISEN: unknown variable"):
        config.load(path, {"VPSRELAY_SERVER__LISEN": "0.0.0.0:7000"})


def test_other_programs_variables_may_be_listed_as_not_settings():
    environ = {
        "VPSRELAY_NOT_SETTINGS": "VPSRELAY_VERSION, VPSRELAY_BACKUP_*",
        "VPSRELAY_VERSION": "1.2",
        "VPSRELAY_BACKUP_TARGET": "s3://bucket",
        "VPSRELAY_SERVER__LISTEN": "0.0.0.0:7000",
    }
    assert config.load(None, environ).server.listen == ("0.0.0.0:7000",)
    with pytest.raises(ConfigError, match=r"^VPSRELAY_VERSON: unknown variable"):
        config.load(None, {**environ, "VPSRELAY_VERSON": "1.2"})


@pytest.mark.parametrize(
    ("listed", "error"),
    [
        ("VPSRELAY_SERVER__LISTEN", "VPSRELAY_SERVER__LISTEN is a setting"),
        ("VERSION", "expected VPSRELAY_* names, got 'VERSION'"),
    ],
)
def test_not_settings_refuses_a_setting_and_a_foreign_name(listed, error):
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"VPSRELAY_NOT_SETTINGS": listed})
    assert caught.value.message == f"VPSRELAY_NOT_SETTINGS: {error}" + (
        "; it is read whatever this says" if "is a setting" in error else ""
    )


def test_a_registry_password_env_may_be_a_vpsrelay_variable(tmp_path):
    path = write(
        tmp_path,
        '[registries."ghcr.io"]\nusername = "me"\npassword_env = "VPSRELAY_GHCR_TOKEN"\n',
    )
    settings = config.load(path, {"VPSRELAY_GHCR_TOKEN": "t0ken"})
    assert settings.registry("ghcr.io").password == config.Secret("t0ken")


def test_variables_without_the_prefix_are_not_checked():
    environ = {"PATH": "/usr/bin", "VPSRELAY": "x", "MY_VPSRELAY_SETTING": "x", "vpsrelay_dir": "x"}
    assert config.load(None, environ) == config.Settings()


def test_every_variable_of_the_project_itself_is_accepted():
    # Each is accepted on its own, and none is taken for a setting.
    for name in config.NON_SETTING_VARIABLES - {config.NOT_SETTINGS_ENV, config.UPSTREAMS_ENV}:
        assert config.load(None, {name: "1"}) == config.Settings(), name


# Files that spell unknown names on purpose, and the ones prose shows: a placeholder
# (docs/security.md) and the mistake in README's example error.
DELIBERATE_UNKNOWN_NAMES = (
    "tests/test_config.py",
    "tests/integration/test_settings.py",
    "tests/test_s3_config.py",
)
PLACEHOLDERS = {"VPSRELAY_SECTION__KEY", "VPSRELAY_SERVER__LISEN"}
# What the repository ships (not a run's data/, htmlcov/ or caches).
SHIPPED = [REPO_ROOT / name for name in (
    "README.md", "CHANGELOG.md", "Dockerfile", "docker-compose.yml", "Caddyfile.alt",
    "docker-compose.bucket.yml",
    "pyproject.toml", "bench", "deploy", "docs", "scripts", "tests", "vpsrelay",
)]  # fmt: skip


def test_every_vpsrelay_variable_the_repository_uses_is_known():
    """Scripts, compose, Caddy, Ansible, docs and tests must not set off the check."""
    settings = {config.env_name(key) for key in config.option_keys()}
    used: dict[str, str] = {}
    for path in sorted(p for top in SHIPPED for p in [top, *top.rglob("*")]):
        relative = path.relative_to(REPO_ROOT)
        if (
            not path.is_file()
            or "__pycache__" in relative.parts
            or relative.as_posix() in DELIBERATE_UNKNOWN_NAMES
        ):
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        # Names only: a prefix built in code (`VPSRELAY_TLS__`, `VPSRELAY_`) ends in "_".
        for name in re.findall(r"\bVPSRELAY_[A-Z0-9_]*[A-Z0-9]\b", text):
            used.setdefault(name, relative.as_posix())
    assert "VPSRELAY_DOMAIN" in used  # the scan sees the deployment files
    unknown = {
        name: where
        for name, where in used.items()
        if name not in settings | config.NON_SETTING_VARIABLES | PLACEHOLDERS
    }
    assert unknown == {}


# `serve` gets a bad flag too, so that it stops even where the variable went unchecked.
@pytest.mark.parametrize("command", [["config", "check"], ["serve", "--listen", "bad", "--config"]])
def test_cli_a_mistyped_variable_is_one_line_with_the_suggestion(tmp_path, command):
    path = write(tmp_path, "")
    result = CliRunner().invoke(
        main, [*command, str(path)], env={"VPSRELAY_SERVER__LISEN": "0.0.0.0:5000"}
    )
    assert result.exit_code == 2
    assert result.stderr == (
        "vpsrelay: config error: VPSRELAY_SERVER__LISEN: unknown variable "
        "(did you mean 'VPSRELAY_SERVER__LISTEN'?)\n"
    )


@pytest.mark.parametrize(
    "key", ["server.read_timeout", "server.keep_alive_timeout", "server.graceful_timeout"]
)
def test_float_seconds_reach_hypercorn_unrounded(key):
    from vpsrelay.server import hypercorn_config

    settings = config.load(None, {config.env_name(key): "0.5"})
    assert getattr(hypercorn_config(settings), key.partition(".")[2]) == 0.5


def test_short_pull_tokens_are_refused_without_being_quoted(tmp_path):
    """Review of issue 12, finding 5: a pull token is compared before any password check
    and opens every repository, so a short one is a guessable password."""
    path = write(tmp_path, '[auth]\npull_tokens = ["ci-token-0123456789ab", "s3cr3t"]\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    message = caught.value.message
    assert message.startswith(f"{path}: auth.pull_tokens: token 2: ")
    assert "shorter than 20 characters" in message
    assert "s3cr3t" not in message
    assert "\n" not in message
    with pytest.raises(ConfigError) as caught:
        config.load(None, {"VPSRELAY_AUTH__PULL_TOKENS": "short-one"})
    assert caught.value.message.startswith("VPSRELAY_AUTH__PULL_TOKENS: auth.pull_tokens: ")
    assert "short-one" not in caught.value.message


def test_short_tokens_in_the_pull_tokens_file_are_refused_by_line(tmp_path):
    tokens_file = tmp_path / "pull-tokens"
    tokens_file.write_text("ci-token-0123456789ab\n\n  weak-token  \n")
    path = write(tmp_path, f'[auth]\npull_tokens_file = "{tokens_file}"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path, {})
    message = caught.value.message
    assert message.startswith(f"{path}: auth.pull_tokens_file: ")
    assert str(tokens_file) in message
    assert "line 3: " in message
    assert "weak-token" not in message
    tokens_file.write_text("ci-token-0123456789ab\nanother-token-0123456789\n")
    assert config.load(path, {}).auth.pull_tokens_file == tokens_file


def test_download_settings(tmp_path):
    assert config.Settings().download == config.DownloadConfig(
        enabled=True, max_images=8, max_bytes=20 * 1024**3
    )
    path = write(
        tmp_path,
        """
        [download]
        max_images = 2
        max_bytes = "5GiB"
    """,
    )
    settings = config.load(path, {"VPSRELAY_DOWNLOAD__ENABLED": "false"})
    assert settings.download == config.DownloadConfig(
        enabled=False, max_images=2, max_bytes=5 * 1024**3
    )
    with pytest.raises(ConfigError, match=r"relay.toml: download.max_images"):
        config.load(write(tmp_path, "[download]\nmax_images = 0\n"), {})


# --- issue 16: resume and parallel ranged fetch


def test_resume_and_parallel_settings(tmp_path):
    settings = config.load(None, {})
    assert settings.upstream.resume_attempts == 5
    assert settings.upstream.parallel_connections == 1
    assert settings.upstream.parallel_max_fetches == 4
    env = {
        "VPSRELAY_UPSTREAM__RESUME_ATTEMPTS": "0",
        "VPSRELAY_UPSTREAM__PARALLEL_CONNECTIONS": "4",
        "VPSRELAY_UPSTREAM__PARALLEL_MIN_SIZE": "128MiB",
        "VPSRELAY_UPSTREAM__PARALLEL_MAX_FETCHES": "2",
    }
    settings = config.load(None, env)
    assert settings.upstream.resume_attempts == 0  # off
    assert settings.upstream.parallel_connections == 4
    assert settings.upstream.parallel_min_size == 128 * 1024 * 1024
    assert settings.upstream.parallel_max_fetches == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[upstream]\nresume_attempts = -1\n",
         "upstream.resume_attempts: expected a whole number (0 or more), got -1"),
        ("[upstream]\nresume_backoff = 0\n",
         "upstream.resume_backoff: expected a positive number of seconds, got 0"),
        ("[upstream]\nparallel_connections = 17\n",
         "upstream.parallel_connections: expected at most 16 connections, got 17"),
        ("[upstream]\nparallel_connections = 0\n",
         "upstream.parallel_connections: expected a positive whole number, got 0"),
        ("[upstream]\nparallel_max_fetches = 0\n",
         "upstream.parallel_max_fetches: expected a positive whole number, got 0"),
    ],
)  # fmt: skip
def test_resume_and_parallel_errors(tmp_path, text, message):
    assert file_error(tmp_path, text).startswith(message)


def test_download_limits_settings(tmp_path):
    defaults = config.Settings().download
    assert (defaults.downloads_per_client, defaults.held_bytes) == (2, 64 * 1024**2)
    path = write(tmp_path, '[download]\ndownloads_per_client = 0\nheld_bytes = "32MiB"\n')
    settings = config.load(path, {})
    assert (settings.download.downloads_per_client, settings.download.held_bytes) == (
        0, 32 * 1024**2,
    )  # fmt: skip
    env = {"VPSRELAY_DOWNLOAD__HELD_BYTES": "0"}
    assert config.load(write(tmp_path, ""), env).download.held_bytes == 0
    with pytest.raises(ConfigError, match=r"relay.toml: download.held_bytes: .*at least 8MiB"):
        config.load(write(tmp_path, '[download]\nheld_bytes = "1MiB"\n'), {})
    with pytest.raises(ConfigError, match=r"relay.toml: download.downloads_per_client"):
        config.load(write(tmp_path, "[download]\ndownloads_per_client = -1\n"), {})
