"""One typed configuration, from a TOML file, `VPSRELAY_*` variables and flags.

Precedence: flags over the environment over the file over the defaults. Every
value is validated at start; an unknown or mistyped key, or a bad value, is a
`ConfigError` whose message names where it came from and the dotted key:
`relay.toml: server.lisen: unknown key (did you mean 'listen'?)`. The environment is
held to the same rule: a `VPSRELAY_*` variable that is neither a setting nor one of the
project's other variables is an error, since Docker and compose users configure through
it and a typo there would otherwise be silently ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from vpsrelay.core import bucketeviction
from vpsrelay.core.access import AHEAD_PER_CLIENT
from vpsrelay.core.cachepolicy import GiB, parse_size
from vpsrelay.core.registries import Registry, RegistryTable
from vpsrelay.core.tokens import parse_htpasswd, parse_pull_tokens, weak_pull_token
from vpsrelay.errors import ConfigError
from vpsrelay.registry_config import (
    BUILTIN_REGISTRIES,
    DOCKER_HUB_URL,
    REGISTRY_KEYS,
    RegistryConfig,
    RegistryInputs,
    Secret,
    build_registries,
    parse_http_url,
)

__all__ = ["DOCKER_HUB_URL", "RegistryConfig", "Secret", "Settings", "load", "registry_table"]

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_DATA_DIR = Path("data")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- value parsers: each takes the raw value and returns the typed one or raises ValueError


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional_str(value: object) -> str | None:
    return _str(value) or None


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
    ):
        return value.lower() in ("1", "true", "yes", "on")
    raise ValueError(f"expected true or false, got {value!r}")


def _seconds(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _count(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a positive whole number, got {value!r}")
    return value


def _whole(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number (0 or more), got {value!r}")
    return value


MAX_WORKERS = 64


def _workers(value: object) -> int:
    count = _count(value)
    if count > MAX_WORKERS:
        raise ValueError(f"expected 1 to {MAX_WORKERS} worker processes, got {count}")
    return count


def usable_cpus() -> int:
    """The CPUs this process may run on (a cgroup or `taskset` may allow fewer than exist)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def _parallel(value: object) -> int:
    count = _count(value)
    if count > 16:
        raise ValueError(f"expected at most 16 connections, got {count}")
    return count


def _list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _path(value: object) -> Path:
    text = _str(value)
    if not text:
        raise ValueError("expected a path, got an empty string")
    return Path(text).expanduser()


def _optional_path(value: object) -> Path | None:
    return _path(value) if value != "" else None


