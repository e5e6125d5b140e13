"""Offline, deterministic OCI image-layout builder (stdlib only) plus a skopeo push helper.

Everything written here is reproducible: tar entries and gzip headers carry mtime 0, owners
are root, JSON is serialised with sorted keys and compact separators, and the optional
"extra" layer is filled from a seeded PRNG.  Building the same image twice gives the same
digests.

Layouts: ``build_image``/``build_index`` create ``layout`` if needed and *add* (or replace)
their tag in an existing ``index.json``, so several images may share one layout directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os as _os
import random
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

REF_NAME = "org.opencontainers.image.ref.name"
EXTRA_FILE_NAME = "extra.bin"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class BuiltImage:
    layout: Path
    tag: str
    manifest_digest: str
    manifest_media_type: str
    manifest_bytes: bytes
    config: Blob
    layers: tuple[Blob, ...]


@dataclass(frozen=True)
class BuiltIndex:
    layout: Path
    tag: str
    index_digest: str
    index_bytes: bytes
    images: tuple[BuiltImage, ...]


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algo, _, hexpart = digest.partition(":")
    return layout / "blobs" / algo / hexpart


def _init_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))


def _write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_name(path.name + f".tmp{_os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return Blob(digest=digest, size=len(data), media_type=media_type)


def _tag_in_index(layout: Path, tag: str, descriptor: dict[str, object]) -> None:
    """Add ``descriptor`` to index.json under ``tag``, replacing an older entry for that tag."""
    index_path = layout / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    else:
        index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
    manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append({**descriptor, "annotations": {REF_NAME: tag}})
    index["manifests"] = manifests
    tmp = index_path.with_name(f"index.json.tmp{_os.getpid()}")
    tmp.write_bytes(json.dumps(index, sort_keys=True, indent=2).encode())
    tmp.replace(index_path)


def _tarinfo(name: str, *, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
        info.size = size
    return info


def _small_layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    """Return (gzip'd tar, diff_id) for ``files``; parent directories get their own entries."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs: set[str] = set()
        for name in sorted(files):
            clean = name.strip("/")
            parts = clean.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    tar.addfile(_tarinfo(d + "/", is_dir=True))
            data = files[name]
            tar.addfile(_tarinfo(clean, size=len(data)), io.BytesIO(data))
    raw_bytes = raw.getvalue()
    gz = gzip.compress(raw_bytes, compresslevel=6, mtime=0)
    return gz, sha256_digest(raw_bytes)


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class _HashingWriter:
    """File-like sink that hashes and counts what passes through, then forwards it."""

    def __init__(self, sink: _Sink | None) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self._sink is not None:
            self._sink.flush()

    def tell(self) -> int:
        return self.size


def _extra_layer(layout: Path, size: int, seed: int) -> tuple[Blob, str]:
    """Stream a tar(gzip) layer holding one random file of ``size`` bytes straight to disk.

    The tar stream is written by hand (header, data, padding, end-of-archive, record
    padding, exactly as ``tarfile`` lays it out) so nothing is held in memory.  gzip level 0
    (stored deflate blocks) is valid gzip; random data would not shrink anyway and level 1
    is ~50x slower for 300 MiB.
    """
    tmp = layout / "blobs" / "sha256" / f".extra-{_os.getpid()}-{seed}.tmp"
    rng = random.Random(seed)
    with tmp.open("wb") as fh:
        outer = _HashingWriter(fh)
        with gzip.GzipFile(filename="", mode="wb", fileobj=outer, compresslevel=0, mtime=0) as gzf:
            inner = _HashingWriter(gzf)
            header = _tarinfo(EXTRA_FILE_NAME, size=size).tobuf(
                tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"
            )
            inner.write(header)
            left = size
            while left > 0:
                n = min(_CHUNK, left)
                inner.write(rng.randbytes(n))
                left -= n
            inner.write(b"\0" * (-size % tarfile.BLOCKSIZE))
            inner.write(b"\0" * (2 * tarfile.BLOCKSIZE))
            inner.write(b"\0" * (-inner.size % tarfile.RECORDSIZE))
    digest = "sha256:" + outer.hash.hexdigest()
    final = blob_path(layout, digest)
    if final.exists():
        tmp.unlink()
    else:
        tmp.replace(final)
    return Blob(digest, outer.size, MT_OCI_LAYER_GZIP), "sha256:" + inner.hash.hexdigest()


def _seed_for(tag: str, files: dict[str, bytes], size: int) -> int:
    h = hashlib.sha256(tag.encode() + b"\0" + str(size).encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return int.from_bytes(h.digest()[:8], "big")


def _build_manifest(
    layout: Path,
    *,
    files: dict[str, bytes],
    arch: str,
    os: str,
    extra_layer_bytes: int,
    seed_tag: str,
) -> tuple[bytes, Blob, tuple[Blob, ...]]:
    _init_layout(layout)
    gz, diff_id = _small_layer(files)
    layers = [_write_blob(layout, gz, MT_OCI_LAYER_GZIP)]
    diff_ids = [diff_id]
    if extra_layer_bytes > 0:
        blob, extra_diff = _extra_layer(
            layout, extra_layer_bytes, _seed_for(seed_tag, files, extra_layer_bytes)
        )
        layers.append(blob)
        diff_ids.append(extra_diff)
    config = {
        "architecture": arch,
        "os": os,
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": "vpsrelay tests/infra/oci.py"}
            for _ in diff_ids
        ],
    }
    config_blob = _write_blob(layout, canonical_json(config), MT_OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": _descriptor(config_blob),
        "layers": [_descriptor(b) for b in layers],
    }
    return canonical_json(manifest), config_blob, tuple(layers)


def _descriptor(blob: Blob) -> dict[str, object]:
    return {"mediaType": blob.media_type, "digest": blob.digest, "size": blob.size}


def build_image(
    layout: Path,
    tag: str,
    *,
    files: dict[str, bytes],
    arch: str = "amd64",
    os: str = "linux",
    extra_layer_bytes: int = 0,
) -> BuiltImage:
    """Build a single-platform OCI image and tag it ``tag`` in ``layout``/index.json.

    Layer 1 holds ``files`` (path -> content). With ``extra_layer_bytes > 0`` a second layer
    holds ``/extra.bin`` of that many seeded pseudo-random bytes, streamed to disk.
    """
    layout = Path(layout)
    manifest_bytes, config, layers = _build_manifest(
        layout, files=files, arch=arch, os=os, extra_layer_bytes=extra_layer_bytes, seed_tag=tag
    )
    mblob = _write_blob(layout, manifest_bytes, MT_OCI_MANIFEST)
    _tag_in_index(layout, tag, {**_descriptor(mblob), "platform": {"architecture": arch, "os": os}})
    return BuiltImage(
        layout=layout,
        tag=tag,
        manifest_digest=mblob.digest,
        manifest_media_type=MT_OCI_MANIFEST,
        manifest_bytes=manifest_bytes,
        config=config,
        layers=layers,
    )


def build_index(
    layout: Path,
    tag: str,
    platforms: Sequence[tuple[str, str]],
    *,
    files: dict[str, bytes],
) -> BuiltIndex:
    """Build an OCI image index with one image per ``(os, arch)`` in ``platforms``.

    Each platform image gets ``files`` plus ``etc/platform`` = ``b"<os>/<arch>\\n"`` so the
    platform images have distinct layers.  The index is tagged ``tag``; each child image is
    also tagged ``<tag>-<os>-<arch>`` in index.json so it can be pushed on its own.
    """
    layout = Path(layout)
    images: list[BuiltImage] = []
    entries: list[dict[str, object]] = []
    for os_name, arch in platforms:
        child_files = {**files, "etc/platform": f"{os_name}/{arch}\n".encode()}
        child = build_image(
            layout, f"{tag}-{os_name}-{arch}", files=child_files, arch=arch, os=os_name
        )
        images.append(child)
        entries.append(
            {
                "mediaType": MT_OCI_MANIFEST,
                "digest": child.manifest_digest,
                "size": len(child.manifest_bytes),
                "platform": {"architecture": arch, "os": os_name},
            }
        )
    index_bytes = canonical_json(
        {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    )
    iblob = _write_blob(layout, index_bytes, MT_OCI_INDEX)
    _tag_in_index(layout, tag, _descriptor(iblob))
    return BuiltIndex(
        layout=layout,
        tag=tag,
        index_digest=iblob.digest,
        index_bytes=index_bytes,
        images=tuple(images),
    )


def push(
    image_or_index: BuiltImage | BuiltIndex,
    dest: str,
    *,
    fmt: Literal["oci", "v2s2"] = "oci",
    timeout: float = 180.0,
    skopeo: str = "skopeo",
    env: dict[str, str] | None = None,
) -> None:
    """``skopeo copy`` the layout tag to ``docker://<dest>`` (plain HTTP allowed).

    ``dest`` is e.g. ``"127.0.0.1:5000/library/alpine:latest"``.  Raises
    ``RuntimeError`` (with skopeo's output) or ``TimeoutExpired``.
    """
    cmd = [skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false", "--dest-no-creds"]
    if fmt == "v2s2":
        cmd += ["--format", "v2s2"]
    if isinstance(image_or_index, BuiltIndex):
        cmd.append("--all")
    cmd += [f"oci:{image_or_index.layout}:{image_or_index.tag}", f"docker://{dest}"]
    try:
        subprocess.run(
            cmd, check=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
        )
    except subprocess.CalledProcessError as exc:
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace"
        )
        raise RuntimeError(f"{' '.join(cmd)} failed (rc={exc.returncode}):\n{out}") from exc
