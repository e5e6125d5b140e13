"""A stand-in for a user's VPS: one dockerd, pebble and the images, shared by the deploy tests.

* dockerd runs in its own loopback-only network namespace (``DockerDaemon``). Its ``lo`` also
  carries ``PUBLIC_ADDRESS`` (TEST-NET-1, still only on ``lo``), and its private ``/etc/hosts``
  names ``DOMAIN`` there. dockerd treats 127.0.0.0/8 as insecure and would skip TLS
  verification; for ``DOMAIN`` at a non-loopback address it verifies, against the CA in
  ``certs.d/DOMAIN/ca.crt`` only. ``registry-mirrors`` is ``https://DOMAIN``.
* pebble runs in the root namespace; its directory port is forwarded into the namespace, and
  its VA's HTTP-01/TLS-ALPN-01 ports are forwarded the other way, to ports 80/443 in the
  namespace, where the relay (or Caddy) of a compose stack with host networking listens.
* The images are built once per session: the relay from the shipped Dockerfile, Caddy from
  Debian's ``caddy`` package, both on the debootstrap'd base (no registry is reachable).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tests.infra.binaries import require_binary
from tests.infra.clients import DockerDaemon
from tests.infra.image import build_image, import_base, run_build
from tests.infra.pebble import Pebble, free_port
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    from tests.infra.hub import Hub
    from tests.infra.oci import BuiltImage

DOMAIN = "relay.test"
# Not loopback, so dockerd verifies TLS for DOMAIN; it exists only on the namespace's lo.
PUBLIC_ADDRESS = "192.0.2.10"
# Where containers see DeployHost.trust_dir().
TRUST = "/run/test-trust"
RELAY_IMAGE = "vpsrelay:test"
CADDY_IMAGE = "vpsrelay-caddy:test"
_CADDY_DOCKERFILE = """\
# Caddy from Debian's package on the test base image (the official caddy:2 image's layout).
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY caddy.deb /tmp/caddy.deb
RUN set -eu; dpkg-deb -x /tmp/caddy.deb /tmp/caddy; \\
    install -m 0755 /tmp/caddy/usr/bin/caddy /usr/bin/caddy; \\
    rm -rf /tmp/caddy /tmp/caddy.deb; mkdir -p /config /data /etc/caddy; caddy version
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
EXPOSE 80 443
WORKDIR /srv
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
"""


class _OverlayDockerDaemon(DockerDaemon):
    """``DockerDaemon`` on overlay2: vfs copies the whole root filesystem for every layer and
    every container, which made one image build take minutes (here: 260 s against 60 s)."""

    def _config(self) -> dict[str, object]:
        return {**super()._config(), "storage-driver": "overlay2"}


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1].split("/", 1)[0])


class _InwardForward:
    """Root-namespace 127.0.0.1:outer -> 127.0.0.1:inner in a network namespace (socat pair
    through a unix socket, which crosses namespaces)."""

    def __init__(self, netns: str, outer: int, inner: int, rundir: Path, log: Path) -> None:
        socat, nsenter = require_binary("socat"), require_binary("nsenter")
        sock = rundir / f"in-{inner}.sock"
        with log.open("ab") as out:
            self.inside = subprocess.Popen(
                [nsenter, f"--net={netns}", "--", socat,
                 f"UNIX-LISTEN:{sock},fork,unlink-early,mode=600", f"TCP:127.0.0.1:{inner}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline or self.inside.poll() is not None:
                    raise RuntimeError(f"no forwarder socket {sock}")
                time.sleep(0.02)
            self.outside = subprocess.Popen(
                [socat, f"TCP-LISTEN:{outer},bind=127.0.0.1,fork,reuseaddr",
                 f"UNIX-CONNECT:{sock}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip

    def close(self) -> None:
        for proc in (self.outside, self.inside):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def caddy_deb(cache: Path) -> Path:
    """Debian's caddy package (the installed version): apt's archive, else ``apt-get download``."""
    version = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "caddy"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    name = f"caddy_{version.split(':')[-1]}_amd64.deb"
    for candidate in (Path("/var/cache/apt/archives") / name, cache / name):
        if candidate.exists():
            return candidate
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", "download", f"caddy={version}"],
        cwd=cache, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return cache / name


class DeployHost:
    """The session's deploy target: ``dockerd``, ``pebble``, and images built on demand."""

    def __init__(self, workdir: Path, forward_ports: Sequence[int]) -> None:
        self.workdir = workdir
        self._forward_ports = list(forward_ports)
        self.http_port, self.tls_port = free_port(), free_port()
        self.pebble: Pebble | None = None
        self.dockerd: DockerDaemon | None = None
        self._inward: list[_InwardForward] = []
        self._built: set[str] = set()
        self._base: str | None = None

    @property
    def docker(self) -> DockerDaemon:
        assert self.dockerd is not None
        return self.dockerd

    @property
    def acme(self) -> Pebble:
        assert self.pebble is not None
        return self.pebble

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    def _start(self) -> None:
        self.pebble = Pebble(
            self.workdir / "pebble", http_port=self.http_port, tls_port=self.tls_port
        )
        self.dockerd = _OverlayDockerDaemon(
            self.workdir / "dockerd",
            forward_ports=[*self._forward_ports, self.pebble.port],
            mirrors=[f"https://{DOMAIN}"],
            hosts={DOMAIN: PUBLIC_ADDRESS},
        )
        self.dockerd.__enter__()
        subprocess.run(
            [require_binary("nsenter"), f"--net={self.dockerd.netns_path}", "--",
             require_binary("ip"), "address", "add", f"{PUBLIC_ADDRESS}/32", "dev", "lo"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        log = self.workdir / "forward.log"
        for outer, inner in ((self.http_port, 80), (self.tls_port, 443)):
            self._inward.append(
                _InwardForward(self.dockerd.netns_path, outer, inner, self.dockerd.rundir, log)
            )

    def close(self) -> None:
        for forward in self._inward:
            forward.close()
        self._inward.clear()
        if self.dockerd is not None:
            self.dockerd.__exit__(None, None, None)
            # The images and containers (~1 GiB); logs stay.
            shutil.rmtree(self.dockerd.data_root, ignore_errors=True)
            self.dockerd = None
        if self.pebble is not None:
            self.pebble.close()
            self.pebble = None

    def trust_pebble(self) -> Path:
        """dockerd trusts pebble's current issuing root (and nothing else) for DOMAIN."""
        root = self.acme.write_root(self.workdir / "pebble-root.pem")
        self.docker.add_registry_ca(DOMAIN, root)
        return root

    def probe(
        self, path: str = "/v2/", timeout: float = 90, headers: dict[str, str] | None = None
    ) -> dict[str, object]:
        """A verified HTTPS GET of ``https://DOMAIN/path`` from inside the namespace (trusting
        pebble's root only), retried until it answers or ``timeout`` passes."""
        root = self.workdir / "pebble-root.pem"
        if not root.exists():
            self.trust_pebble()
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.run(
                [require_binary("nsenter"), f"--net={self.docker.netns_path}", "--",
                 sys.executable, "-m", "tests.infra.netprobe", PUBLIC_ADDRESS, DOMAIN,
                 str(root), path, json.dumps(headers or {})],
                capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )  # fmt: skip
            if proc.returncode == 0:
                result: dict[str, object] = json.loads(proc.stdout)
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no verified HTTPS answer from {DOMAIN}:\n{proc.stderr}")
            time.sleep(1)

    def trust_dir(self, directory: Path) -> Path:
        """A directory to mount at ``TRUST`` in containers: pebble's API CA (for an ACME
        client, ``acme-api-ca.pem``) and its issuing root (``root.pem``)."""
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.acme.wfe_ca, directory / "acme-api-ca.pem")
        shutil.copy(self.trust_pebble(), directory / "root.pem")
        directory.chmod(0o755)
        for file in directory.iterdir():
            file.chmod(0o644)
        return directory

    def pull_through_mirror(self, image: BuiltImage, name: str = "alpine:latest") -> None:
        """``docker pull NAME`` (Docker Hub's name: dockerd goes to its only mirror,
        ``https://DOMAIN``); the image is ``image``, byte for byte: dockerd checks every blob
        against its digest, and the ids below are the manifest's and the config's."""
        self.docker.docker("rmi", "--force", name, check=False)
        self.docker.docker("pull", name, timeout=300)
        inspect = self.docker.docker(
            "image", "inspect", "--format", "{{.Id}} {{json .RepoDigests}}", name
        ).stdout
        image_id, digests = inspect.split(" ", 1)
        assert image_id == image.config.digest, inspect
        repository = name.rsplit(":", 1)[0]
        assert f"{repository}@{image.manifest_digest}" in digests, inspect
        self.docker.docker("rmi", "--force", name)

    def order_count(self) -> int:
        """New-order requests pebble has answered so far."""
        return self.acme.log_path.read_text(errors="replace").count("POST /order-plz")

    def base_image(self) -> str:
        if self._base is None:
            self._base = import_base(self.docker)
        return self._base

    def relay_image(self) -> str:
        if RELAY_IMAGE not in self._built:
            build_image(self.docker, self.workdir, RELAY_IMAGE, base=self.base_image())
            self._built.add(RELAY_IMAGE)
        return RELAY_IMAGE

    def caddy_image(self) -> str:
        if CADDY_IMAGE not in self._built:
            require_binary("caddy")  # the image is made from the installed package
            context = self.workdir / "caddy-context"
            context.mkdir(exist_ok=True)
            shutil.copy2(caddy_deb(self.workdir / "debs"), context / "caddy.deb")
            (context / "Dockerfile").write_text(_CADDY_DOCKERFILE)
            run_build(self.docker, context, CADDY_IMAGE, {"BASE_IMAGE": self.base_image()})
            self._built.add(CADDY_IMAGE)
        return CADDY_IMAGE


def hub_ports(urls: Sequence[str]) -> list[int]:
    return [_port(url) for url in urls]


def upstream_env(hub: Hub) -> dict[str, str]:
    """A containerised relay's settings for the Docker Hub stand-in."""
    return {
        "VPSRELAY_UPSTREAMS": f"docker.io={hub.registry_url}",
        # The test CDN is on loopback, which redirect protection refuses by default.
        "VPSRELAY_ACCESS__REDIRECT_ALLOW": hub.cdn.url,
    }
