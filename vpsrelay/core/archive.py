"""The image tar as a pure function of the images: layout, byte ranges, ETag, file name.

One tar serves both loaders: `manifest.json` and `repositories` (the docker-archive
layout `docker load` reads) beside `oci-layout` and `index.json` (an OCI image layout,
for `skopeo copy oci-archive:`), all pointing at the same `blobs/<alg>/<hex>` files.
Members come in a fixed order with fixed metadata (mode 0644, owner 0, mtime 0), so
the same images always give the same bytes: the length is known before the first byte
(from the manifests' sizes), the ETag is strong, and any byte range can be served on
its own. `pieces` maps a range to what makes it up: bytes the layout holds itself
(headers, JSON files, padding) and ranges of blobs the relay streams.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpsrelay.core.digest import Digest
from vpsrelay.core.imageref import (
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    Platform,
)
from vpsrelay.errors import ClientError

if TYPE_CHECKING:
    from collections.abc import Iterator

BLOCK = 512
FORMAT_VERSION = b"vpsrelay-archive-1"


class RangeNotSatisfiable(ClientError):
    status = 416
    code = "RANGE_INVALID"


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    """One image of the tar: its manifest and config (held: both are small), its layers
    (streamed), and the name `docker load` tags it with (None for a digest reference)."""

    repo_tag: str | None
    manifest: Descriptor
    manifest_bytes: bytes
    config: Descriptor
    config_bytes: bytes
    layers: tuple[Descriptor, ...]
    platform: Platform


@dataclass(frozen=True, slots=True)
class BlobPiece:
    """`length` bytes of blob `descriptor` from `start`."""

    descriptor: Descriptor
    start: int
    length: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.length == self.descriptor.size


@dataclass(frozen=True, slots=True)
class Member:
    """One file: its header at `offset`, then `size` bytes of `data` or of `blob`, padded."""

    offset: int
    header: bytes
    size: int
    data: bytes | None
    blob: Descriptor | None

    @property
    def end(self) -> int:
        return self.offset + len(self.header) + _padded(self.size)


@dataclass(frozen=True, slots=True)
class Layout:
    members: tuple[Member, ...]
    size: int
    etag: str


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _header(name: str, size: int, *, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o755 if directory else 0o644
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.uname = info.gname = ""
    # PAX only where ustar cannot say it (a blob of 8 GiB or more): otherwise plain ustar.
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


# Docker schema 2 types and their OCI equals (the same bytes under another name).
_DOCKER, _OCI = "application/vnd.docker.", "application/vnd.oci.image."
_OCI_TYPES = {
    f"{_DOCKER}container.image.v1+json": f"{_OCI}config.v1+json",
    f"{_DOCKER}image.rootfs.diff.tar.gzip": f"{_OCI}layer.v1.tar+gzip",
    f"{_DOCKER}image.rootfs.diff.tar": f"{_OCI}layer.v1.tar",
}


def oci_manifest(image: ArchiveImage) -> tuple[Descriptor, bytes]:
    """The manifest the OCI layout lists: the registry's own, or for a Docker schema 2
    image its OCI equal (same config and layers), as `skopeo copy --format oci` makes it;
    OCI layout readers look for OCI manifests only."""
    if image.manifest.media_type != MT_DOCKER_MANIFEST:
        return image.manifest, image.manifest_bytes

    def descriptor(d: Descriptor) -> dict[str, object]:
        media_type = _OCI_TYPES.get(d.media_type, d.media_type)
        return {"mediaType": media_type, "digest": str(d.digest), "size": d.size}

    converted = _json({
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": descriptor(image.config),
        "layers": [descriptor(layer) for layer in image.layers],
    })  # fmt: skip
    digest = Digest("sha256", hashlib.sha256(converted).hexdigest())
    return Descriptor(MT_OCI_MANIFEST, digest, len(converted)), converted


def _index(images: tuple[ArchiveImage, ...]) -> bytes:
    manifests = []
    for image in images:
        listed, _ = oci_manifest(image)
        entry: dict[str, object] = {
            "mediaType": listed.media_type,
            "digest": str(listed.digest),
            "size": listed.size,
            "platform": {
                k: v
                for k, v in (
                    ("os", image.platform.os),
                    ("architecture", image.platform.architecture),
                    ("variant", image.platform.variant),
                )
                if v
            },
        }
        if image.repo_tag is not None:
            entry["annotations"] = {
                "io.containerd.image.name": qualified_name(image.repo_tag),
                "org.opencontainers.image.ref.name": image.repo_tag.rpartition(":")[2],
            }
        manifests.append(entry)
    return _json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests})


def qualified_name(repo_tag: str) -> str:
    """`alpine:3` -> `docker.io/library/alpine:3`: podman takes a short name for a local
    image (`localhost/alpine:3`); docker shows the qualified one short again."""
    first, slash, _ = repo_tag.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return repo_tag
    return f"docker.io/{repo_tag}" if slash else f"docker.io/library/{repo_tag}"


def _docker_manifest(images: tuple[ArchiveImage, ...]) -> bytes:
    return _json([
        {
            "Config": blob_path(image.config.digest),
            "RepoTags": [qualified_name(image.repo_tag)] if image.repo_tag is not None else [],
            "Layers": [blob_path(layer.digest) for layer in image.layers],
        }
        for image in images
    ])  # fmt: skip


def _repositories(images: tuple[ArchiveImage, ...]) -> bytes:
    # The legacy file: repository -> tag -> top layer. `docker load` prefers manifest.json.
    repositories: dict[str, dict[str, str]] = {}
    for image in images:
        if image.repo_tag is not None and image.layers:
            name, _, tag = image.repo_tag.rpartition(":")
            repositories.setdefault(name, {})[tag] = image.layers[-1].digest.hex
    return _json(repositories)


def build_layout(images: tuple[ArchiveImage, ...]) -> Layout:
    """The tar's members in their fixed order: the four index files, then every
    manifest and config, then every layer; each blob once, however often it is used.

    Args:
        images: at least one; their order is the order `docker load` reports them in.
    """
    files: list[tuple[str, bytes | None, Descriptor | None]] = [
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"}), None),
        ("index.json", _index(images), None),
        ("manifest.json", _docker_manifest(images), None),
        ("repositories", _repositories(images), None),
    ]
    seen: set[Digest] = set()
    small: list[tuple[str, bytes | None, Descriptor | None]] = []
    large: list[tuple[str, bytes | None, Descriptor | None]] = []
    for image in images:
        held = (oci_manifest(image), (image.config, image.config_bytes))
        for descriptor, content in held:
            if descriptor.digest not in seen:
                seen.add(descriptor.digest)
                small.append((blob_path(descriptor.digest), content, None))
        for layer in image.layers:
            if layer.digest not in seen:
                seen.add(layer.digest)
                large.append((blob_path(layer.digest), None, layer))
    algorithms = sorted({d.algorithm for d in seen})
    directories = ["blobs/", *(f"blobs/{a}/" for a in algorithms)]
    members: list[Member] = []
    offset = 0
    fingerprint = hashlib.sha256(FORMAT_VERSION)
    for name in directories:
        header = _header(name, 0, directory=True)
        members.append(Member(offset, header, 0, b"", None))
        offset += len(header)
        fingerprint.update(header)
    for name, data, blob in (*files, *small, *large):
        size = len(data) if data is not None else blob.size if blob is not None else 0
        header = _header(name, size)
        member = Member(offset, header, size, data, blob)
        members.append(member)
        offset = member.end
        fingerprint.update(header)
        fingerprint.update(
            hashlib.sha256(data).digest() if data is not None else str(blob).encode()
        )
    size = offset + 2 * BLOCK  # the end-of-archive marker: two zero blocks
    return Layout(tuple(members), size, f'"{fingerprint.hexdigest()[:40]}"')


def pieces(layout: Layout, start: int, end: int) -> Iterator[bytes | BlobPiece]:
    """What bytes `start` to `end` (exclusive) of the tar are made of, in order.

    Adjacent held bytes are not merged; blob pieces are never empty.
    """
    if start >= end:
        return
    for member in layout.members:
        if member.end <= start:
            continue
        if member.offset >= end:
            return
        yield from _member_pieces(member, start, end)
    trailer = layout.size - 2 * BLOCK
    if end > trailer:
        yield bytes(end - max(start, trailer))


def _member_pieces(member: Member, start: int, end: int) -> Iterator[bytes | BlobPiece]:
    header_end = member.offset + len(member.header)
    if start < header_end:
        yield member.header[max(0, start - member.offset) : min(end, header_end) - member.offset]
    body_start, body_end = max(start, header_end), min(end, header_end + member.size)
    if body_start < body_end:
        if member.blob is not None:
            yield BlobPiece(member.blob, body_start - header_end, body_end - body_start)
        else:
            assert member.data is not None
            yield member.data[body_start - header_end : body_end - header_end]
    pad_start, pad_end = max(start, header_end + member.size), min(end, member.end)
    if pad_start < pad_end:
        yield bytes(pad_end - pad_start)


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


# At most 19 digits: int() of thousands of digits raises (a malformed range: ignored).
_RANGE = re.compile(r"bytes=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")


def parse_range(value: str | None, size: int) -> ByteRange | None:
    """The one byte range a `Range` header asks for (RFC 9110 §14.1.2); None: the whole.

    A header in another unit or malformed is ignored, as RFC 9110 allows.

    Raises:
        RangeNotSatisfiable: several ranges (each would cost a blob request: not served),
            or a range that starts past the end.
    """
    if value is None or not value.strip().lower().startswith("bytes="):
        return None
    if "," in value:
        raise RangeNotSatisfiable("multiple ranges are not served: ask for one range")
    match = _RANGE.fullmatch(value.strip().lower())
    if match is None or (not match[1] and not match[2]):
        return None
    first, last = match[1], match[2]
    if not first:  # a suffix: the last N bytes
        count = int(last)
        if count == 0:
            raise RangeNotSatisfiable("an empty suffix range")
        return ByteRange(max(0, size - count), size)
    begin = int(first)
    if last and int(last) < begin:
        return None  # invalid: ignored
    if begin >= size:
        raise RangeNotSatisfiable(f"range starts at {begin}, past the end ({size} bytes)")
    stop = min(size, int(last) + 1) if last else size
    return ByteRange(begin, stop)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(images: tuple[ArchiveImage, ...], names: tuple[str, ...], etag: str) -> str:
    """A file name built from validated names only: `alpine_3.19_linux-amd64.tar`.

    Args:
        images: the tar's images.
        names: their repository names, as asked for.
        etag: the tar's ETag (names a tar of several images).
    """
    if len(images) == 1:
        image, name = images[0], names[0]
        reference = (
            image.repo_tag.rpartition(":")[2] if image.repo_tag else image.manifest.digest.hex[:12]
        )
        platform = str(image.platform).replace("/", "-")
        stem = f"{name.rsplit('/', 1)[-1]}_{reference}_{platform}"
    else:
        stem = f"images-{len(images)}_{etag.strip(chr(34))[:12]}"
    return _UNSAFE.sub("_", stem)[:150] + ".tar"


def content_disposition(filename: str) -> str:
    """`attachment` with a quoted name that cannot break out of the header."""
    return f'attachment; filename="{_UNSAFE.sub("_", filename.removesuffix(".tar"))}.tar"'
