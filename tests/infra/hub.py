"""A faithful Docker Hub stand-in: token server + CDN + two Distribution 2.8 processes.

* ``hub.registry_url``: ``docker-registry`` with ``auth.token`` (realm = our token server,
  service ``registry.docker.io``, issuer ``auth.docker.io``) and the ``redirect`` storage
  middleware, so blob GET/HEAD answer ``307`` to the CDN.  Access log enabled; parse it with
  ``hub.registry_requests()``.
  ``hub.registry_url`` is a thin Python front (``tests.infra.front``) that forwards everything
  to that Distribution and adds Docker Hub's tag pagination (``n``/``last``/``Link``), which
  Distribution 2.8 lacks; ``hub.registry_direct_url`` bypasses it.
* ``hub.push_url``: a second ``docker-registry`` on the **same** storage dir, no auth, no
  redirect; only used to seed images with skopeo.
* ``hub.tokens`` (``TokenServer``) and ``hub.cdn`` (``CDN``) are in-process threads.

Seeded images (``hub.images`` keys): ``library/alpine:latest`` (OCI), ``library/alpine:v2s2``
(same content, Docker v2 schema 2; its BuiltImage describes the *registry's* v2s2
manifest), ``library/multi:latest`` (OCI index linux/amd64 + linux/arm64),
``someuser/tool:1.0``, ``private/secret:1.0`` (alice only), ``library/big:latest`` (extra
300 MiB layer), ``library/paged:t01`` .. ``t05``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tests.infra.cdn import CDN
from tests.infra.front import HubFront
from tests.infra.oci import (
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Blob,
    BuiltImage,
    BuiltIndex,
    build_image,
    build_index,
    push,
    sha256_digest,
)
from tests.infra.tokenserver import ALICE, ISSUER, SERVICE, TokenServer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

BIG_LAYER_BYTES = 300 * 1024 * 1024
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
PUSH_TIMEOUT = 180.0

_LISTEN_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_ACCESS_RE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "([A-Z]+) (\S+) HTTP/[0-9.]+" (\d{3}) (\d+|-)', re.MULTILINE
)
_MANIFEST_ACCEPT = ", ".join([MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST])


class HubStartError(RuntimeError):
    pass


@dataclass
class RegistryProcess:
    """One ``docker-registry serve`` child. stdout = access log, stderr = app log."""

    name: str
    config_path: Path
    stdout_path: Path
    stderr_path: Path
    proc: subprocess.Popen[bytes]
    port: int = 0
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        out = self.stdout_path.read_text(errors="replace")
        err = self.stderr_path.read_text(errors="replace")
        return (
            f"--- {self.name} stdout ---\n{out[-4000:]}\n--- {self.name} stderr ---\n{err[-4000:]}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        for fh in self._files:
            fh.close()
        self._files.clear()


def _registry_env() -> dict[str, str]:
    # REGISTRY_* variables override the config file; never inherit them.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def start_registry(
    binary: str, workdir: Path, name: str, config: dict[str, Any], timeout: float = START_TIMEOUT
) -> RegistryProcess:
    """Start ``docker-registry serve`` with ``config`` (written as JSON, which is YAML) and
    wait (bounded) for its ``listening on 127.0.0.1:PORT`` line."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{name}.yml"
    cfg.write_text(json.dumps(config, indent=2))
    out_path, err_path = workdir / f"{name}.access.log", workdir / f"{name}.log"
    out = out_path.open("wb")
    err = err_path.open("wb")
    proc = subprocess.Popen(
        [binary, "serve", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        env=_registry_env(),
        start_new_session=True,
    )
    reg = RegistryProcess(name, cfg, out_path, err_path, proc, _files=[out, err])
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        m = _LISTEN_RE.search(err_path.read_text(errors="replace"))
        if m:
            reg.port = int(m.group(1))
            return reg
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    reg.stop()
    raise HubStartError(f"{name} did not start (rc={proc.returncode})\n{reg.logs()}")


def _registry_config(storage: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": False},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # No http.debug (it would bind another port); no health checks; no notifications.
        "http": {"addr": "127.0.0.1:0", "secret": "vpsrelay-test-hub-secret"},
    }
    cfg.update(extra)
    return cfg


def _get_manifest(base_url: str, repo: str, ref: str, accept: str) -> tuple[str, bytes]:
    req = urllib.request.Request(
        f"{base_url}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.headers.get("Content-Type", ""), resp.read()


class Hub:
    """The running stand-in. Build it with ``start_hub``; always ``close()`` it."""

    service = SERVICE
    issuer = ISSUER
    creds = ALICE

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.storage_dir = workdir / "storage"
        self.oci_dir = workdir / "oci"
        self.log_dir = workdir / "logs"
        self.images: dict[str, BuiltImage | BuiltIndex] = {}
        self.startup_seconds = 0.0
        self._registries: list[RegistryProcess] = []
        self._access_offset = 0
        self.tokens: TokenServer
        self.front: HubFront
        self.cdn: CDN
        self.hub_registry: RegistryProcess
        self.push_registry: RegistryProcess

    # -- URLs -----------------------------------------------------------------------------

    @property
    def registry_url(self) -> str:
        """The Docker Hub stand-in: the ``HubFront`` (tag pagination) before Distribution."""
        return self.front.url

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:PORT`` of ``registry_url`` (for skopeo ``docker://`` refs)."""
        return self.front.host

    @property
    def registry_direct_url(self) -> str:
        """The token-auth + redirect Distribution itself, bypassing ``HubFront``."""
        return self.hub_registry.url

    @property
    def push_url(self) -> str:
        return self.push_registry.url

    @property
    def push_host(self) -> str:
        return self.push_registry.host

    @property
    def token_url(self) -> str:
        """The realm: ``http://127.0.0.1:T/token``."""
        return self.tokens.realm

    @property
    def cdn_url(self) -> str:
        return self.cdn.url

    # -- access log -----------------------------------------------------------------------

    def registry_log(self) -> list[tuple[str, str, int]]:
        """(method, path?query, status) per request to the hub instance since the last clear.

        Distribution writes the line after the handler returns, so a request whose response
        you just read may not be there yet; use ``wait_registry_requests``."""
        data = self.hub_registry.stdout_path.read_bytes()[self._access_offset :]
        return [
            (m.group(1), m.group(2), int(m.group(3)))
            for m in _ACCESS_RE.finditer(data.decode(errors="replace"))
        ]

    def registry_requests(self) -> list[tuple[str, str]]:
        """(method, path?query) per request to the hub instance (not the push one)."""
        return [(m, p) for m, p, _ in self.registry_log()]

    def wait_registry_requests(
        self,
        predicate: Callable[[list[tuple[str, str]]], bool],
        timeout: float = 5.0,
    ) -> list[tuple[str, str]]:
        """Poll (bounded) until ``predicate(registry_requests())``; return the last list."""
        deadline = time.monotonic() + timeout
        reqs = self.registry_requests()
        for _ in range(int(timeout / 0.02) + 1):
            if predicate(reqs) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
            reqs = self.registry_requests()
        return reqs

    def clear_registry_requests(self) -> None:
        self._access_offset = self.hub_registry.stdout_path.stat().st_size

    def clear(self) -> None:
        """Forget every request seen so far (registry access log, token server, CDN)."""
        self.clear_registry_requests()
        self.tokens.clear()
        self.cdn.clear()
        self.cdn.corrupt = False
        self.front.ratelimit = None
        self.front.limits.clear()
        self.front.reject_tokens = 0
        self.front.rejected = 0
        self.cdn.chunk_delay = 0.0

    # -- lifecycle --------------------------------------------------------------------------

    def close(self, *, remove_data: bool = False) -> None:
        """Stop both registries (SIGTERM, bounded wait, then SIGKILL) and both threads.

        ``remove_data=True`` also deletes the storage dir and OCI layouts (keeps logs)."""
        for reg in reversed(self._registries):
            reg.stop()
        self._registries.clear()
        for name in ("front", "cdn", "tokens"):
            srv = self.__dict__.pop(name, None)
            if srv is not None:
                srv.close()
        if remove_data:
            shutil.rmtree(self.storage_dir, ignore_errors=True)
            shutil.rmtree(self.oci_dir, ignore_errors=True)

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- seeding --------------------------------------------------------------------------

    def push_image(
        self,
        item: BuiltImage | BuiltIndex,
        ref: str,
        *,
        fmt: str = "oci",
        env: dict[str, str] | None = None,
    ) -> None:
        """Push ``item`` as ``ref`` (``repo:tag``) through the push instance."""
        push(
            item,
            f"{self.push_host}/{ref}",
            fmt="v2s2" if fmt == "v2s2" else "oci",
            timeout=PUSH_TIMEOUT,
            env=env if env is not None else self._skopeo_env(),
        )

    def _skopeo_env(self) -> dict[str, str]:
        conf = self.workdir / "registries.conf"
        if not conf.exists():
            conf.write_text("# empty: no mirrors, no search registries\n")
        return {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}

    def _seed(self) -> None:
        o = self.oci_dir

        def alpine() -> dict[str, BuiltImage | BuiltIndex]:
            img = build_image(
                o / "alpine",
                "latest",
                files={
                    "etc/os-release": b'NAME="Alpine stand-in"\nID=alpine\n',
                    "bin/hello": b"#!/bin/sh\necho hello from the stand-in\n",
                },
            )
            self.push_image(img, "library/alpine:latest")
            self.push_image(img, "library/alpine:v2s2", fmt="v2s2")
            return {
                "library/alpine:latest": img,
                "library/alpine:v2s2": self._as_pushed(img, "library/alpine", "v2s2"),
            }

        def multi() -> dict[str, BuiltImage | BuiltIndex]:
            idx = build_index(
                o / "multi",
                "latest",
                [("linux", "amd64"), ("linux", "arm64")],
                files={"etc/multi": b"multi\n"},
            )
            self.push_image(idx, "library/multi:latest")
            return {"library/multi:latest": idx}

        def single(
            ref: str, files: dict[str, bytes], extra: int = 0
        ) -> Callable[[], dict[str, BuiltImage | BuiltIndex]]:
            def run() -> dict[str, BuiltImage | BuiltIndex]:
                repo, tag = ref.rsplit(":", 1)
                img = build_image(
                    o / repo.replace("/", "_"), tag, files=files, extra_layer_bytes=extra
                )
                self.push_image(img, ref)
                return {ref: img}

            return run

        def paged() -> dict[str, BuiltImage | BuiltIndex]:
            out: dict[str, BuiltImage | BuiltIndex] = {}
            for i in range(1, 6):
                tag = f"t{i:02d}"
                img = build_image(o / "paged", tag, files={"etc/page": f"{tag}\n".encode()})
                self.push_image(img, f"library/paged:{tag}")
                out[f"library/paged:{tag}"] = img
            return out

        jobs: list[Callable[[], dict[str, BuiltImage | BuiltIndex]]] = [
            single("library/big:latest", {"etc/big": b"big\n"}, BIG_LAYER_BYTES),
            alpine,
            multi,
            single("someuser/tool:1.0", {"usr/bin/tool": b"#!/bin/sh\necho tool 1.0\n"}),
            single("private/secret:1.0", {"etc/secret": b"the cake is a lie\n"}),
            paged,
        ]
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="hub-seed") as pool:
            for result in pool.map(lambda job: job(), jobs):
                self.images.update(result)
        self._verify_seeded()

    def _seed_only(self, images: Sequence[tuple[str, dict[str, bytes]]]) -> None:
        for ref, files in images:
            repo, tag = ref.rsplit(":", 1)
            img = build_image(self.oci_dir / repo.replace("/", "_"), tag, files=files)
            self.push_image(img, ref)
            self.images[ref] = img

    def _as_pushed(self, img: BuiltImage, repo: str, tag: str) -> BuiltImage:
        """Describe what the registry actually stores for ``repo:tag`` (e.g. after v2s2)."""
        ctype, body = _get_manifest(self.push_url, repo, tag, _MANIFEST_ACCEPT)
        manifest = json.loads(body)

        def blob(d: dict[str, Any]) -> Blob:
            return Blob(digest=d["digest"], size=int(d["size"]), media_type=d["mediaType"])

        return BuiltImage(
            layout=img.layout,
            tag=img.tag,
            manifest_digest=sha256_digest(body),
            manifest_media_type=ctype.split(";")[0].strip(),
            manifest_bytes=body,
            config=blob(manifest["config"]),
            layers=tuple(blob(layer) for layer in manifest["layers"]),
        )

    def _verify_seeded(self) -> None:
        for ref, item in self.images.items():
            repo, tag = ref.rsplit(":", 1)
            if isinstance(item, BuiltIndex):
                want, mtype = item.index_digest, MT_OCI_INDEX
            else:
                want, mtype = item.manifest_digest, item.manifest_media_type
            ctype, body = _get_manifest(self.push_url, repo, tag, _MANIFEST_ACCEPT)
            got = sha256_digest(body)
            if got != want or not ctype.startswith(mtype):
                raise HubStartError(
                    f"{ref}: registry has {got} ({ctype}), expected {want} ({mtype})"
                )


def start_hub(
    workdir: Path,
    *,
    registry_binary: str = "docker-registry",
    seed: bool = True,
    service: str = SERVICE,
    images: Sequence[tuple[str, dict[str, bytes]]] | None = None,
    relative_redirects: bool = False,
    realm_query: str = "",
) -> Hub:
    """Start token server, CDN and both registries under ``workdir``; seed the images.

    ``service`` is the token service name (another registry than Docker Hub has its own);
    ``images`` replaces the default image set with ``(ref, files)`` pairs; with
    ``relative_redirects`` blob redirects carry a relative Location to the front itself, as
    Google's registries send, and the front fetches from the CDN; ``realm_query`` is a
    query the token realm carries (``account=x``), which the token server then requires.

    Raises ``HubStartError`` (with the registry logs) if anything fails; everything that was
    started is stopped again first."""
    t0 = time.monotonic()
    workdir = Path(workdir)
    hub = Hub(workdir)
    try:
        hub.storage_dir.mkdir(parents=True, exist_ok=True)
        hub.log_dir.mkdir(parents=True, exist_ok=True)
        hub.tokens = TokenServer(workdir / "certs", realm_query=realm_query)
        hub.cdn = CDN(hub.storage_dir)
        hub.push_registry = start_registry(
            registry_binary,
            hub.log_dir,
            "push",
            _registry_config(hub.storage_dir),
        )
        hub._registries.append(hub.push_registry)
        hub.hub_registry = start_registry(
            registry_binary,
            hub.log_dir,
            "hub",
            _registry_config(
                hub.storage_dir,
                auth={
                    "token": {
                        "realm": hub.tokens.realm,
                        "service": service,
                        "issuer": hub.tokens.issuer,
                        "rootcertbundle": str(hub.tokens.cert_path),
                    }
                },
                middleware={
                    "storage": [{"name": "redirect", "options": {"baseurl": hub.cdn.url + "/"}}]
                },
            ),
        )
        hub._registries.append(hub.hub_registry)
        hub.service = service
        hub.front = HubFront(
            hub.hub_registry.port, cdn_url=hub.cdn.url if relative_redirects else None
        )
        hub.front.sign_location = hub.cdn.sign  # a no-op until `cdn.url_ttl` is set
        if seed and images is not None:
            hub._seed_only(images)
        elif seed:
            hub._seed()
        hub.clear()
    except BaseException:
        hub.close()
        raise
    hub.startup_seconds = time.monotonic() - t0
    return hub


def iter_blobs(item: BuiltImage | BuiltIndex) -> Iterable[Blob]:
    """Every config and layer blob of an image or of all images of an index."""
    images = item.images if isinstance(item, BuiltIndex) else (item,)
    for img in images:
        yield img.config
        yield from img.layers
