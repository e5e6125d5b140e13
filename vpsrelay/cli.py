"""The `vpsrelay` command line: `serve` and `config check|show`.

A bad configuration prints one line, `vpsrelay: config error: <where>: <key>: <why>`,
and exits 2; it never shows a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from vpsrelay import __version__, config, private_files
from vpsrelay.cache.commands import cache_group, warm
from vpsrelay.settings_loading import load_settings as _load

if TYPE_CHECKING:
    from collections.abc import Callable

CONFIG_HELP = "TOML configuration file (env: VPSRELAY_CONFIG)."
# Every command that reads the configuration takes it the same way.
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="VPSRELAY_CONFIG",
    help=CONFIG_HELP,
)


# TLS flag -> (dotted key, repeatable)
TLS_FLAGS = {
    "domain": ("tls.domains", True),
    "email": ("tls.email", False),
    "acme_directory": ("tls.acme_directory", False),
    "challenge": ("tls.challenge", False),
    "cert": ("tls.cert_file", False),
    "key": ("tls.key_file", False),
    "https_listen": ("tls.https_listen", True),
    "http_listen": ("tls.http_listen", True),
    "acme_ca_bundle": ("tls.acme_ca_bundle", False),
}


def _tls_options(function: Callable[..., None]) -> Callable[..., None]:
    """The `[tls]` flags, shared by `serve` and `cert`."""
    options = [
        click.option(
            "--domain",
            multiple=True,
            help="Get a certificate for this name by ACME and serve HTTPS; repeatable.",
        ),
        click.option("--email", help="Contact address for the ACME account (expiry notices)."),
        click.option(
            "--acme-directory",
            help="ACME directory URL, or 'staging' (default: Let's Encrypt production).",
        ),
        click.option("--challenge", type=click.Choice(["http-01", "tls-alpn-01"])),
        click.option("--cert", help="Your own certificate chain (PEM); reloaded when it changes."),
        click.option("--key", help="The key of --cert (PEM)."),
        click.option("--https-listen", multiple=True, help="HOST:PORT for HTTPS (default :443)."),
        click.option(
            "--http-listen",
            multiple=True,
            help="HOST:PORT for ACME HTTP-01 and https redirects (default :80).",
        ),
        click.option("--acme-ca-bundle", help="CA file to trust for the ACME API itself."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _tls_overrides(values: dict[str, Any]) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for flag, (key, repeatable) in TLS_FLAGS.items():
        value = values.get(flag)
        if repeatable and value:
            overrides[key] = list(value)
        elif not repeatable and value is not None:
            overrides[key] = value
    return overrides


def _setup_logging(level: str, style: str = "logfmt") -> None:
    from vpsrelay.ops import logs

    logs.setup(level, style)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vpsrelay")
def main() -> None:
    """vpsrelay: a Docker Hub relay for your own server.

    \b
    Examples:
      vpsrelay serve --listen 0.0.0.0:5000
      vpsrelay serve --config /etc/vpsrelay/config.toml
      vpsrelay config check /etc/vpsrelay/config.toml
      vpsrelay snippets --format containerd
      vpsrelay check --url https://relay.example.com
      vpsrelay save alpine:latest -o alpine.tar --relay https://relay.example.com
    """


@main.command()
@config_option
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
@click.option(
    "--allow-unpatched",
    is_flag=True,
    default=None,
    help="Serve degraded when library safety patches cannot apply (server.allow_unpatched).",
)
@click.option(
    "--workers",
    metavar="N",
    help="Worker processes sharing the listeners (default: one per usable CPU; 1: no parent).",
)
@_tls_options
def serve(
    config_path: Path | None,
    listen: tuple[str, ...],
    public_url: str | None,
    data_dir: str | None,
    upstreams: tuple[str, ...],
    upstream_ca: str | None,
    trusted_proxies: tuple[str, ...],
    log_level: str | None,
    allow_unpatched: bool | None,
    workers: str | None,
    **tls_flags: Any,
) -> None:
    """Run the relay.

    \b
    Examples:
      vpsrelay serve                                  # Docker Hub on 127.0.0.1:5000
      vpsrelay serve --listen 0.0.0.0:5000 --public-url https://relay.example.com
      vpsrelay serve --upstream docker.io=https://registry-1.docker.io
      vpsrelay serve --domain relay.example.com --email you@example.com   # HTTPS on 443 + 80
    """
    overrides = _tls_overrides(tls_flags)
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
    if allow_unpatched:
        overrides["server.allow_unpatched"] = True
    if workers is not None:
        overrides["server.workers"] = workers
    settings = _load(config_path, overrides, upstreams)
    _setup_logging(settings.log.level, settings.log.format)
    try:
        private_files.secure_data_dir(settings.data_dir)
    except OSError as exc:
        click.echo(
            f"vpsrelay: cannot create data_dir {str(settings.data_dir)!r}: {exc.strerror}", err=True
        )
        sys.exit(2)
    from vpsrelay import server  # late: `config check` needs no server stack
    from vpsrelay.patches import hypercorn as hypercorn_patches

    if settings.tls.enabled:
        _tls_preflight(settings)

    if settings.server.workers > 1:
        _supervise(settings)
        return
    try:
        trio.run(server.run, settings)
    except KeyboardInterrupt:
        pass
    except hypercorn_patches.PatchError as exc:
        click.echo(f"vpsrelay: cannot serve: {exc}", err=True)
        sys.exit(1)
    except (OSError, BaseExceptionGroup) as exc:
        # A taken port or a missing permission reaches us from inside Trio's nurseries.
        cause = _os_error(exc)
        if cause is None:
            raise
        click.echo(f"vpsrelay: cannot serve: {cause}", err=True)
        sys.exit(1)


def _supervise(settings: config.Settings) -> None:
    """`server.workers` > 1: this process supervises; the workers serve."""
    from vpsrelay import supervisor
    from vpsrelay.patches import hypercorn as hypercorn_patches

    try:
        status = supervisor.run(settings)
    except hypercorn_patches.PatchError as exc:
        click.echo(f"vpsrelay: cannot serve: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"vpsrelay: cannot serve: {exc}", err=True)
        sys.exit(1)
    sys.exit(status)


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, unwrapping exception groups; None if there is none."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _os_error(inner)) is not None:
                return found
    return None


def _tls_preflight(settings: config.Settings) -> None:
    """Your own certificate files must load before anything listens."""
    from vpsrelay.tls import contexts as tls

    cert_file, key_file = settings.tls.cert_file, settings.tls.key_file
    if cert_file is None or key_file is None:
        return
    try:
        tls.serving_context(cert_file, key_file)
    except (OSError, ValueError) as exc:
        click.echo(f"vpsrelay: cannot load {cert_file} / {key_file}: {exc}", err=True)
        sys.exit(2)


@main.group(name="cert")
def cert_group() -> None:
    """Show or renew the relay's TLS certificate."""


