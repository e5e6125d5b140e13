"""Which upstream registry a request is for.

Three ways to name one, all at once: the Host header's first label under one of the
relay's base domains (`ghcr.relay.example`), containerd's `?ns=` query parameter, and
the first path segment of the repository name (`relay.example/ghcr.io/owner/app` or
the short `relay.example/ghcr/owner/app`). Anything else is Docker Hub.

The lookup is closed-world: only configured registries can be selected; an unknown
`ns`, host label or registry-like prefix is refused (`NAME_UNKNOWN`) and never used
as a host name to connect to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.errors import NameUnknown

if TYPE_CHECKING:
    from collections.abc import Iterable

DOCKER_HUB = "docker.io"


@dataclass(frozen=True, slots=True)
class Registry:
    """One upstream registry as the router sees it."""

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    subdomain: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """Every name a client may use for this registry (lower case)."""
        return (self.name.lower(), *(alias.lower() for alias in self.aliases))

    @property
    def is_docker_hub(self) -> bool:
        return self.name == DOCKER_HUB


@dataclass(frozen=True, slots=True)
class Selection:
    """A registry and the repository name as that registry knows it."""

    registry: Registry
    name: str


def _looks_like_host(segment: str) -> bool:
    # Docker Hub namespaces are [a-z0-9_-] only, so a dot or a colon means a registry host
    # (the same rule the docker CLI uses to split `host/name`).
    return "." in segment or ":" in segment or segment == "localhost"


class RegistryTable:
    """The configured registries and the relay's base domains (for subdomain routing)."""

    def __init__(self, registries: Iterable[Registry], base_domains: Iterable[str] = ()) -> None:
        self.registries = tuple(registries)
        self._by_key: dict[str, Registry] = {}
        self._by_label: dict[str, Registry] = {}
        for registry in self.registries:
            for key in registry.keys:
                self._by_key.setdefault(key, registry)
            if registry.subdomain:
                self._by_label[registry.subdomain.lower()] = registry
        self.base_domains = tuple(sorted({d.lower().strip(".") for d in base_domains}, key=len))
        self.default = self._by_key.get(DOCKER_HUB)

    def get(self, key: str) -> Registry | None:
        """The registry with this name or alias, if configured."""
        return self._by_key.get(key.lower())

    def by_ns(self, ns: str) -> Registry:
        """The registry named by containerd's `ns` parameter.

        Raises:
            NameUnknown: `ns` names no configured registry.
        """
        registry = self.get(ns)
        if registry is None:
            raise NameUnknown(f"this relay does not serve registry {ns!r} (ns parameter)")
        return registry

    def by_host(self, host: str) -> Registry | None:
        """The registry a Host header selects, or None when it selects none.

        Only `<label>.<base domain>` counts, so a relay whose own name happens to start
        with a registry's label is not taken for that registry.

        Raises:
            NameUnknown: a subdomain of a base domain whose label is no registry's.
        """
        hostname = _strip_port(host).lower().rstrip(".")
        for base in self.base_domains:
            if hostname.endswith("." + base):
                label = hostname[: -len(base) - 1]
                registry = self._by_label.get(label)
                if registry is None:
                    raise NameUnknown(f"this relay has no registry at host {hostname!r}")
                return registry
        return None

    def by_path(self, name: str) -> Selection:
        """Split a repository name into registry prefix and name; default Docker Hub.

        Raises:
            NameUnknown: the first segment looks like a registry host but is not configured.
        """
        first, sep, rest = name.partition("/")
        if sep:
            registry = self.get(first)
            if registry is not None:
                return Selection(registry, rest)
            if _looks_like_host(first):
                raise NameUnknown(f"this relay does not serve registry {first!r}")
        if self.default is None:
            raise NameUnknown("Docker Hub is disabled here; prefix the name with a registry")
        return Selection(self.default, name)


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host
