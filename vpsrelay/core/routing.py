"""Request routing: `(method, path, host, ns)` to what the client asked for, or a refusal.

A mirror is read-only: only GET and HEAD reach the registry API (and POST the
token endpoint, for the OAuth2 refresh-token flow). Names, tags and digests are
validated here, so nothing malformed is ever sent upstream. Which registry a
request is for is `core.registries`' decision. Docker Hub's official images live
under `library/`: `alpine` is `library/alpine` there.
"""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from vpsrelay.core import grammar
from vpsrelay.core.digest import Digest
from vpsrelay.core.registries import DOCKER_HUB, Registry, RegistryTable
from vpsrelay.errors import ManifestUnknown, NameInvalid, NotFound, Unsupported

READ_METHODS = frozenset({"GET", "HEAD"})
TOKEN_METHODS = frozenset({"GET", "POST"})


class Kind(enum.StrEnum):
    BASE = "base"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"
    TOKEN = "token"
    SEARCH = "search"
    DOWNLOAD = "download"  # an image as a tar file (`vpsrelay.download`)


@dataclass(frozen=True, slots=True)
class Route:
    """What a request is for. `name` is the client's, `upstream_name` the upstream's."""

    kind: Kind
    registry: str = DOCKER_HUB  # "" on a token route: the token endpoint decides from the scopes
    name: str = ""
    upstream_name: str = ""
    reference: str = ""

    @property
    def upstream_path(self) -> str:
        """The registry API path to ask the upstream for."""
        match self.kind:
            case Kind.BASE:
                return "/v2/"
            case Kind.MANIFEST:
                return f"/v2/{self.upstream_name}/manifests/{self.reference}"
            case Kind.BLOB:
                return f"/v2/{self.upstream_name}/blobs/{self.reference}"
            case Kind.TAGS:
                return f"/v2/{self.upstream_name}/tags/list"
            case Kind.REFERRERS:
                return f"/v2/{self.upstream_name}/referrers/{self.reference}"
            case Kind.TOKEN | Kind.DOWNLOAD:
                return ""
            case Kind.SEARCH:
                return "/v1/search"
            case _:  # pragma: no cover
                typing.assert_never(self.kind)

    @property
    def reference_is_digest(self) -> bool:
        return ":" in self.reference


# The name may hold slashes, so the operation is what follows the *last* marker.
_OBJECT_PATH = re.compile(r"/v2/(?P<name>.+)/(?P<op>manifests|blobs|referrers)/(?P<ref>[^/]+)")
# A reference with a slash in it (`sha256:../x`) is malformed, not another endpoint.
_BAD_OBJECT_PATH = re.compile(r"/v2/(?P<name>.+?)/(?P<op>manifests|blobs|referrers)/(?P<ref>.+)")
_TAGS_PATH = re.compile(r"/v2/(?P<name>.+)/tags/list")
_UPLOADS_PATH = re.compile(r"/v2/.+/blobs/uploads(?:/.*)?")
_TOKEN_PATH = re.compile(r"/token(?:/(?P<registry>[^/]+))?")


def to_upstream_name(registry: str, name: str) -> str:
    """The upstream's name for `name`: Docker Hub's official images gain `library/`.

    Raises:
        NameInvalid: `name` is not a valid repository name.
    """
    if not grammar.is_valid_name(name):
        raise NameInvalid(f"invalid repository name: {name!r}")
    if registry == DOCKER_HUB and "/" not in name:
        return f"library/{name}"
    return name


# Docker Hub alone: the table when none is given (and what the core's unit tests use).
HUB_ONLY = RegistryTable([Registry(DOCKER_HUB, "https://registry-1.docker.io")])