def _cert_settings(config_path: Path | None, data_dir: str | None, flags: Any) -> config.Settings:
    overrides = _tls_overrides(flags)
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = _load(config_path, overrides, ())
    if not settings.tls.enabled:
        click.echo("vpsrelay: TLS is not configured (set tls.domains or tls.cert_file)", err=True)
        sys.exit(2)
    return settings


@cert_group.command("status")
@config_option
@click.option("--data-dir", help="Directory for the relay's state.")
@_tls_options
def cert_status(config_path: Path | None, data_dir: str | None, **flags: Any) -> None:
    """Show the certificate: issuer, names, not-after, days left, when renewal is due."""
    import datetime

    from vpsrelay.core import renewal
    from vpsrelay.tls import certs

    settings = _cert_settings(config_path, data_dir, flags)
    tls_config = settings.tls
    if tls_config.cert_file is not None:
        path = tls_config.cert_file
    else:
        path = certs.live_dir(settings.data_dir, tls_config.domains) / "fullchain.pem"
    try:
        info = certs.describe(path.read_bytes())
    except (OSError, ValueError) as exc:
        click.echo(f"vpsrelay: no certificate at {path}: {exc}", err=True)
        sys.exit(1)
    now = datetime.datetime.now(datetime.UTC)
    due = renewal.renewal_time(info.validity, tls_config.renew_before)
    click.echo(f"file:       {path}")
    click.echo(f"subject:    {info.subject}")
    click.echo(f"issuer:     {info.issuer}")
    click.echo(f"names:      {', '.join(info.names)}")
    click.echo(f"serial:     {info.serial:x}")
    click.echo(f"not before: {info.validity.not_before.isoformat()}")
    click.echo(f"not after:  {info.validity.not_after.isoformat()}")
    click.echo(f"days left:  {info.days_left(now):.1f}")
    if tls_config.acme:
        click.echo(f"renewal:    {'due now' if now >= due else 'from ' + due.isoformat()}")


