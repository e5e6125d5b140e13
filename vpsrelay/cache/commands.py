"""`vpsrelay cache stats|ls|rm|gc` and `vpsrelay warm`.

The `cache` commands work on the data directory directly (the SQLite index and
the blob files), and are safe while the relay runs: they never touch `tmp/`
files of a live process, and a relay that finds a removed file treats it as a
miss. `warm` pulls images through a running relay, which fills its cache.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx

from vpsrelay.cache import claims
from vpsrelay.core import auth, cachepolicy, grammar
from vpsrelay.errors import RelayError
from vpsrelay.settings_loading import load_settings
from vpsrelay.upstream import USER_AGENT
from vpsrelay.upstream.tokens import fetch_token_blocking

if TYPE_CHECKING:
    from vpsrelay.config import Settings

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="VPSRELAY_CONFIG",
    help="TOML configuration file (env: VPSRELAY_CONFIG).",
)
DATA_DIR_OPTION = click.option(
    "--data-dir", type=click.Path(path_type=Path), help="The relay's data directory."
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = MANIFEST_TYPES[:2]


def _settings(config_path: Path | None, data_dir: Path | None) -> Settings:
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    return load_settings(config_path, overrides, ())


def _db(settings: Settings) -> sqlite3.Connection:
    if settings.cache.backend == "s3":
        click.echo(
            "vpsrelay: the cache is in a bucket (cache.backend = 's3'); these commands read a "
            "disk cache (see docs/multinode.md)",
            err=True,
        )
        sys.exit(1)
    path = settings.data_dir / "cache.db"
    if not path.exists():
        click.echo(f"vpsrelay: no cache in {str(settings.data_dir)!r}", err=True)
        sys.exit(1)
    db = sqlite3.connect(path, timeout=10, isolation_level=None)
    db.execute("PRAGMA busy_timeout=10000")
    return db


def _blob_path(settings: Settings, digest: str) -> Path:
    algorithm, _, hexpart = digest.partition(":")
    return settings.data_dir / "blobs" / algorithm / hexpart[:2] / hexpart


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.group(name="cache")
def cache_group() -> None:
    """Inspect and trim the blob cache (safe while the relay runs)."""


@cache_group.command("stats")
@CONFIG_OPTION
@DATA_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_stats(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
    """Size, object counts and the counters the relay keeps (hits, misses, ...)."""
    settings = _settings(config_path, data_dir)
    db = _db(settings)
    ((objects, used),) = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects")
    kinds = dict(db.execute("SELECT kind, count(*) FROM objects GROUP BY kind"))
    ((tags,),) = db.execute("SELECT count(*) FROM tags")
    counters = dict(db.execute("SELECT name, value FROM counters"))
    stat = os.statvfs(settings.data_dir)
    report: dict[str, Any] = {
        "data_dir": str(settings.data_dir),
        "objects": objects,
        "blobs": kinds.get("blob", 0),
        "manifests": kinds.get("manifest", 0),
        "tags": tags,
        "size": used,
        "max_size": settings.cache.max_size,
        "disk_free": stat.f_bavail * stat.f_frsize,
        "counters": counters,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    size = cachepolicy.format_size
    click.echo(f"cache in {report['data_dir']}")
    click.echo(
        f"  {objects} objects ({report['blobs']} blobs, {report['manifests']} manifests),"
        f" {tags} tags"
    )
    click.echo(
        f"  {size(used)} of {size(settings.cache.max_size)}, disk free {size(report['disk_free'])}"
    )
    for name in sorted(counters):
        value = counters[name]
        shown = size(value) if name.startswith("bytes") else str(value)
        click.echo(f"  {name}: {shown}")


@cache_group.command("ls")
@CONFIG_OPTION
@DATA_DIR_OPTION
def cache_ls(config_path: Path | None, data_dir: Path | None) -> None:
    """Every cached object, most recently used first, with the repositories holding it."""
    settings = _settings(config_path, data_dir)
    db = _db(settings)
    origins: dict[str, list[str]] = {}
    for digest, registry, repository in db.execute("SELECT * FROM origins"):
        origins.setdefault(digest, []).append(f"{registry}/{repository}")
    rows = db.execute(
        "SELECT digest, size, last_used, kind, media_type FROM objects ORDER BY last_used DESC"
    )
    for digest, size, last_used, kind, _media_type in rows:
        places = ",".join(sorted(origins.get(digest, []))) or "-"
        click.echo(
            f"{digest}  {kind:8}  {cachepolicy.format_size(size):>10}  {_when(last_used)}  {places}"
        )


@cache_group.command("rm")
@click.argument("digests", nargs=-1, required=True)
@CONFIG_OPTION
@DATA_DIR_OPTION
def cache_rm(digests: tuple[str, ...], config_path: Path | None, data_dir: Path | None) -> None:
    """Remove objects by digest (sha256:...)."""
    settings = _settings(config_path, data_dir)
    db = _db(settings)
    missing = 0
    for digest in digests:
        if not grammar.is_valid_digest(digest):
            click.echo(f"vpsrelay: not a digest: {digest!r}", err=True)
            sys.exit(2)
        found = db.execute("DELETE FROM objects WHERE digest = ?", (digest,)).rowcount
        with contextlib.suppress(FileNotFoundError):
            _blob_path(settings, digest).unlink()
            found = 1
        if found:
            click.echo(f"removed {digest}")
        else:
            click.echo(f"not cached: {digest}", err=True)
            missing += 1
    sys.exit(1 if missing else 0)


@cache_group.command("gc")
@CONFIG_OPTION
@DATA_DIR_OPTION
def cache_gc(config_path: Path | None, data_dir: Path | None) -> None:
    """Enforce the size cap and free-space floor now; drop index rows without files and
    partial files of relays that are no longer running."""
    settings = _settings(config_path, data_dir)
    db = _db(settings)
    rows = list(db.execute("SELECT digest, size, last_used FROM objects"))
    gone = [digest for digest, _, _ in rows if not _blob_path(settings, digest).exists()]
    for digest in gone:
        db.execute("DELETE FROM objects WHERE digest = ?", (digest,))
    rows = [row for row in rows if row[0] not in gone]
    stat = os.statvfs(settings.data_dir)
    victims, _ = cachepolicy.plan_eviction(
        [cachepolicy.Entry(d, s, u, busy=False) for d, s, u in rows],
        used=sum(size for _, size, _ in rows),
        max_size=settings.cache.max_size,
        free=stat.f_bavail * stat.f_frsize,
        min_free=settings.cache.min_free,
        incoming=0,
    )
    freed = 0
    sizes = {digest: size for digest, size, _ in rows}
    for digest in victims:
        db.execute("DELETE FROM objects WHERE digest = ?", (digest,))
        with contextlib.suppress(FileNotFoundError):
            _blob_path(settings, digest).unlink()
        freed += sizes[digest]
    partials = 0
    tmp, claimed = settings.data_dir / "tmp", settings.data_dir / "claims"
    if tmp.is_dir() and claimed.is_dir():
        # What no live relay process claims (running workers keep their fills).
        partials = claims.remove_leftovers(claimed, tmp)
    click.echo(
        f"evicted {len(victims)} objects ({cachepolicy.format_size(freed)}),"
        f" dropped {len(gone)} stale index rows, removed {partials} partial files"
    )


# --- warm


def parse_image(reference: str) -> tuple[str, str]:
    """`alpine`, `alpine:3.20`, `library/alpine@sha256:...`, `docker.io/x/y:1` to
    (name, reference)."""
    name, reference_part = reference, "latest"
    if "@" in reference:
        name, _, reference_part = reference.partition("@")
    elif ":" in reference.rsplit("/", 1)[-1]:
        name, _, reference_part = reference.rpartition(":")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest  # a registry host: the relay routes by path
    return name, reference_part


class Warmer:
    """Pulls images through a relay the way a client does, discarding the bytes."""

    def __init__(self, base_url: str, creds: tuple[str, str] | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.client = httpx.Client(
            timeout=httpx.Timeout(60.0, connect=10.0), headers={"user-agent": USER_AGENT}
        )
        self.challenge: auth.Challenge | None = None
        self.tokens: dict[str, str] = {}

    def close(self) -> None:
        self.client.close()

    def _headers(self, name: str) -> dict[str, str]:
        if self.challenge is None or not self.challenge.realm:
            return {}
        if name not in self.tokens:
            self.tokens[name] = fetch_token_blocking(
                self.client, self.challenge, [f"repository:{name}:pull"], self.creds
            )
        return {"authorization": f"Bearer {self.tokens[name]}"}

    def start(self) -> None:
        response = self.client.get(f"{self.base_url}/v2/")
        if response.status_code == 401:
            self.challenge = auth.parse_challenge(response.headers["www-authenticate"])
        else:
            response.raise_for_status()

    def manifest(self, name: str, reference: str) -> tuple[str, dict[str, Any]]:
        response = self.client.get(
            f"{self.base_url}/v2/{name}/manifests/{reference}",
            headers={**self._headers(name), "accept": ", ".join(MANIFEST_TYPES)},
        )
        response.raise_for_status()
        media_type = response.headers.get("content-type", "").split(";")[0]
        return media_type, response.json()

    def blob(self, name: str, digest: str, size: int, label: str) -> None:
        url = f"{self.base_url}/v2/{name}/blobs/{digest}"
        with (
            self.client.stream("GET", url, headers=self._headers(name)) as response,
            click.progressbar(length=size, label=label, file=sys.stderr) as bar,
        ):
            response.raise_for_status()
            for chunk in response.iter_raw(1 << 20):
                bar.update(len(chunk))


def _platform(entry: dict[str, Any]) -> str:
    platform = entry.get("platform") or {}
    text = f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"
    return f"{text}/{platform['variant']}" if platform.get("variant") else text


@click.command("warm")
@click.argument("images", nargs=-1, required=True)
@click.option("--platform", "platforms", multiple=True, help="os/arch[/variant]; default: all.")
@click.option("--relay", "relay_url", help="The relay's URL (default: its first listen address).")
@click.option("--creds", help="USER:PASSWORD for private repositories.")
@CONFIG_OPTION
def warm(
    images: tuple[str, ...],
    platforms: tuple[str, ...],
    relay_url: str | None,
    creds: str | None,
    config_path: Path | None,
) -> None:
    """Pre-fill a running relay's cache with IMAGE[:TAG]... (all platforms or --platform).

    \b
    Examples:
      vpsrelay warm alpine:3.20 nginx
      vpsrelay warm --platform linux/arm64 --relay http://127.0.0.1:5000 library/redis:7
    """
    settings = _settings(config_path, None)
    if relay_url is None:
        host, _, port = settings.server.listen[0].rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
        relay_url = f"http://{host}:{port}"
    user_pass = tuple(creds.split(":", 1)) if creds else None
    if user_pass is not None and len(user_pass) != 2:
        click.echo("vpsrelay: --creds expects USER:PASSWORD", err=True)
        sys.exit(2)
    warmer = Warmer(relay_url, user_pass)
    failed = 0
    try:
        warmer.start()
        for image in images:
            try:
                _warm_one(warmer, image, platforms)
            except RelayError as exc:
                click.echo(f"vpsrelay: warm {image}: {exc.message}", err=True)
                failed += 1
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                click.echo(f"vpsrelay: warm {image}: {exc}", err=True)
                failed += 1
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        click.echo(f"vpsrelay: cannot reach the relay at {relay_url}: {exc}", err=True)
        sys.exit(1)
    except (RelayError, KeyError) as exc:
        message = exc.message if isinstance(exc, RelayError) else f"no {exc} header"
        click.echo(f"vpsrelay: the relay at {relay_url} answered /v2/ badly: {message}", err=True)
        sys.exit(1)
    finally:
        warmer.close()
    sys.exit(1 if failed else 0)


def _warm_one(warmer: Warmer, image: str, platforms: tuple[str, ...]) -> None:
    name, reference = parse_image(image)
    media_type, document = warmer.manifest(name, reference)
    manifests: list[tuple[str, dict[str, Any]]] = []
    if media_type in INDEX_TYPES or "manifests" in document:
        for entry in document.get("manifests", []):
            platform = _platform(entry)
            if platforms and platform not in platforms:
                continue
            _, child = warmer.manifest(name, entry["digest"])
            manifests.append((platform, child))
        if not manifests:
            raise ValueError(f"no manifest for {', '.join(platforms)} in {image}")
    else:
        manifests.append(("", document))
    seen: set[str] = set()
    for platform, manifest in manifests:
        for blob in [manifest["config"], *manifest.get("layers", [])]:
            digest = blob["digest"]
            if digest in seen:
                continue
            seen.add(digest)
            label = f"{image} {platform} {digest[7:19]}".replace("  ", " ")
            warmer.blob(name, digest, int(blob["size"]), label)
    click.echo(f"{image}: {len(seen)} blobs warm")
