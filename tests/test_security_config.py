"""Issue 5's configuration ([access], [auth], [limits], server limits, registry globs) and
the shell helpers that need no sockets: `vpsrelay user add`, the signing key, the guard's
budget file."""

from __future__ import annotations

import ipaddress
import json
import stat
import textwrap
from typing import TYPE_CHECKING

import bcrypt
import pytest
import trio
from click.testing import CliRunner

from vpsrelay import config
from vpsrelay.access.clientauth import add_user, load_or_create_key
from vpsrelay.access.guard import Guard
from vpsrelay.cli import main
from vpsrelay.errors import ConfigError, TooManyRequests

if TYPE_CHECKING:
    from pathlib import Path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_secure_defaults():
    settings = config.load(None, {})
    assert settings.access.allow_private_redirects is False
    assert "zgrab" in settings.access.deny_user_agents
    assert settings.server.max_connections == 1000
    assert settings.server.max_header_bytes == 16384
    assert settings.server.max_headers == 100
    assert settings.auth.enabled is False
    assert settings.auth.token_ttl == 300.0
    assert settings.limits.requests_per_second == 0.0  # opt-in: quotas are the operator's


def test_all_sections_from_a_file(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = write(
        tmp_path,
        f"""
        [server]
        allowed_hosts = ["relay.example"]
        max_connections = 500
        [access]
        allow_ips = ["203.0.113.0/24", "2001:db8::/32"]
        deny_ips = ["203.0.113.66"]
        deny_user_agents = ["zgrab", "^curl/"]
        redirect_allow = ["10.0.0.0/8", "http://cdn.internal:8080"]
        [auth]
        enabled = true
        users = ["alice:{hashed}"]
        pull_tokens = ["pull-token-0123456789abcdef"]
        token_ttl = 120
        [limits]
        requests_per_second = 5
        burst = 20
        streams_per_ip = 4
        stream_bytes_per_second = "10MiB"
        budget_daily = "100GiB"
        budget_monthly = "1TB"
        user_budget_daily = 1048576
        [registries."docker.io"]
        allow = ["library/*", "myorg/**"]
        deny = ["library/evil"]
        """,
    )
    settings = config.load(path, {})
    assert settings.server.allowed_hosts == ("relay.example",)
    assert settings.access.allow_ips[1] == ipaddress.ip_network("2001:db8::/32")
    assert settings.access.redirect_allow == ("10.0.0.0/8", "http://cdn.internal:8080")
    assert settings.auth.users == (config.Secret(f"alice:{hashed}"),)
    assert str(settings.auth.pull_tokens[0]) == "***"
    assert settings.limits.stream_bytes_per_second == 10 * 1024**2
    assert settings.limits.budget_daily == 100 * 1024**3
    assert settings.limits.budget_monthly == 10**12
    assert settings.registry("docker.io").allow == ("library/*", "myorg/**")
    assert settings.registry("docker.io").deny == ("library/evil",)
    shown = json.dumps(settings.auth.pull_tokens, default=str)
    assert "0123456789abcdef" not in shown.replace("***", "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[access]\nallow_ips = ["300.1.1.1"]', "access.allow_ips"),
        ('[access]\ndeny_user_agents = ["("]', "not a regular expression"),
        ('[access]\nredirect_allow = ["ftp://x"]', "access.redirect_allow"),
        ('[access]\nredirect_allow = ["http://x/path"]', "access.redirect_allow"),
        ('[access]\nredirect_allow = ["nonsense"]', "access.redirect_allow"),
        ('[auth]\nusers = ["alice:plaintext"]', "auth.users"),
        ("[auth]\nenabeld = true", "did you mean 'enabled'"),
        ("[limits]\nrequests_per_second = -1", "limits.requests_per_second"),
        ('[limits]\nbudget_daily = "10 parsecs"', "limits.budget_daily"),
        ("[limits]\nstreams_per_ip = -2", "limits.streams_per_ip"),
        ("[limits]\nburst = 0", "limits.burst"),
        ('[registries."docker.io"]\nallow = ["Library/*"]', "registries.docker.io.allow"),
        ('[registries."docker.io"]\ndeny = "x"', "registries.docker.io.deny"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        config.load(write(tmp_path, text), {})


def test_environment(tmp_path):
    settings = config.load(
        None,
        {"VPSRELAY_ACCESS__ALLOW_IPS": "10.0.0.0/8,192.168.0.0/16",
         "VPSRELAY_LIMITS__BUDGET_MONTHLY": "2GiB", "VPSRELAY_AUTH__ENABLED": "yes"},
    )  # fmt: skip
    assert len(settings.access.allow_ips) == 2
    assert settings.limits.budget_monthly == 2 * 1024**3
    assert settings.auth.enabled


def test_user_add_command(tmp_path):
    users = tmp_path / "etc" / "htpasswd"
    runner = CliRunner()
    result = runner.invoke(
        main, ["user", "add", "alice", "--password-stdin", "--file", str(users)], input="pw1\n"
    )
    assert result.exit_code == 0, result.output
    assert "added user 'alice'" in result.output
    config_file = write(tmp_path, f'[auth]\nusers_file = "{users}"\n')
    result = runner.invoke(
        main, ["user", "add", "alice", "--config", str(config_file)], input="pw2\npw2\n"
    )
    assert result.exit_code == 0, result.output
    assert "updated user 'alice'" in result.output
    lines = users.read_text().splitlines()
    assert len(lines) == 1
    assert bcrypt.checkpw(b"pw2", lines[0].split(":", 1)[1].encode())
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    no_file = runner.invoke(main, ["user", "add", "bob", "--password-stdin"], input="x\n")
    assert no_file.exit_code == 2
    assert "no users file" in no_file.output
    bad = runner.invoke(
        main, ["user", "add", "a:b", "--password-stdin", "--file", str(users)], input="x\n"
    )
    assert bad.exit_code == 2


def test_add_user_refuses_a_file_it_cannot_read(tmp_path):
    users = tmp_path / "htpasswd"
    users.write_text("carol:$apr1$md5\n")
    with pytest.raises(ValueError, match="bcrypt"):
        add_user(users, "alice", "pw", rounds=4)
    with pytest.raises(ValueError, match="empty password"):
        add_user(tmp_path / "new", "alice", "", rounds=4)


def test_signing_key_is_made_once_and_private(tmp_path):
    path = tmp_path / "data" / "token.key"
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == key
    path.write_text("zz\n")
    with pytest.raises(ConfigError, match="not a token key"):
        load_or_create_key(path)
    path.write_text("abcd\n")
    with pytest.raises(ConfigError, match="too short"):
        load_or_create_key(path)


async def test_guard_budget_is_shared_and_outlives_the_guard(tmp_path):
    settings = config.load(None, {}, {"data_dir": str(tmp_path), "limits.budget_daily": 100})
    guard = Guard(settings, clock=lambda: 1_800_000_000.0)
    sent = 0
    async with guard.download("203.0.113.1", None, lambda: sent):
        sent = 100
    totals = guard.shared.budget_totals(["total|2027-01-15", "total|2027-01"])
    assert totals == {"total|2027-01-15": 100, "total|2027-01": 100}  # counted with no limit too
    again = Guard(settings, clock=lambda: 1_800_000_000.0)  # another process, or a restart
    with pytest.raises(TooManyRequests):
        async with again.download("203.0.113.1", None, lambda: 0):
            pass


async def test_guard_imports_the_legacy_budget_file_once(tmp_path):
    legacy = {"version": 1, "counters": {"total|2027-01-15": 60}}
    (tmp_path / "budget.json").write_text(json.dumps(legacy))
    settings = config.load(None, {}, {"data_dir": str(tmp_path), "limits.budget_daily": 100})
    guard = Guard(settings, clock=lambda: 1_800_000_000.0)
    async with guard.download("203.0.113.1", None, lambda: 0) as meter:
        assert meter is not None
        with pytest.raises(TooManyRequests):
            meter.admit(41)  # 60 of 100 spent before the upgrade
        meter.admit(40)
    (tmp_path / "budget.json").write_text(json.dumps({"counters": {"total|2027-01-15": 99}}))
    later = Guard(settings, clock=lambda: 1_800_000_000.0)
    async with later.download("203.0.113.1", None, lambda: 0) as meter:
        assert meter is not None
        meter.admit(40)  # imported once: the file's later contents are not read
    for guard_ in (guard, later):
        guard_.shared.close()
    for name in ("limits.db", "limits.db-wal", "limits.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / "budget.json").write_text("{not json")
    fresh = Guard(settings, clock=lambda: 1_800_000_000.0)
    async with fresh.download("203.0.113.1", None, lambda: 0) as meter:
        assert meter is not None
        meter.admit(100)  # unreadable counters: the whole budget is free again
    await trio.lowlevel.checkpoint()


async def test_download_meter_holds_2xx_bodies_and_only_charges_error_bodies(tmp_path):
    from vpsrelay.core.access import LOOKAHEAD

    limit = LOOKAHEAD + 10
    settings = config.load(None, {}, {"data_dir": str(tmp_path), "limits.budget_daily": limit})
    guard = Guard(settings, clock=lambda: 1_800_000_000.0)
    async with guard.download("203.0.113.1", None, lambda: 0) as meter:
        assert meter is not None
        meter.start(200, None)
        await meter.sent(LOOKAHEAD)
        await meter.sent(10)
        with pytest.raises(TooManyRequests):  # of unknown length: cut once past the budget
            await meter.sent(1)
    async with guard.download("203.0.113.1", None, lambda: 0) as meter:
        assert meter is not None
        with pytest.raises(TooManyRequests):
            meter.start(200, limit + 1)  # longer than the budget: refused before its head
        meter.start(429, 100)  # the refusal's own body is not held back
        await meter.sent(100)
