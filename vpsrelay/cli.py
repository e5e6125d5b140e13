"""The `vpsrelay` command line: `serve` and `config check|show`.

A bad configuration prints one line, `vpsrelay: config error: <where>: <key>: <why>`,
and exits 2; it never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
import trio

from vpsrelay import __version__, config
from vpsrelay.errors import ConfigError

CONFIG_HELP = "TOML configuration file (env: VPSRELAY_CONFIG)."


# The flag behind each dotted key, so errors name what the user typed.
FLAG_NAMES = {
    "server.listen": "--listen",
    "server.public_url": "--public-url",
    "data_dir": "--data-dir",
    "upstream.ca_bundle": "--upstream-ca",
    "server.trusted_proxies": "--trusted-proxy",
    "log.level": "--log-level",
}


def _load(
    config_path: Path | None, overrides: dict[str, object], upstreams: tuple[str, ...]
) -> config.Settings:
    try:
        parsed = config.parse_upstreams(list(upstreams), "--upstream")
        return config.load(config_path, os.environ, overrides, parsed, FLAG_NAMES)
    except ConfigError as exc:
        click.echo(f"vpsrelay: config error: {exc.message}", err=True)
        sys.exit(2)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # httpx logs every request at INFO; the access log already has them.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vpsrelay")
def main() -> None:
    """vpsrelay: a Docker Hub relay for your own server.

    \b
    Examples:
      vpsrelay serve --listen 0.0.0.0:5000
      vpsrelay serve --config /etc/vpsrelay/config.toml
      vpsrelay config check /etc/vpsrelay/config.toml
    """


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="VPSRELAY_CONFIG",
    help=CONFIG_HELP,
)
@click.option(
    "--listen", multiple=True, help="HOST:PORT to serve plain HTTP (and h2c) on; repeatable."
)
@click.option("--public-url", help="Base URL clients reach the relay at (used in token realms).")
@click.option("--data-dir", help="Directory for the relay's state.")
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="REGISTRY=URL",
    help="Upstream for a registry, e.g. docker.io=https://mirror.example; repeatable.",
)
@click.option("--upstream-ca", help="CA bundle to verify upstream TLS with.")
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    help="IP or CIDR whose X-Forwarded-* headers are trusted; repeatable.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(
    config_path: Path | None,
    listen: tuple[str, ...],
    public_url: str | None,
    data_dir: str | None,
    upstreams: tuple[str, ...],
    upstream_ca: str | None,
    trusted_proxies: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Run the relay.

    \b
    Examples:
      vpsrelay serve                                  # Docker Hub on 127.0.0.1:5000
      vpsrelay serve --listen 0.0.0.0:5000 --public-url https://relay.example.com
      vpsrelay serve --upstream docker.io=https://registry-1.docker.io
    """
    overrides: dict[str, object] = {}
    if listen:
        overrides["server.listen"] = list(listen)
    if public_url is not None:
        overrides["server.public_url"] = public_url
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if upstream_ca is not None:
        overrides["upstream.ca_bundle"] = upstream_ca
    if trusted_proxies:
        overrides["server.trusted_proxies"] = list(trusted_proxies)
    if log_level is not None:
        overrides["log.level"] = log_level
    settings = _load(config_path, overrides, upstreams)
    _setup_logging(settings.log.level)
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        click.echo(
            f"vpsrelay: cannot create data_dir {str(settings.data_dir)!r}: {exc.strerror}", err=True
        )
        sys.exit(2)
    from vpsrelay import server  # imported late: `config check` needs no server stack

    try:
        trio.run(server.run, settings)
    except OSError as exc:  # e.g. the port is taken
        click.echo(f"vpsrelay: cannot serve: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


@main.group(name="config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a configuration file; exit 2 with one line naming the key if it is wrong."""
    _load(path, {}, ())
    click.echo(f"{path}: ok")


@config_group.command("show")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="VPSRELAY_CONFIG",
    help=CONFIG_HELP,
)
def config_show(config_path: Path | None) -> None:
    """Print the effective configuration (file, environment and defaults) as JSON."""
    settings = _load(config_path, {}, ())
    click.echo(json.dumps(dataclasses.asdict(settings), default=_jsonable, indent=2))


def _jsonable(value: Any) -> str:
    return str(value)


@main.group(name="user")
def user_group() -> None:
    """Manage the relay's users (client authentication)."""


@user_group.command("add")
@click.argument("name")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="VPSRELAY_CONFIG",
    help=CONFIG_HELP,
)
@click.option(
    "--file",
    "users_file",
    type=click.Path(path_type=Path),
    help="htpasswd file to write (default: auth.users_file of the configuration).",
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(
    name: str, config_path: Path | None, users_file: Path | None, password_stdin: bool
) -> None:
    """Add a user (or set a user's password) in the users file, as a bcrypt hash.

    \b
    Examples:
      vpsrelay user add alice --config /etc/vpsrelay/config.toml
      echo "$PASSWORD" | vpsrelay user add ci --password-stdin --file /etc/vpsrelay/htpasswd
    """
    from vpsrelay.clientauth import add_user  # late: bcrypt is not needed elsewhere here

    path = users_file or _load(config_path, {}, ()).auth.users_file
    if path is None:
        click.echo("vpsrelay: no users file: set auth.users_file or pass --file", err=True)
        sys.exit(2)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        new = add_user(path, name, password)
    except (ValueError, OSError) as exc:
        click.echo(f"vpsrelay: cannot add user {name!r} to {str(path)!r}: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{'added' if new else 'updated'} user {name!r} in {path}")
