"""Client configuration for one relay: dockerd, containerd, k3s, podman, NAS.

Generated for the relay's public URL and the registries it serves, so the landing
page and `vpsrelay snippets` print text a user can paste as it is. containerd
and k3s (containerd inside) send `?ns=<registry>` to a mirror, so one relay host
serves every registry for them. dockerd mirrors only Docker Hub: other registries are
pulled by name through the relay's path prefixes; podman gets a mirror per registry,
at the relay's path prefix for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

DOCKER_HUB = "docker.io"
FORMATS = ("docker", "containerd", "k3s", "podman", "nas")


@dataclass(frozen=True, slots=True)
class Snippet:
    """One piece of configuration: where it goes and what it says."""

    format: str  # one of FORMATS
    key: str  # stable id, e.g. "daemon-json"
    title: str
    path: str  # file it goes in, or "" for commands
    language: str  # json, toml, yaml, sh, text
    text: str


@dataclass(frozen=True, slots=True)
class Target:
    """What the snippets are generated for."""

    url: str  # the relay's public base URL, no trailing slash
    registries: tuple[str, ...] = (DOCKER_HUB,)
    login_required: bool = False

    @property
    def host(self) -> str:
        """`host[:port]` as clients name the relay in image references."""
        return urlsplit(self.url).netloc

    @property
    def insecure(self) -> bool:
        return urlsplit(self.url).scheme == "http"


def docker(target: Target) -> list[Snippet]:
    daemon: dict[str, list[str]] = {"registry-mirrors": [target.url]}
    if target.insecure:
        daemon["insecure-registries"] = [target.host]
    commands = [
        "sudo systemctl restart docker",
        "docker pull alpine                       # through the mirror",
        f"docker pull {target.host}/alpine          # through the relay by name",
        f"docker pull {target.host}/library/nginx:stable",
        *(
            f"docker pull {target.host}/{name}/OWNER/IMAGE:TAG"
            for name in target.registries
            if name != DOCKER_HUB
        ),
    ]
    if target.login_required:
        commands.insert(1, f"docker login {target.host}")
    return [
        Snippet(
            "docker",
            "daemon-json",
            "dockerd: make the relay Docker Hub's mirror",
            "/etc/docker/daemon.json",
            "json",
            json.dumps(daemon, indent=2) + "\n",
        ),
        Snippet(
            "docker",
            "docker-pull",
            "then restart dockerd and pull",
            "",
            "sh",
            "\n".join(commands) + "\n",
        ),
    ]


def _host_block(target: Target) -> str:
    lines = [f'[host."{target.url}"]', '  capabilities = ["pull", "resolve"]']
    if target.insecure:
        lines.append("  skip_verify = true")
    return "\n".join(lines) + "\n"


def containerd(target: Target) -> list[Snippet]:
    hub = (
        "# containerd adds ?ns=docker.io, so the relay knows the registry\n"
        'server = "https://registry-1.docker.io"\n\n' + _host_block(target)
    )
    default = (
        "# every other registry: containerd sends ?ns=<registry>; the relay serves\n"
        f"# {', '.join(target.registries)}; for others the pull falls back to the registry\n"
        + _host_block(target)
    )
    config = (
        "# containerd 1.x: /etc/containerd/config.toml\n"
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        '  config_path = "/etc/containerd/certs.d"\n'
    )
    return [
        Snippet(
            "containerd",
            "containerd-hub",
            "containerd: Docker Hub through the relay",
            "/etc/containerd/certs.d/docker.io/hosts.toml",
            "toml",
            hub,
        ),
        Snippet(
            "containerd",
            "containerd-default",
            "containerd: every registry through the relay",
            "/etc/containerd/certs.d/_default/hosts.toml",
            "toml",
            default,
        ),
        Snippet(
            "containerd",
            "containerd-config",
            "containerd: read the hosts.toml files (CRI plugin)",
            "/etc/containerd/config.toml",
            "toml",
            config,
        ),
    ]


def k3s(target: Target) -> list[Snippet]:
    lines = ["mirrors:"]
    for registry in target.registries:
        lines += [f'  "{registry}":', "    endpoint:", f'      - "{target.url}"']
    if target.login_required or target.insecure:
        lines += ["configs:", f'  "{target.host}":']
        if target.login_required:
            lines += ["    auth:", '      username: "YOUR-USER"', '      password: "YOUR-PASSWORD"']
        if target.insecure:
            lines += ["    tls:", "      insecure_skip_verify: true"]
    return [
        Snippet(
            "k3s",
            "k3s-registries",
            "k3s / RKE2: mirror the registries (then restart k3s)",
            "/etc/rancher/k3s/registries.yaml",
            "yaml",
            "\n".join(lines) + "\n",
        )
    ]


def podman(target: Target) -> list[Snippet]:
    blocks = []
    for name in target.registries:
        real = "registry-1.docker.io" if name == DOCKER_HUB else name
        mirror = target.host if name == DOCKER_HUB else f"{target.host}/{name}"
        block = (
            "[[registry]]\n"
            f'prefix = "{name}"\n'
            f'location = "{real}"\n\n'
            "[[registry.mirror]]\n"
            f'location = "{mirror}"\n'
        )
        if target.insecure:
            block += "insecure = true\n"
        blocks.append(block)
    text = "\n".join(blocks)
    commands = "podman pull docker.io/library/alpine\n"
    if target.login_required:
        commands = f"podman login {target.host}\n" + commands
    return [
        Snippet(
            "podman",
            "podman-registries",
            "podman / skopeo / CRI-O: every registry through the relay",
            "/etc/containers/registries.conf.d/vpsrelay.conf",
            "toml",
            text,
        ),
        Snippet("podman", "podman-pull", "then pull", "", "sh", commands),
    ]


def nas(target: Target) -> list[Snippet]:
    login = (
        "  Tick 'Login information' and enter your relay user and password.\n"
        if target.login_required
        else ""
    )
    synology = (
        "Container Manager (DSM 7.2) or Docker (DSM 7.0/7.1):\n"
        "  Registry > Settings > select 'Docker Hub' > Edit\n"
        "  Tick 'Enable registry mirror', add:\n"
        f"    {target.url}\n" + login + "  Save; search and download images as usual.\n"
    )
    qnap = (
        "Container Station 3:\n"
        "  Settings (gear) > Registry > Docker Hub registry mirror > Add, or\n"
        "  Images > Pull > Advanced mode > Registry > Add registry:\n"
        f"    URL {target.url}\n" + login + "  Then pull images from that registry.\n"
    )
    return [
        Snippet("nas", "nas-synology", "Synology NAS", "", "text", synology),
        Snippet("nas", "nas-qnap", "QNAP NAS", "", "text", qnap),
    ]


_BUILDERS = {"docker": docker, "containerd": containerd, "k3s": k3s, "podman": podman, "nas": nas}


def snippets(target: Target, formats: tuple[str, ...] = FORMATS) -> list[Snippet]:
    """Every snippet for `target`, in the order of `formats`.

    Raises:
        KeyError: a format not in FORMATS.
    """
    result: list[Snippet] = []
    for name in formats:
        result += _BUILDERS[name](target)
    return result


def as_text(items: list[Snippet]) -> str:
    """The snippets for a terminal: a commented heading, then the text."""
    parts = []
    for item in items:
        where = f" ({item.path})" if item.path else ""
        parts.append(f"# --- {item.title}{where}\n{item.text}")
    return "\n".join(parts)