@cert_group.command("renew")
@config_option
@click.option("--data-dir", help="Directory for the relay's state.")
@click.option("--force", is_flag=True, help="Renew even if the certificate is not due.")
@_tls_options
def cert_renew(config_path: Path | None, data_dir: str | None, force: bool, **flags: Any) -> None:
    """Renew the ACME certificate now if it is due (or with --force).

    A running relay is asked to do it (through the control socket in its data
    directory) and switches to the new certificate without a restart; with no relay
    running, this command answers the CA's challenges itself on the configured ports.
    """
    settings = _cert_settings(config_path, data_dir, flags)
    if not settings.tls.acme:
        click.echo("vpsrelay: the certificate is your own file (tls.cert_file); nothing to renew")
        sys.exit(2)
    _setup_logging(settings.log.level)
    from vpsrelay.tls import serving as tlsserver

    reply = tlsserver.request_renewal(settings.data_dir, force=force)
    if reply is None:
        try:
            reply = trio.run(partial(tlsserver.renew_standalone, settings, force=force))
        except OSError as exc:
            click.echo(f"vpsrelay: cannot answer ACME challenges: {exc}", err=True)
            sys.exit(1)
    if not reply.get("ok"):
        click.echo(f"vpsrelay: renewal failed: {reply.get('error')}", err=True)
        sys.exit(1)
    state = "renewed" if reply.get("renewed") else "not due"
    click.echo(
        f"{state}: serial {reply.get('serial')}, names {','.join(reply.get('names', []))}, "
        f"not after {reply.get('not_after')} ({reply.get('days_left')} days left)"
    )


@main.command()
@config_option
@click.option("--url", help="URL to probe instead of /healthz on the first server.listen.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait.")
def healthcheck(config_path: Path | None, url: str | None, timeout: float) -> None:
    """Exit 0 if the local relay answers GET /healthz with 200, else 1 (Docker HEALTHCHECK).

    \b
    Examples:
      vpsrelay healthcheck
      vpsrelay healthcheck --url http://127.0.0.1:5000/healthz
    """
    from vpsrelay.ops import healthcheck as probe  # imported late, like the server stack

    settings = _load(config_path, {}, ())
    healthy, line = probe.probe(url or probe.local_url(settings), timeout)
    click.echo(line, err=not healthy)
    sys.exit(0 if healthy else 1)


@main.group(name="config")
def config_group() -> None:
    """Check or show the configuration."""


