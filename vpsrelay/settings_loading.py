"""Loading the settings for a command: the one helper every CLI command shares.

It sits below `cli` and `cache.commands` so neither imports the other for it: a
config error is one line on stderr naming the file (or flag) and field, and exit 2.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from vpsrelay import config
from vpsrelay.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

# The flag behind each dotted key, so errors name what the user typed.
FLAG_NAMES = {
    "server.listen": "--listen",
    "server.public_url": "--public-url",
    "data_dir": "--data-dir",
    "upstream.ca_bundle": "--upstream-ca",
    "server.trusted_proxies": "--trusted-proxy",
    "log.level": "--log-level",
    "tls.domains": "--domain",
    "tls.email": "--email",
    "tls.acme_directory": "--acme-directory",
    "tls.challenge": "--challenge",
    "tls.cert_file": "--cert",
    "tls.key_file": "--key",
    "tls.https_listen": "--https-listen",
    "tls.http_listen": "--http-listen",
    "tls.acme_ca_bundle": "--acme-ca-bundle",
}


def load_settings(
    config_path: Path | None, overrides: dict[str, object], upstreams: tuple[str, ...]
) -> config.Settings:
    """The settings from the file, `VPSRELAY_*` variables, flags and `--upstream`s; on a
    config error, one line on stderr and exit status 2."""
    try:
        parsed = config.parse_upstreams(list(upstreams), "--upstream")
        return config.load(config_path, os.environ, overrides, parsed, FLAG_NAMES)
    except ConfigError as exc:
        click.echo(f"vpsrelay: config error: {exc.message}", err=True)
        sys.exit(2)
