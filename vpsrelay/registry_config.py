"""The registry table of the configuration: built-in registries and the operator's.

`[registries."<name>"]` tables in the TOML file change a built-in registry or add one;
`--upstream NAME=URL` and `VPSRELAY_UPSTREAMS` change only URLs. Credentials may come
from the file itself, a file (`password_file`) or a variable (`password_env`); they are
held in `Secret`, which never prints its value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from vpsrelay.core.access import compile_glob
from vpsrelay.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_SEARCH_URL = "https://index.docker.io"
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
REGISTRY_KEYS = (
    "url", "aliases", "subdomain", "enabled", "username", "password", "password_file",
    "password_env", "search_url", "allow", "deny", "credentials", "proxy", "address_family",
)  # fmt: skip
CREDENTIAL_KEYS = ("username", "password", "password_file", "password_env")
PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
ADDRESS_FAMILIES = ("ipv4", "ipv6", "both")


class Secret:
    """A credential: compares and hashes by value, prints as `***`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Credential:
    """One of the operator's accounts at a registry."""

    username: str
    password: Secret


@dataclass(frozen=True, slots=True, kw_only=True)
class Proxy:
    """An outbound proxy: its URL without credentials (shown), and the credentials (secret)."""

    url: str  # scheme://host:port
    username: Secret | None = None
    password: Secret | None = None

    @property
    def scheme(self) -> str:
        return self.url.partition("://")[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    name: str
    url: str
    aliases: tuple[str, ...] = ()
    subdomain: str | None = None
    enabled: bool = True
    username: str | None = None
    password: Secret | None = None
    search_url: str | None = None
    allow: tuple[str, ...] = ()  # repository globs (upstream names: `library/*`)
    deny: tuple[str, ...] = ()
    # More of the operator's accounts (`credentials = [{...}, ...]`): the pool.
    pool: tuple[Credential, ...] = ()
    proxy: Proxy | None = None  # every connection to it (and its redirects) goes through this
    # "ipv4" or "ipv6": connect over that family only; "both"; None: `upstream.prefer_ipv4`.
    address_family: str | None = None

    @property
    def has_credentials(self) -> bool:
        return bool(self.credentials)

    @property
    def credentials(self) -> tuple[Credential, ...]:
        """Every operator credential: the single `username`/`password` first, then the list."""
        single = (
            (Credential(self.username, self.password),)
            if self.username is not None and self.password is not None
            else ()
        )
        return single + self.pool


def _builtin(name: str, url: str, subdomain: str, *aliases: str) -> RegistryConfig:
    return RegistryConfig(name=name, url=url, subdomain=subdomain, aliases=aliases)


BUILTIN_REGISTRIES = (
    replace(
        _builtin("docker.io", DOCKER_HUB_URL, "docker", "docker", "registry-1.docker.io",
                 "index.docker.io"),
        search_url=DOCKER_HUB_SEARCH_URL,
    ),
    _builtin("ghcr.io", "https://ghcr.io", "ghcr", "ghcr"),
    _builtin("quay.io", "https://quay.io", "quay", "quay"),
    _builtin("gcr.io", "https://gcr.io", "gcr", "gcr"),
    _builtin("registry.k8s.io", "https://registry.k8s.io", "k8s", "k8s", "k8s.gcr.io"),
    _builtin("mcr.microsoft.com", "https://mcr.microsoft.com", "mcr", "mcr"),
    _builtin("nvcr.io", "https://nvcr.io", "nvcr", "nvcr"),
    _builtin("public.ecr.aws", "https://public.ecr.aws", "ecr", "ecr"),
    _builtin("docker.elastic.co", "https://docker.elastic.co", "elastic", "elastic"),
    _builtin("registry.gitlab.com", "https://registry.gitlab.com", "gitlab", "gitlab"),
)  # fmt: skip

# name -> key -> (value, where it came from)
RegistryInputs = dict[str, dict[str, tuple[object, str]]]


def build_registries(
    inputs: RegistryInputs, environ: Mapping[str, str]
) -> tuple[RegistryConfig, ...]:
    """The enabled registries: built-ins changed by `inputs`, then the operator's own.

    Raises:
        ConfigError: naming the source and `registries.<name>.<key>`.
    """
    registries = {r.name: r for r in BUILTIN_REGISTRIES}
    for name, keys in inputs.items():
        base = registries.get(name)
        if base is None:
            if "url" not in keys:
                source = next(iter(keys.values()))[1] if keys else "config"
                raise ConfigError(f"{source}: registries.{name}.url: a new registry needs a url")
            base = RegistryConfig(name=name, url="https://invalid")
        registries[name] = _apply(base, name, keys, environ)
    enabled = tuple(r for r in registries.values() if r.enabled)
    _check_unique(enabled, inputs)
    return enabled


def _apply(
    base: RegistryConfig, name: str, keys: dict[str, tuple[object, str]], environ: Mapping[str, str]
) -> RegistryConfig:
    changes: dict[str, object] = {}
    secrets = [k for k in ("password", "password_file", "password_env") if k in keys]
    if len(secrets) > 1:
        source = keys[secrets[1]][1]
        raise ConfigError(f"{source}: registries.{name}: set only one of {', '.join(secrets)}")
    for key, (value, source) in keys.items():
        where = f"{source}: registries.{name}.{key}"
        try:
            if key == "url":
                changes["url"] = parse_http_url(value)
            elif key == "search_url":
                changes["search_url"] = parse_http_url(value)
            elif key == "aliases":
                changes["aliases"] = _aliases(value)
            elif key == "subdomain":
                changes["subdomain"] = _subdomain(value)
            elif key == "enabled":
                if not isinstance(value, bool):
                    raise ValueError(f"expected true or false, got {value!r}")
                changes["enabled"] = value
            elif key in ("allow", "deny"):
                changes[key] = _globs(value)
            elif key == "username":
                changes["username"] = _text(value)
            elif key == "password":
                changes["password"] = Secret(_secret_text(value))
            elif key == "password_file":
                changes["password"] = Secret(_read_secret_file(_text(value)))
            elif key == "password_env":
                changes["password"] = Secret(_password_from_env(value, environ))
            elif key == "credentials":
                changes["pool"] = _credentials(where, value, environ)
            elif key == "proxy":
                changes["proxy"] = parse_proxy(value)
            elif key == "address_family":
                if value not in ADDRESS_FAMILIES:
                    choices = ", ".join(ADDRESS_FAMILIES)
                    raise ValueError(f"expected one of {choices}, got {value!r}")
                changes["address_family"] = value
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    result = replace(base, **changes)  # type: ignore[arg-type]
    if (result.username is None) != (result.password is None):
        source = next(iter(keys.values()))[1]
        raise ConfigError(f"{source}: registries.{name}: username and password go together")
    names = [credential.username for credential in result.credentials]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        source = keys["credentials"][1] if "credentials" in keys else "config"
        raise ConfigError(
            f"{source}: registries.{name}.credentials: username {twice!r} is listed twice"
        )
    return result


def _password_from_env(value: object, environ: Mapping[str, str]) -> str:
    variable = _text(value)
    if variable not in environ:
        raise ValueError(f"environment variable {variable!r} is not set")
    return environ[variable]


def _credentials(where: str, value: object, environ: Mapping[str, str]) -> tuple[Credential, ...]:
    """`credentials = [{username = "a", password_file = "..."}, ...]`: the pool.

    Raises:
        ConfigError: naming `credentials[i].key` (never quoting a secret).
    """
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of tables (username, password...)")
    pool = []
    for i, entry in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{here}: expected a table with username and a password setting")
        for key in entry:
            if key not in CREDENTIAL_KEYS:
                raise ConfigError(
                    f"{here}.{key}: unknown key (expected one of {', '.join(CREDENTIAL_KEYS)})"
                )
        secrets = [k for k in CREDENTIAL_KEYS[1:] if k in entry]
        if len(secrets) != 1:
            raise ConfigError(f"{here}: set exactly one of password, password_file, password_env")
        if "username" not in entry:
            raise ConfigError(f"{here}.username: missing")
        key = secrets[0]
        try:
            username = _text(entry["username"])
        except ValueError as exc:
            raise ConfigError(f"{here}.username: {exc}") from None
        try:
            if key == "password":
                password = _secret_text(entry[key])
            elif key == "password_file":
                password = _read_secret_file(_text(entry[key]))
            else:
                password = _password_from_env(entry[key], environ)
        except ValueError as exc:
            raise ConfigError(f"{here}.{key}: {exc}") from None
        pool.append(Credential(username, Secret(password)))
    return tuple(pool)


def _check_unique(registries: tuple[RegistryConfig, ...], inputs: RegistryInputs) -> None:
    """Names, aliases and subdomains must each select one registry."""

    def source(name: str) -> str:
        keys = inputs.get(name) or {}
        return next(iter(keys.values()))[1] if keys else "built-in registries"

    seen: dict[str, str] = {}
    labels: dict[str, str] = {}
    # The operator's registries come last, so a clash is reported against their entry.
    for registry in registries:
        for key in (registry.name, *registry.aliases):
            other = seen.setdefault(key.lower(), registry.name)
            if other != registry.name:
                where = f"{source(registry.name)}: registries.{registry.name}"
                raise ConfigError(f"{where}: alias {key!r} already names {other}")
        if registry.subdomain:
            other = labels.setdefault(registry.subdomain, registry.name)
            if other != registry.name:
                where = f"{source(registry.name)}: registries.{registry.name}.subdomain"
                raise ConfigError(f"{where}: {registry.subdomain!r} already names {other}")


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _secret_text(value: object) -> str:
    """`_text` for a secret: the error never quotes the value (it goes to logs)."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string (the value is not shown: it is a secret)")
    return value


def parse_http_url(value: object) -> str:
    """An absolute http(s) URL without a trailing slash, or ValueError.

    A URL with user information (`https://user:pass@host`) is refused, and not quoted:
    the URL is shown by `config show` and in logs, so credentials go in their own
    (secret) settings.
    """
    text = _text(value).rstrip("/")
    try:
        parts = urlsplit(text)
        has_user_info = "@" in parts.netloc
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a port that is no number)
    except ValueError:
        has_user_info = "@" in text
        valid = False
    if has_user_info:
        raise ValueError(
            "a URL with user information (user:password@) is refused (the value is not "
            "shown); set username and password (or password_file, password_env) instead"
        )
    if not valid:
        raise ValueError(f"expected an absolute http(s) URL, got {text!r}")
    return text


def parse_proxy(value: object) -> Proxy | None:
    """`scheme://[user:password@]host:port` (http, https, socks5, socks5h); "" for none.

    Errors never quote the value: it may hold the proxy's password.
    """
    if value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a proxy URL string (the value is not shown)")
    try:
        parts = urlsplit(value)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("not a URL the relay can use (the value is not shown)") from None
    if parts.scheme not in PROXY_SCHEMES:
        raise ValueError(
            f"expected a {', '.join(PROXY_SCHEMES)} URL (scheme://host:port; the value is "
            "not shown)"
        )
    if not host or port is None:
        raise ValueError("expected scheme://host:port, with the port (the value is not shown)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, query or fragment (the value is not shown)")
    shown_host = f"[{host}]" if ":" in host else host
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise ValueError("a proxy password needs a user name (the value is not shown)")
    return Proxy(
        url=f"{parts.scheme}://{shown_host}:{port}",
        username=Secret(username) if username else None,
        password=Secret(password or "") if username else None,
    )


def _aliases(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of names, got {value!r}")
    if any("/" in v for v in value):
        raise ValueError("an alias is one path segment, without '/'")
    return tuple(value)


def _globs(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of repository globs, got {value!r}")
    for pattern in value:
        compile_glob(pattern)
    return tuple(value)


def _subdomain(value: object) -> str | None:
    text = value if isinstance(value, str) else None
    if text == "":
        return None
    if text is None or _LABEL.fullmatch(text) is None:
        raise ValueError(f"expected one DNS label (a-z, 0-9, -), got {value!r}")
    return text


def _read_secret_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