@config_group.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a configuration file; exit 2 with one line naming the key if it is wrong.

    \b
    Examples:
      vpsrelay config check /etc/vpsrelay/config.toml
    """
    _load(path, {}, ())
    click.echo(f"{path}: ok")


@config_group.command("show")
@config_option
def config_show(config_path: Path | None) -> None:
    """Print the effective configuration (file, environment and defaults) as JSON.

    Secrets (tokens, passwords) are shown as "***".

    \b
    Examples:
      vpsrelay config show --config /etc/vpsrelay/config.toml
      VPSRELAY_METRICS__TOKEN=s3cret vpsrelay config show
    """
    settings = _load(config_path, {}, ())
    click.echo(json.dumps(shown_settings(settings), indent=2))


def shown_settings(value: Any) -> Any:
    """The settings as JSON values, every `Secret` as `"***"`.

    Redaction goes by type, not by key name: a setting is secret because the config holds
    it in a `Secret`, so a new secret cannot slip out under a name nobody thought of.
    """
    if isinstance(value, config.Secret):
        return "***"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: shown_settings(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [shown_settings(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # paths, networks


def _relay_url(settings: config.Settings) -> str:
    """The URL clients use: `server.public_url`, else the first listen address."""
    if settings.server.public_url:
        return settings.server.public_url
    host, port = config.parse_listen(settings.server.listen[0])
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


@main.command()
@config_option
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["docker", "containerd", "k3s", "podman", "nas"]),
    help="Only this client's configuration; repeatable (default: all).",
)
@click.option("--url", help="The relay's public URL (default: server.public_url).")
def snippets(config_path: Path | None, formats: tuple[str, ...], url: str | None) -> None:
    """Print client configuration for this relay (the landing page's, on the terminal).

    \b
    Examples:
      vpsrelay snippets --format docker > /etc/docker/daemon.json.new
      vpsrelay snippets --format containerd --url https://relay.example.com
      vpsrelay snippets                      # docker, containerd, k3s, podman, NAS
    """
    from vpsrelay.core import snippets as snippet_core
    from vpsrelay.ops import landing

    settings = _load(config_path, {}, ())
    target = landing.target(settings, (url or _relay_url(settings)).rstrip("/"))
    if url:
        target = dataclasses.replace(target, url=url.rstrip("/"))
    chosen = snippet_core.snippets(target, formats or snippet_core.FORMATS)
    if formats == ("docker",):
        # Just daemon.json, so it can be redirected into the file.
        click.echo(chosen[0].text, nl=False)
        return
    click.echo(snippet_core.as_text(chosen), nl=False)


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
    help="The tar to write; a partial one is resumed.",
)  # fmt: skip
@click.option("--relay", required=True, help="The relay's URL, e.g. https://relay.example.com.")
@click.option(
    "--platform", help="os/arch[/variant] of multi-platform images (default linux/amd64)."
)
@click.option("--user", help="Log in as this user (a relay with access control).")
@click.option(
    "--password",
    envvar="VPSRELAY_SAVE_PASSWORD",
    help="The user's password (better: the VPSRELAY_SAVE_PASSWORD variable; else asked).",
)
@click.option("--ca", "ca_file", type=click.Path(exists=True), help="CA to trust for TLS.")
def save(
    images: tuple[str, ...],
    output: Path,
    relay: str,
    platform: str | None,
    user: str | None,
    password: str | None,
    ca_file: str | None,
) -> None:
    """Download IMAGES from a relay as one tar for `docker load` / `podman load`.

    Run it again after an interruption: it finishes the partial file.

    \b
    Examples:
      vpsrelay save alpine:3.19 -o alpine.tar --relay https://relay.example.com
      vpsrelay save nginx redis -o web.tar --relay https://relay.example.com --platform linux/arm64
      docker load -i alpine.tar
    """
    from vpsrelay import save as saving

    auth = None
    if user:
        if password is None:
            password = click.prompt(f"password for {user}", hide_input=True, err=True)
        auth = (user, password or "")
    try:
        size = saving.save(
            relay, images, output, platform=platform, auth=auth, verify=ca_file or True
        )
    except saving.SaveError as exc:
        click.echo(f"vpsrelay: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("\nvpsrelay: interrupted: run the same command to resume", err=True)
        sys.exit(130)
    click.echo(f"{output}: {size} bytes")


@main.command()
@config_option
@click.option("--url", help="The relay to check (default: server.public_url, else listen).")
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="REGISTRY=REPO:TAG",
    help="Image to fetch a manifest of, per registry (docker.io=library/hello-world:latest).",
)
@click.option("--ca", "ca_file", type=click.Path(exists=True), help="CA to trust for TLS.")
@click.option("--user", help="Log in as this user (a relay with access control, private images).")
@click.option(
    "--password",
    envvar="VPSRELAY_CHECK_PASSWORD",
    help="The user's password (better: the VPSRELAY_CHECK_PASSWORD variable; else asked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def check(
    config_path: Path | None,
    url: str | None,
    images: tuple[str, ...],
    ca_file: str | None,
    user: str | None,
    password: str | None,
    as_json: bool,
) -> None:
    """Diagnose a relay: DNS, TLS, HTTP/2, /v2/, a token, manifests, limits, clocks.

    Run it on the VPS or from a client machine. Each failing row says how to fix
    it; the exit status is 1 if any row failed.

    \b
    Examples:
      vpsrelay check                                   # the relay in the config
      vpsrelay check --url https://relay.example.com
      vpsrelay check --url https://relay.example.com --image docker.io=library/alpine:3
      VPSRELAY_CHECK_PASSWORD=... vpsrelay check --user me --image docker.io=me/private:1
    """
    from vpsrelay.ops import check as diagnosis

    settings = _load(config_path, {}, ())
    try:
        chosen = diagnosis.parse_images(images, tuple(r.name for r in settings.registries))
    except ValueError as exc:
        click.echo(f"vpsrelay: {exc}", err=True)
        sys.exit(2)
    if user is not None and password is None:
        password = click.prompt(f"password for {user}", hide_input=True, err=True)
    credentials = (user, password or "") if user is not None else None
    report = diagnosis.Checker(
        url or _relay_url(settings), chosen, ca_file=ca_file, credentials=credentials
    ).run()
    click.echo(report.as_json() if as_json else report.table())
    sys.exit(0 if report.ok else 1)


@main.group(name="user")
def user_group() -> None:
    """Manage the relay's users (client authentication)."""


@user_group.command("add")
@click.argument("name")
@config_option
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
    from vpsrelay.access.clientauth import add_user  # late: bcrypt is not needed elsewhere here

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


main.add_command(cache_group)
main.add_command(warm)