def route(
    method: str,
    path: str,
    *,
    table: RegistryTable = HUB_ONLY,
    host: str = "",
    ns: str | None = None,
) -> Route:
    """Decide what a request is for.

    Args:
        method: the request method, upper case.
        path: the decoded request path, without the query.
        table: the configured registries.
        host: the Host the client used (subdomain routing).
        ns: containerd's `ns` query parameter, if any.

    Returns:
        The route, with the registry chosen and names validated and mapped to the upstream's.

    Raises:
        Unsupported: a method a read-only mirror refuses (405).
        NotFound: a path that is no registry API the relay serves (404).
        NameUnknown: a registry the relay does not serve (404).
        NameInvalid, DigestInvalid: a malformed name or digest (400).
        ManifestUnknown: a malformed tag, which can name no manifest (404).
    """
    if token := _TOKEN_PATH.fullmatch(path):
        if method not in TOKEN_METHODS:
            raise Unsupported(f"{method} is not supported on /token")
        explicit = token["registry"]
        registry = _chosen(table, host, ns) if explicit is None else table.by_ns(explicit).name
        return Route(Kind.TOKEN, registry or "")
    if path == "/download" or path.startswith("/download/"):
        if method not in READ_METHODS:
            raise Unsupported(f"{method} is not supported on /download")
        return Route(Kind.DOWNLOAD, "")
    if path == "/v1/search":  # Docker Hub's search, which NAS registry UIs use
        if method not in READ_METHODS:
            raise Unsupported(f"{method} is not supported on /v1/search")
        if table.default is None:
            raise NotFound("Docker Hub is disabled on this relay")
        return Route(Kind.SEARCH, table.default.name)
    if not (path == "/v2" or path.startswith("/v2/")):
        raise NotFound(f"no such endpoint: {path!r}")
    if method not in READ_METHODS:
        raise Unsupported(f"this registry mirror is read-only: {method} is not supported")
    if path in ("/v2", "/v2/"):
        chosen = _chosen(table, host, ns)
        if chosen is None:
            if table.default is None:
                raise NotFound("Docker Hub is disabled on this relay")
            chosen = table.default.name
        return Route(Kind.BASE, chosen)
    if _UPLOADS_PATH.fullmatch(path):
        raise Unsupported("this registry mirror is read-only: uploads are not supported")
    if found := (_OBJECT_PATH.fullmatch(path) or _BAD_OBJECT_PATH.fullmatch(path)):
        op, reference = found["op"], found["ref"]
        kind = {"manifests": Kind.MANIFEST, "blobs": Kind.BLOB, "referrers": Kind.REFERRERS}[op]
        _check_reference(kind, reference)
        return _named(table, host, ns, kind, found["name"], reference)
    if found := _TAGS_PATH.fullmatch(path):
        return _named(table, host, ns, Kind.TAGS, found["name"], "")
    raise NotFound(f"no such endpoint: {path!r}")


def _chosen(table: RegistryTable, host: str, ns: str | None) -> str | None:
    """The registry named by `ns` or by the Host, if either names one."""
    if ns:
        return table.by_ns(ns).name
    registry = table.by_host(host) if host else None
    return registry.name if registry is not None else None


def _named(
    table: RegistryTable, host: str, ns: str | None, kind: Kind, name: str, reference: str
) -> Route:
    if not grammar.is_valid_name(name):
        raise NameInvalid(f"invalid repository name: {name!r}")
    chosen = _chosen(table, host, ns)
    if chosen is not None:
        registry, within = chosen, name
    else:
        selection = table.by_path(name)
        registry, within = selection.registry.name, selection.name
    return Route(kind, registry, name, to_upstream_name(registry, within), reference)


def _check_reference(kind: Kind, reference: str) -> None:
    if kind is Kind.MANIFEST and ":" not in reference:
        if not grammar.is_valid_tag(reference):
            # distribution-spec: a manifest that does not exist is 404 MANIFEST_UNKNOWN,
            # and a malformed tag names one that can never exist (no upstream is asked).
            raise ManifestUnknown(f"no such manifest: {reference!r} is not a valid tag")
    else:
        Digest.parse(reference)  # also refuses algorithms the relay cannot verify


# The query parameters each kind passes upstream (`ns` and anything else stay here).
_PASSED_QUERY = {
    Kind.TAGS: frozenset({"n", "last"}),
    Kind.REFERRERS: frozenset({"artifactType"}),
    Kind.SEARCH: frozenset({"q", "n", "page"}),
}


def upstream_query(query: str, kind: Kind) -> str:
    """The query passed upstream: pagination, referrer filters and search terms only."""
    allowed = _PASSED_QUERY.get(kind)
    if not allowed:
        return ""
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in allowed])


def relay_realm(base_url: str, registry: str) -> str:
    """The relay's token endpoint for `registry` (Docker Hub keeps the plain `/token`)."""
    if registry == DOCKER_HUB:
        return f"{base_url}/token"
    return f"{base_url}/token/{registry}"
