"""Registry selection: subdomain, ns, path prefix; closed world."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import routing
from vpsrelay.core.registries import Registry, RegistryTable
from vpsrelay.core.routing import Kind, Route
from vpsrelay.errors import NameUnknown, NotFound, RelayError, Unsupported

HUB = Registry("docker.io", "https://hub.test", ("docker", "index.docker.io"), "docker")
GHCR = Registry("ghcr.io", "https://ghcr.test", ("ghcr",), "ghcr")
K8S = Registry("registry.k8s.io", "https://k8s.test", ("k8s", "k8s.gcr.io"), "k8s")
TABLE = RegistryTable([HUB, GHCR, K8S], base_domains=["relay.example", "Mirror.Example."])


@pytest.mark.parametrize(
    ("name", "registry", "within"),
    [
        ("alpine", "docker.io", "alpine"),
        ("someuser/tool", "docker.io", "someuser/tool"),
        ("ghcr.io/owner/app", "ghcr.io", "owner/app"),
        ("ghcr/owner/app", "ghcr.io", "owner/app"),
        ("GHCR/owner/app", "ghcr.io", "owner/app"),
        ("k8s.gcr.io/pause", "registry.k8s.io", "pause"),
        ("docker.io/library/alpine", "docker.io", "library/alpine"),
        ("ghcr", "docker.io", "ghcr"),  # one segment: a Docker Hub official image
    ],
)
def test_by_path(name: str, registry: str, within: str) -> None:
    selection = TABLE.by_path(name)
    assert (selection.registry.name, selection.name) == (registry, within)


@pytest.mark.parametrize("name", ["evil.example/x", "localhost/x", "127.0.0.1/x", "a:5000/x"])
def test_unknown_registry_prefix_is_refused(name: str) -> None:
    with pytest.raises(NameUnknown):
        TABLE.by_path(name)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("ghcr.relay.example", "ghcr.io"),
        ("ghcr.relay.example:8443", "ghcr.io"),
        ("K8S.mirror.example", "registry.k8s.io"),
        ("docker.relay.example.", "docker.io"),
        ("relay.example", None),
        ("ghcr.elsewhere.example", None),  # not under a base domain: not a registry label
        ("127.0.0.1:5000", None),
        ("[::1]:5000", None),
    ],
)
def test_by_host(host: str, expected: str | None) -> None:
    found = TABLE.by_host(host)
    assert (found.name if found else None) == expected


def test_unknown_subdomain_is_refused() -> None:
    with pytest.raises(NameUnknown):
        TABLE.by_host("nope.relay.example")


def test_ns_is_closed_world() -> None:
    assert TABLE.by_ns("ghcr.io") is GHCR
    assert TABLE.by_ns("k8s.gcr.io") is K8S
    for ns in ("quay.io", "127.0.0.1:5000", "evil.example"):
        with pytest.raises(NameUnknown):
            TABLE.by_ns(ns)


def test_without_docker_hub_names_need_a_prefix() -> None:
    table = RegistryTable([GHCR])
    assert table.by_path("ghcr/owner/app").registry is GHCR
    with pytest.raises(NameUnknown):
        table.by_path("alpine")
    with pytest.raises(NotFound):
        routing.route("GET", "/v2/", table=table)


@pytest.mark.parametrize(
    ("path", "host", "ns", "expected"),
    [
        ("/v2/ghcr/owner/app/manifests/1.0", "", None,
         Route(Kind.MANIFEST, "ghcr.io", "ghcr/owner/app", "owner/app", "1.0")),
        ("/v2/owner/app/manifests/1.0", "ghcr.relay.example", None,
         Route(Kind.MANIFEST, "ghcr.io", "owner/app", "owner/app", "1.0")),
        ("/v2/owner/app/manifests/1.0", "", "ghcr.io",
         Route(Kind.MANIFEST, "ghcr.io", "owner/app", "owner/app", "1.0")),
        ("/v2/library/alpine/manifests/latest", "", "docker.io",
         Route(Kind.MANIFEST, "docker.io", "library/alpine", "library/alpine", "latest")),
        ("/v2/alpine/tags/list", "docker.relay.example", None,
         Route(Kind.TAGS, "docker.io", "alpine", "library/alpine", "")),
        ("/v2/", "ghcr.relay.example", None, Route(Kind.BASE, "ghcr.io")),
        ("/v2/", "", "registry.k8s.io", Route(Kind.BASE, "registry.k8s.io")),
        ("/v2/", "", None, Route(Kind.BASE, "docker.io")),
        ("/token", "", None, Route(Kind.TOKEN, "")),
        ("/token", "ghcr.relay.example", None, Route(Kind.TOKEN, "ghcr.io")),
        ("/token/k8s", "", None, Route(Kind.TOKEN, "registry.k8s.io")),
        ("/v1/search", "", None, Route(Kind.SEARCH, "docker.io")),
    ],
)  # fmt: skip
def test_route_with_table(path: str, host: str, ns: str | None, expected: Route) -> None:
    assert routing.route("GET", path, table=TABLE, host=host, ns=ns) == expected


def test_ns_wins_over_host_and_prefix() -> None:
    route = routing.route(
        "GET", "/v2/ghcr/x/manifests/1", table=TABLE, host="k8s.relay.example", ns="docker.io"
    )
    assert (route.registry, route.upstream_name) == ("docker.io", "ghcr/x")


def test_search_refuses_writes() -> None:
    with pytest.raises(Unsupported):
        routing.route("POST", "/v1/search", table=TABLE)


@given(host=st.text(max_size=60), ns=st.one_of(st.none(), st.text(max_size=30)), path=st.text())
def test_route_never_escapes_the_table(host: str, ns: str | None, path: str) -> None:
    """Whatever the input, the chosen registry is a configured one, or a RelayError is raised."""
    try:
        found = routing.route("GET", "/v2/" + path, table=TABLE, host=host, ns=ns)
    except RelayError:
        return
    assert found.registry in {"docker.io", "ghcr.io", "registry.k8s.io"}