def _existing_file(value: object) -> Path | None:
    path = _optional_path(value)
    if path is not None and not path.is_file():
        raise ValueError(f"no such file: {str(path)!r}")
    return path


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT` to (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _listen(value: object) -> tuple[str, ...]:
    addresses = _list(value)
    if not addresses:
        raise ValueError("expected at least one HOST:PORT")
    for address in addresses:
        parse_listen(address)
    return addresses


_http_url = parse_http_url


def _optional_url(value: object) -> str | None:
    return _http_url(value) if value not in ("", None) else None


def _networks(value: object) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in _list(value))
    except ValueError as exc:
        raise ValueError(f"expected IP addresses or CIDR networks: {exc}") from None


def _non_negative(value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number (0 for no limit), got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a number >= 0 (0 for no limit), got {value!r}")
    return float(value)


def _limit(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0 (0 for no limit), got {value!r}")
    return value


def _held_bytes(value: object) -> int:
    size = _size(value)
    if 0 < size < 8 * 1024**2:  # room to read one manifest (4 MiB) and one config (1 MiB)
        raise ValueError(f"expected 0 (no limit) or at least 8MiB, got {value!r}")
    return size


def _ipv6_prefix(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise ValueError(f"expected an IPv6 prefix length from 1 to 128, got {value!r}")
    return value


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
               "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}  # fmt: skip


def _size(value: object) -> int:
    """Bytes: a whole number, or `500MiB`, `10 GiB`, `1TB` (0 for no limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size in bytes like 1073741824 or '10GiB', got {value!r}")


def _regexes(value: object) -> tuple[str, ...]:
    patterns = _list(value)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {pattern!r}: {exc}") from None
    return patterns


def _redirect_allow(value: object) -> tuple[str, ...]:
    """CIDR networks or http(s) origins that redirects may reach although private."""
    entries = _list(value)
    for entry in entries:
        if "://" in entry:
            parts = urlsplit(entry)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
                raise ValueError(f"expected a network or an origin http://host:port: {entry!r}")
        else:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"expected a network or an origin like http://host:port: {entry!r}"
                ) from None
    return entries


# A secret's parse error never quotes the value: the message goes to logs and terminals.
_NOT_A_SECRET = "expected a string (the value is not shown: it is a secret)"


def _users(value: object) -> tuple[Secret, ...]:
    """htpasswd entries; Secret, since a bcrypt hash can be cracked offline."""
    if isinstance(value, str):
        entries = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        entries = value
    else:
        raise ValueError(
            "expected a list of USER:BCRYPT-HASH strings (the value is not shown: it holds hashes)"
        )
    try:
        parse_htpasswd("\n".join(entries))
    except ValueError as exc:  # names the line and user, never the hash
        raise ValueError(f"expected USER:BCRYPT-HASH entries: {exc}") from None
    return tuple(Secret(entry) for entry in entries)


def _optional_secret(value: object) -> Secret | None:
    if not isinstance(value, str):
        raise ValueError(_NOT_A_SECRET)
    return Secret(value) if value else None


def _secrets(value: object) -> tuple[Secret, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise ValueError(f"expected a list of strings; {_NOT_A_SECRET}")
    return tuple(Secret(item) for item in items if item)


def _pull_tokens(value: object) -> tuple[Secret, ...]:
    tokens = _secrets(value)
    for number, token in enumerate(tokens, 1):
        if (weakness := weak_pull_token(token.reveal())) is not None:
            raise ValueError(f"token {number}: {weakness}")
    return tokens


def _pull_tokens_file(value: object) -> Path | None:
    path = _existing_file(value)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return path  # the relay warns when it reads it (and reads it again when it changes)
    _, problems = parse_pull_tokens(text)
    if problems:
        raise ValueError(f"{str(path)!r}: {problems[0]}")
    return path


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _str(value).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
ACME_DIRECTORY_ALIASES = {
    "production": LETS_ENCRYPT,
    "letsencrypt": LETS_ENCRYPT,
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
_DOMAIN = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


def _domains(value: object) -> tuple[str, ...]:
    names = tuple(name.lower().rstrip(".") for name in _list(value))
    for name in names:
        if not _DOMAIN.fullmatch(name) or name.replace(".", "").isdigit():
            raise ValueError(f"expected DNS names (no wildcards, no IP addresses), got {name!r}")
    return names


def _acme_directory(value: object) -> str:
    text = _str(value)
    return ACME_DIRECTORY_ALIASES.get(text.lower()) or _https_url(text)


def _https_url(value: object) -> str:
    text = _http_url(value)
    if not text.startswith("https://"):
        raise ValueError(f"expected an https URL (or 'staging'), got {text!r}")
    return text


def _fraction(value: object) -> float:
    if isinstance(value, str):
        numerator, slash, denominator = value.partition("/")
        try:
            value = float(numerator) / float(denominator) if slash else float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"expected a fraction such as 0.33 or 1/3, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"expected a fraction of the lifetime in (0, 1], got {value!r}")
    return float(value)


def _registry_seconds(value: object) -> tuple[tuple[str, float], ...]:
    """`{"docker.io": 300}` or `"docker.io=300,ghcr.io=60"`."""
    items: list[tuple[object, ...]]
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = [tuple(part.split("=", 1)) for part in _list(value)]
    result = []
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str) or not item[0].strip():
            raise ValueError(f"expected REGISTRY=SECONDS, got {item!r}")
        result.append((item[0].strip(), _seconds(item[1])))
    return tuple(result)


def _option(default: Any, parse: Callable[[object], Any], help_text: str) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help_text})


# --- the sections


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    listen: tuple[str, ...] = _option(("127.0.0.1:5000",), _listen, "HOST:PORT to serve on")
    public_url: str | None = _option(None, _optional_url, "base URL clients use (realms)")
    base_domains: tuple[str, ...] = _option((), _list, "domains whose subdomains name registries")
    trusted_proxies: tuple[Network, ...] = _option(
        (), _networks, "proxies whose X-Forwarded-* count"
    )
    keep_alive_timeout: float = _option(75.0, _seconds, "idle keep-alive seconds")
    read_timeout: float = _option(30.0, _seconds, "seconds to receive a request's headers")
    graceful_timeout: float = _option(30.0, _seconds, "seconds in-flight requests get at stop")
    # One process per usable CPU: a supervising parent shares the listeners with them.
    workers: int = _option(usable_cpus(), _workers, "worker processes (1: one process, no parent)")
    max_connections: int = _option(1000, _count, "client connections open at once")
    # One address (a scanner, a slowloris) must not take the slots everyone shares; a busy
    # NAT or CI host pulling in parallel (3-6 connections a pull) still fits. Addresses in
    # trusted_proxies count towards max_connections only.
    max_connections_per_ip: int = _option(
        64, _count, "client connections open at once from one address"
    )
    # A client sends its request head right after connecting: 10 s covers a TLS handshake
    # and 16 KiB of headers on a poor link, and bounds what a trickled head can hold.
    head_timeout: float = _option(
        10.0, _seconds, "seconds from connecting (TLS included) to a complete request head"
    )
    # Longer than upstream.read_timeout (60 s): an upstream that stalls is reported by its
    # own timeout first. A client reading 64 KiB in this time is never cut.
    stall_timeout: float = _option(
        120.0, _seconds, "seconds a request in flight may go without a byte to or from its client"
    )
    max_header_bytes: int = _option(16384, _count, "request line + headers, bytes")
    max_headers: int = _option(100, _count, "request headers per request")
    allowed_hosts: tuple[str, ...] = _option((), _list, "Host names served (empty: any)")
    # Off: a relay whose safety patches cannot apply (other hypercorn/h2/httpx versions than
    # pinned) refuses to start. On: it runs degraded and says so in /readyz and `check`.
    allow_unpatched: bool = _option(
        False, _bool, "serve even when library safety patches cannot apply (degraded)"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    connect_timeout: float = _option(10.0, _seconds, "seconds to connect upstream")
    read_timeout: float = _option(60.0, _seconds, "idle seconds between upstream bytes")
    pool_timeout: float = _option(10.0, _seconds, "seconds to wait for a pooled connection")
    max_connections: int = _option(
        200, _count, "upstream connections per registry, and as many to where it redirects"
    )
    max_redirects: int = _option(5, _count, "redirect hops followed for a blob")
    ca_bundle: Path | None = _option(None, _existing_file, "CA bundle for upstream TLS")
    # Docker Hub counts anonymous pulls per IPv4 address but per IPv6 /64, which VPS
    # neighbours often share: IPv4 keeps the relay's budget its own.
    prefer_ipv4: bool = _option(False, _bool, "connect to upstreams over IPv4 only")
    resume_attempts: int = _option(
        5, _whole, "failed resumes in a row of a blob body that broke off (0: never resume)"
    )
    resume_backoff: float = _option(0.5, _seconds, "first wait between resumes; doubles")
    parallel_connections: int = _option(
        1, _parallel, "ranged connections to the CDN per big blob, 1-16 (1: one stream, off)"
    )
    parallel_min_size: int = _option(
        64 * 1024 * 1024, parse_size, "smallest blob fetched in parallel ranges, e.g. 64MiB"
    )
    # Each holds up to K+1 pieces of 4 MiB: this bounds their memory in all.
    parallel_max_fetches: int = _option(
        4, _count, "parallel ranged fetches at once in the process; more use one stream"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = _option("info", _choice("debug", "info", "warning", "error"), "log level")
    access_log: bool = _option(True, _bool, "one line per request")
    format: str = _option("logfmt", _choice("logfmt", "json", "text"), "log line format")


def _optional_listen(value: object) -> str | None:
    text = _str(value)
    if not text:
        return None
    parse_listen(text)
    return text


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    enabled: bool = _option(True, _bool, "serve /metrics")
    # On the main listener /metrics answers these addresses, or a Bearer token.
    allow: tuple[Network, ...] = _option(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        _networks,
        "client addresses that may read /metrics",
    )
    token: Secret | None = _option(None, _optional_secret, "Bearer token that may read /metrics")
    listen: str | None = _option(None, _optional_listen, "separate HOST:PORT for /metrics")


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MIN_PART_SIZE = 5 * 1024**2  # S3's smallest part but the last


def _bucket(value: object) -> str:
    text = _str(value)
    if text and not _BUCKET.fullmatch(text):
        raise ValueError(f"expected an S3 bucket name (3-63 of a-z 0-9 . -), got {text!r}")
    return text


def _prefix(value: object) -> str:
    text = _str(value).lstrip("/")
    if text and not text.endswith("/"):
        text += "/"
    if not re.fullmatch(r"[A-Za-z0-9._/-]*", text) or "//" in text or ".." in text:
        raise ValueError(f"expected a key prefix of A-Z a-z 0-9 . _ - /, got {value!r}")
    return text


def _part_size(value: object) -> int:
    size = _size(value)
    if not MIN_PART_SIZE <= size <= 512 * 1024**2:
        raise ValueError(f"expected a part size from 5MiB to 512MiB, got {value!r}")
    return size


def _presign_seconds(value: object) -> int:
    # Whole seconds: a presigned URL's X-Amz-Expires is an integer from 1 to 3600.
    seconds = _count(value)
    if seconds > 3600:
        raise ValueError(f"expected at most 3600 seconds (a short expiry), got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Config:
    """`[cache.s3]`: verified blobs in an S3-compatible bucket that several nodes share."""

    endpoint: str | None = _option(None, _optional_url, "S3 endpoint URL, e.g. http://minio:9000")
    bucket: str = _option("", _bucket, "the bucket (it must exist)")
    region: str = _option("us-east-1", _str, "signing region (R2: auto)")
    prefix: str = _option("vpsrelay/", _prefix, "key prefix inside the bucket")
    addressing: str = _option("path", _choice("path", "virtual"), "path or virtual-host URLs")
    access_key: str | None = _option(None, _optional_str, "access key id")
    secret_key: Secret | None = _option(None, _optional_secret, "secret access key")
    secret_key_file: Path | None = _option(None, _existing_file, "file with the secret key")
    ca_bundle: Path | None = _option(None, _existing_file, "CA file for the endpoint")
    conditional_writes: bool = _option(
        True, _bool, "the store honours If-None-Match: * (false: single-flight per node)"
    )
    lease_ttl: float = _option(30.0, _seconds, "seconds a fill's lease lives unless renewed")
    lease_wait: float = _option(
        600.0, _seconds, "seconds to wait for another node's fill before fetching it too"
    )
    part_size: int = _option(8 * 1024**2, _part_size, "multipart upload part size")
    timeout: float = _option(30.0, _seconds, "seconds without progress on a bucket request")
    redirect: bool = _option(False, _bool, "answer cached blob GETs with a presigned URL")
    public_endpoint: str | None = _option(
        None, _optional_url, "endpoint clients reach for presigned URLs (default: endpoint)"
    )
    redirect_expiry: int = _option(
        60, _presign_seconds, "whole seconds a presigned URL is valid (1 to 3600)"
    )
    redirect_min_size: int = _option(1024**2, _size, "smallest blob answered with a redirect")
    max_size: int = _option(0, _size, "cap on the bucket's bytes under prefix (0: no cap)")
    evict_interval: float = _option(
        60.0, _seconds, "seconds between access-time batches and eviction passes"
    )
    evict_grace: float = _option(
        3600.0, _seconds, "seconds after its last access an object may not be evicted"
    )

    def secret(self) -> str:
        """The secret access key (from the file if one is named: read at each start)."""
        if self.secret_key_file is not None:
            return self.secret_key_file.read_text(encoding="utf-8").strip()
        return self.secret_key.reveal() if self.secret_key is not None else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    enabled: bool = _option(True, _bool, "keep blobs and manifests on disk")
    max_size: int = _option(10 * GiB, parse_size, "cap on the cache's size, e.g. 50GiB")
    min_free: int = _option(1 * GiB, parse_size, "free disk space the cache never takes")
    tag_ttl: float = _option(300.0, _seconds, "seconds a tag is served without asking upstream")
    registry_tag_ttl: tuple[tuple[str, float], ...] = _option(
        (), _registry_seconds, "per-registry tag_ttl: REGISTRY=SECONDS,..."
    )
    max_stale: float = _option(
        7 * 86400.0, _seconds, "seconds a tag may be served stale while the upstream fails"
    )
    auth_ttl: float = _option(
        300.0, _seconds, "seconds an upstream-accepted credential may read cached objects"
    )
    public_ttl: float = _option(86400.0, _seconds, "seconds a repository is known public")
    finish_abandoned: bool = _option(True, _bool, "finish a fill when its last reader leaves")
    share_across_registries: bool = _option(
        False, _bool, "serve a blob cached from one registry for another's repositories"
    )
    backend: str = _option("disk", _choice("disk", "s3"), "where blobs live: disk or s3")
    s3: S3Config = field(default_factory=S3Config)  # [cache.s3], its own section


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """HTTPS with an ACME certificate (`domains`) or one you bring (`cert_file`)."""

    domains: tuple[str, ...] = _option((), _domains, "names to get an ACME certificate for")
    email: str | None = _option(None, _optional_str, "ACME account contact")
    acme_directory: str = _option(LETS_ENCRYPT, _acme_directory, "ACME directory URL or 'staging'")
    challenge: str = _option("http-01", _choice("http-01", "tls-alpn-01"), "ACME challenge type")
    renew_before: float = _option(1 / 3, _fraction, "renew when this much lifetime is left")
    cert_file: Path | None = _option(None, _optional_path, "your own certificate chain (PEM)")
    key_file: Path | None = _option(None, _optional_path, "the key of cert_file (PEM)")
    https_listen: tuple[str, ...] = _option(("0.0.0.0:443",), _listen, "HOST:PORT for HTTPS")
    http_listen: tuple[str, ...] = _option(
        ("0.0.0.0:80",), _listen, "HOST:PORT for ACME and redirects"
    )
    acme_ca_bundle: Path | None = _option(None, _existing_file, "CA file for the ACME API")
    eab_kid: str | None = _option(None, _optional_str, "External Account Binding key id")
    eab_hmac_key: Secret | None = _option(None, _optional_secret, "EAB HMAC key (base64url)")

    @property
    def enabled(self) -> bool:
        return bool(self.domains) or self.cert_file is not None

    @property
    def acme(self) -> bool:
        """Certificates come from the ACME CA (not from `cert_file`)."""
        return self.cert_file is None and bool(self.domains)


@dataclass(frozen=True, slots=True, kw_only=True)
class UiConfig:
    landing_page: bool = _option(True, _bool, "serve the landing page at / (else 404)")


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadConfig:
    enabled: bool = _option(True, _bool, "serve images as tar files at /download (else 404)")
    max_images: int = _option(8, _count, "images one download may hold")
    max_bytes: int = _option(20 * 1024**3, _size, "largest tar a download may be (0: no limit)")
    downloads_per_client: int = _option(
        2, _limit, "downloads one client (IP, IPv6 /N) may run at once (0: no limit)"
    )
    held_bytes: int = _option(
        64 * 1024**2,
        _held_bytes,
        "manifest and config bytes all downloads may hold at once (0: no limit)",
    )


# Scanners that have no business on a registry relay (searched case-insensitively).
DEFAULT_DENY_USER_AGENTS = ("zgrab", "masscan", "nikto", "sqlmap", "nmap scripting engine")


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessConfig:
    allow_ips: tuple[Network, ...] = _option((), _networks, "client networks served (empty: all)")
    deny_ips: tuple[Network, ...] = _option((), _networks, "client networks refused")
    deny_user_agents: tuple[str, ...] = _option(
        DEFAULT_DENY_USER_AGENTS, _regexes, "User-Agent patterns refused"
    )
    allow_private_redirects: bool = _option(False, _bool, "let redirects reach private addresses")
    redirect_allow: tuple[str, ...] = _option(
        (), _redirect_allow, "networks or origins redirects may reach although private"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    enabled: bool = _option(False, _bool, "require client credentials")
    users: tuple[Secret, ...] = _option((), _users, "USER:BCRYPT-HASH entries")
    users_file: Path | None = _option(None, _optional_path, "htpasswd file (bcrypt)")
    pull_tokens: tuple[Secret, ...] = _option(
        (), _pull_tokens, "static pull tokens (at least 20 characters each)"
    )
    pull_tokens_file: Path | None = _option(
        None, _pull_tokens_file, "file of pull tokens, one a line (at least 20 characters each)"
    )
    service: str = _option("vpsrelay", _str, "service name in the relay's challenge")
    token_ttl: float = _option(300.0, _seconds, "seconds a relay token lives")
    refresh_ttl: float = _option(30 * 86400.0, _seconds, "seconds a refresh token lives")
    password_checks: int = _option(
        1, _count, "password (bcrypt) checks at once; a few more wait, the rest get 429"
    )
    failures_before_backoff: int = _option(
        5, _limit, "failed logins per address or user before each one waits"
    )
    max_backoff: float = _option(60.0, _seconds, "longest wait after failed logins, seconds")
    guesses_per_minute: int = _option(
        10, _count, "password checks a minute, in turn, for a user that failed that often"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    requests_per_second: float = _option(0.0, _non_negative, "per client IP (0: no limit)")
    burst: int = _option(100, _count, "requests a client IP may send at once")
    streams_per_ip: int = _option(0, _limit, "blob downloads at once per client IP")
    ipv6_prefix_length: int = _option(64, _ipv6_prefix, "IPv6 clients share per-IP limits per /N")
    stream_bytes_per_second: int = _option(0, _size, "bandwidth cap per blob download")
    # An HTTP/2 client that never opens its window would otherwise hold its stream, and the
    # upstream connection behind it, for good (HTTP/1.1: server.stall_timeout).
    send_timeout: float = _option(
        60.0, _seconds, "seconds a client may take to accept a piece of a response"
    )
    upstream_streams_per_ip: int = _option(
        32, _limit, "requests per client IP the upstream serves at once (0: no limit)"
    )
    budget_daily: int = _option(0, _size, "bytes served per UTC day, all clients")
    budget_monthly: int = _option(0, _size, "bytes served per UTC month, all clients")
    user_budget_daily: int = _option(0, _size, "bytes served per UTC day per user")
    user_budget_monthly: int = _option(0, _size, "bytes served per UTC month per user")
    # A download holds the budget a few MiB ahead of what it has sent; with this cap, a
    # client that opens many and reads them slowly holds no more than this all together.
    budget_ahead_per_client: int = _option(
        AHEAD_PER_CLIENT, _size,
        "budget one client (IP, IPv6 /N) may hold ahead of what its downloads sent (0: no cap)",
    )  # fmt: skip


DEFAULT_REGISTRIES = BUILTIN_REGISTRIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    data_dir: Path = _option(DEFAULT_DATA_DIR, _path, "where the relay keeps its state")
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ui: UiConfig = field(default_factory=UiConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    registries: tuple[RegistryConfig, ...] = DEFAULT_REGISTRIES

    def registry(self, name: str) -> RegistryConfig:
        for registry in self.registries:
            if registry.name == name:
                return registry
        raise KeyError(name)


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "upstream": UpstreamConfig,
    "log": LogConfig,
    "metrics": MetricsConfig,
    "ui": UiConfig,
    "download": DownloadConfig,
    "tls": TLSConfig,
    "cache": CacheConfig,
    "cache.s3": S3Config,
    "access": AccessConfig,
    "auth": AuthConfig,
    "limits": LimitsConfig,
}
ENV_PREFIX = "VPSRELAY_"
UPSTREAMS_ENV = "VPSRELAY_UPSTREAMS"
# The escape for other programs' variables that happen to start with VPSRELAY_: names or
# shell-style patterns, separated by commas or spaces.
NOT_SETTINGS_ENV = "VPSRELAY_NOT_SETTINGS"
# The project's own `VPSRELAY_*` variables that are not settings. They share the relay's
# environment (a compose `.env`, a systemd EnvironmentFile, a test run), so they are not
# typos. tests/test_config.py checks that every name the repository uses is a setting or
# listed here.
NON_SETTING_VARIABLES = frozenset({
    "VPSRELAY_CONFIG",  # --config
    "VPSRELAY_CHECK_PASSWORD",  # vpsrelay check --password
    "VPSRELAY_SAVE_PASSWORD",  # vpsrelay save --password
    UPSTREAMS_ENV,
    NOT_SETTINGS_ENV,
    # docker-compose.yml, Caddyfile.alt and the Ansible role's .env
    "VPSRELAY_DOMAIN", "VPSRELAY_EMAIL", "VPSRELAY_EXTRA_DOMAINS", "VPSRELAY_UPSTREAM",
    "VPSRELAY_CADDY_GLOBALS", "VPSRELAY_IMAGE", "VPSRELAY_CADDY_IMAGE",
    # the test suite
    "VPSRELAY_REQUIRE_INTEGRATION", "VPSRELAY_CHAOS_SEED", "VPSRELAY_TEST_CACHE",
})  # fmt: skip


def env_name(dotted_key: str) -> str:
    """`server.listen` -> `VPSRELAY_SERVER__LISTEN`."""
    return "VPSRELAY_" + dotted_key.upper().replace(".", "__")


def option_keys() -> list[str]:
    """Every scalar dotted key the config knows, for help and env lookup."""
    keys = [f.name for f in fields(Settings) if "parse" in f.metadata]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in fields(cls) if "parse" in f.metadata]
    return keys


def load(
    path: Path | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
    upstreams: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings.

    Args:
        path: a TOML file, or None for defaults.
        environ: the environment (passed in so tests can give a dict).
        overrides: dotted keys from command-line flags.
        upstreams: `registry name -> URL` from `--upstream` flags.
        flag_names: dotted key -> the flag that set it, for error messages.

    Raises:
        ConfigError: a message naming the source and dotted key.
    """
    raw: dict[str, tuple[object, str]] = {}  # dotted key -> (value, where it came from)
    registry_inputs: RegistryInputs = {}
    if path is not None:
        _read_file(path, raw, registry_inputs)
    _check_variables(environ, registry_inputs)
    for key in option_keys():
        if (name := env_name(key)) in environ:
            raw[key] = (environ[name], name)
    if UPSTREAMS_ENV in environ:
        for name, url in parse_upstreams(environ[UPSTREAMS_ENV].split(","), UPSTREAMS_ENV).items():
            registry_inputs.setdefault(name, {})["url"] = (url, UPSTREAMS_ENV)
    for key, value in (overrides or {}).items():
        flag = (flag_names or {}).get(key) or f"--{key.rpartition('.')[2].replace('_', '-')}"
        raw[key] = (value, flag)
    for name, url in (upstreams or {}).items():
        registry_inputs.setdefault(name, {})["url"] = (url, "--upstream")
    return _build(raw, registry_inputs, environ)


def parse_upstreams(items: list[str], source: str) -> dict[str, str]:
    """`NAME=URL` items (from flags or the environment) to a mapping.

    Raises:
        ConfigError: an item without `=`.
    """
    result = {}
    for item in (i.strip() for i in items):
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"{source}: expected REGISTRY=URL, got {item!r}")
        result[name.strip()] = url.strip()
    return result


def _check_variables(environ: Mapping[str, str], registry_inputs: RegistryInputs) -> None:
    """Refuse a `VPSRELAY_*` variable the relay would not read, as a TOML key is refused.

    Raises:
        ConfigError: naming the variable, with the setting it most likely meant.
    """
    settings = {env_name(key) for key in option_keys()}
    # A registry's `password_env` may name a VPSRELAY_* variable of the operator's choosing.
    password_variables = {
        value
        for keys in registry_inputs.values()
        if isinstance(value := keys.get("password_env", (None, ""))[0], str)
    }
    # ... and so may each entry of its `credentials` list.
    password_variables |= {
        value
        for keys in registry_inputs.values()
        if isinstance(pool := keys.get("credentials", (None, ""))[0], list)
        for entry in pool
        if isinstance(entry, dict) and isinstance(value := entry.get("password_env"), str)
    }
    known = settings | NON_SETTING_VARIABLES | password_variables
    patterns = _not_settings(environ, settings)
    for name in sorted(environ):
        if name in known or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        if name.startswith(ENV_PREFIX):
            raise ConfigError(f"{name}: unknown variable{_variable_hint(name, settings)}")
        if name.upper() in settings:  # the environment is case-sensitive
            raise ConfigError(f"{name}: unknown variable (did you mean {name.upper()!r}?)")


def _not_settings(environ: Mapping[str, str], settings: set[str]) -> list[str]:
    patterns = environ.get(NOT_SETTINGS_ENV, "").replace(",", " ").split()
    for pattern in patterns:
        if not pattern.startswith(ENV_PREFIX):
            raise ConfigError(f"{NOT_SETTINGS_ENV}: expected VPSRELAY_* names, got {pattern!r}")
        if pattern in settings:
            raise ConfigError(
                f"{NOT_SETTINGS_ENV}: {pattern} is a setting; it is read whatever this says"
            )
    return patterns


def _variable_hint(name: str, settings: set[str]) -> str:
    # Compared without the shared prefix, which would make every name look alike.
    # A setting is the likelier intent: a close one first, then a close other variable
    # (UPSTREAMS_ for UPSTREAMS), then a setting only loosely alike (LISTEN for
    # SERVER__LISTEN).
    suffix = name.removeprefix(ENV_PREFIX).lower()
    for candidates, cutoff in ((settings, 0.7), (NON_SETTING_VARIABLES, 0.7), (settings, 0.6)):
        by_suffix = {c.removeprefix(ENV_PREFIX).lower(): c for c in candidates}
        close = difflib.get_close_matches(suffix, by_suffix, n=1, cutoff=cutoff)
        if close:
            return f" (did you mean {by_suffix[close[0]]!r}?)"
    return f" (not a setting; if another program reads it, list it in {NOT_SETTINGS_ENV})"


def _read_file(path: Path, raw: dict[str, tuple[object, str]], registries: RegistryInputs) -> None:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    top_level = [f.name for f in fields(Settings) if "parse" in f.metadata]
    for key, value in document.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key}: expected a table")
            _read_section(path, key, value, raw)
        elif key == "registries":
            _read_registries(path, value, registries)
        elif key in top_level:
            raw[key] = (value, str(path))
        else:
            _unknown(str(path), key, [*top_level, *SECTIONS, "registries"])


def _read_section(
    path: Path, key: str, value: dict[str, object], raw: dict[str, tuple[object, str]]
) -> None:
    """One `[key]` table into `raw`; a table inside it (`[cache.s3]`) is a section too."""
    known = [f.name for f in fields(SECTIONS[key])]
    for sub, sub_value in value.items():
        if sub not in known:
            _unknown(f"{path}", f"{key}.{sub}", known, sub)
        if f"{key}.{sub}" in SECTIONS:
            if not isinstance(sub_value, dict):
                raise ConfigError(f"{path}: {key}.{sub}: expected a table")
            _read_section(path, f"{key}.{sub}", sub_value, raw)
        else:
            raw[f"{key}.{sub}"] = (sub_value, str(path))


def _read_registries(path: Path, value: object, registries: RegistryInputs) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: registries: expected a table of registries")
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: registries.{name}: expected a table")
        for sub, sub_value in table.items():
            if sub not in REGISTRY_KEYS:
                _unknown(str(path), f"registries.{name}.{sub}", list(REGISTRY_KEYS), sub)
            registries.setdefault(name, {})[sub] = (sub_value, str(path))


def _unknown(source: str, key: str, known: list[str], leaf: str | None = None) -> None:
    close = difflib.get_close_matches(leaf or key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{source}: {key}: unknown key{hint}")


def _parse(cls: type[Any], prefix: str, raw: dict[str, tuple[object, str]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in fields(cls):
        key = f"{prefix}{spec.name}"
        if key not in raw or "parse" not in spec.metadata:
            continue
        value, source = raw[key]
        try:
            values[spec.name] = spec.metadata["parse"](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}") from None
    return values


def _build(
    raw: dict[str, tuple[object, str]], registries: RegistryInputs, environ: Mapping[str, str]
) -> Settings:
    sections = {
        name: cls(**_parse(cls, f"{name}.", raw))
        for name, cls in SECTIONS.items()
        if "." not in name
    }
    s3 = S3Config(**_parse(S3Config, "cache.s3.", raw))
    sections["cache"] = replace(sections["cache"], s3=s3)
    _check_tls(sections["tls"], raw)
    _check_s3(sections["cache"], raw)
    return Settings(
        **_parse(Settings, "", raw), **sections, registries=build_registries(registries, environ)
    )


def _check_tls(tls: TLSConfig, raw: dict[str, tuple[object, str]]) -> None:
    """Rules between `[tls]` keys; the message names where the offending key was set."""

    def where(key: str) -> str:
        return raw.get(f"tls.{key}", (None, "config"))[1]

    if (tls.cert_file is None) != (tls.key_file is None):
        key = "cert_file" if tls.cert_file is not None else "key_file"
        other = "key_file" if key == "cert_file" else "cert_file"
        raise ConfigError(f"{where(key)}: tls.{key}: needs tls.{other} too")
    for key in ("cert_file", "key_file"):
        path = getattr(tls, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{where(key)}: tls.{key}: no such file: {str(path)!r}")
    if (tls.eab_kid is None) != (tls.eab_hmac_key is None):
        key = "eab_kid" if tls.eab_kid is not None else "eab_hmac_key"
        other = "eab_hmac_key" if key == "eab_kid" else "eab_kid"
        raise ConfigError(f"{where(key)}: tls.{key}: needs tls.{other} too")


def _check_s3(cache: CacheConfig, raw: dict[str, tuple[object, str]]) -> None:
    """`cache.backend = "s3"` needs a bucket and its credentials; the message names
    where the setting that asked for it came from."""
    if cache.backend != "s3":
        return
    s3 = cache.s3
    where = raw.get("cache.backend", (None, "config"))[1]
    if s3.endpoint is None:
        raise ConfigError(f"{where}: cache.s3.endpoint: needed with cache.backend = 's3'")
    if not s3.bucket:
        raise ConfigError(f"{where}: cache.s3.bucket: needed with cache.backend = 's3'")
    if not s3.access_key:
        raise ConfigError(f"{where}: cache.s3.access_key: needed with cache.backend = 's3'")
    if s3.secret_key is None and s3.secret_key_file is None:
        raise ConfigError(
            f"{where}: cache.s3.secret_key: needed with cache.backend = 's3' "
            "(or cache.s3.secret_key_file, or VPSRELAY_CACHE__S3__SECRET_KEY)"
        )
    if s3.secret_key is not None and s3.secret_key_file is not None:
        key_where = raw.get("cache.s3.secret_key_file", (None, "config"))[1]
        raise ConfigError(
            f"{key_where}: cache.s3.secret_key_file: set secret_key or this, not both"
        )
    if s3.redirect and s3.evict_grace <= s3.redirect_expiry:
        key_where = raw.get("cache.s3.evict_grace", (None, "config"))[1]
        raise ConfigError(
            f"{key_where}: cache.s3.evict_grace: must be longer than cache.s3.redirect_expiry"
        )
    gap = bucketeviction.longest_batch_gap(s3.evict_interval, s3.timeout)
    if s3.evict_grace <= 2 * gap:
        # A node's access record covers a read for half the grace, until its next batch
        # names the object: docs/multinode.md, "Eviction".
        key_where = raw.get("cache.s3.evict_grace", (None, "config"))[1]
        raise ConfigError(
            f"{key_where}: cache.s3.evict_grace: must be more than {2 * gap:g} s, twice "
            "evict_interval + timeout (the most between two access batches)"
        )
    if s3.lease_wait < s3.lease_ttl:
        key_where = raw.get("cache.s3.lease_wait", (None, "config"))[1]
        raise ConfigError(f"{key_where}: cache.s3.lease_wait: must be at least cache.s3.lease_ttl")


def registry_table(settings: Settings) -> RegistryTable:
    """The router's view of the configured registries (the app's, and `/download`'s)."""
    base_domains = list(settings.server.base_domains)
    if settings.server.public_url:
        base_domains.append(urlsplit(settings.server.public_url).hostname or "")
    registries = (Registry(r.name, r.url, r.aliases, r.subdomain) for r in settings.registries)
    return RegistryTable(registries, [d for d in base_domains if d])
