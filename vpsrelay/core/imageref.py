"""What a download asks for and what the registry says an image is.

`docker save`-style references (`alpine`, `ghcr.io/owner/app:1.0`, `name@sha256:...`),
platforms (`linux/arm64/v8`), and the two manifest shapes that matter: an index (a
manifest list) to pick a platform from, and an image manifest with its config and
layers. Everything is validated here: a name, tag, digest or size that does not match
the spec's grammar never reaches a path, a header or a file name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from vpsrelay.core import grammar
from vpsrelay.core.digest import Digest
from vpsrelay.errors import ClientError, NameInvalid, TagInvalid, UpstreamProtocolError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
IMAGE_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
# What the download asks the registry for: images and indexes, never schema 1.
MANIFEST_ACCEPT = ", ".join([MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST])
CONFIG_TYPES = frozenset({
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
})  # fmt: skip
# Layers `docker load` and `podman load` unpack (tar, gzip; zstd for podman).
LAYER_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
})  # fmt: skip
DEFAULT_TAG = "latest"
# JSON's safe integers: a size past this is a lie, whatever the manifest says.
MAX_SIZE = 2**53 - 1
MAX_LAYERS = 1000  # Distribution's own limit is lower; this bounds the tar's layout
# Values in one manifest or config: real ones have a few thousand at most (1000 layers
# of 5 fields); a 4 MiB body of `[],[],...` has over a million and takes a second to parse.
MAX_JSON_VALUES = 50_000

# An os or architecture name, as Go's GOOS/GOARCH values and OCI variants spell them.
_PLATFORM_PART = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


class ImageRefInvalid(ClientError):
    code = "NAME_INVALID"


class PlatformInvalid(ClientError):
    code = "MANIFEST_INVALID"


class PlatformUnknown(ClientError):
    """The image has no manifest for the platform asked for."""

    status = 404
    code = "MANIFEST_UNKNOWN"


class ManifestUnsupported(ClientError):
    """A manifest that is no container image (an artifact, schema 1, foreign layers)."""

    status = 415
    code = "MANIFEST_INVALID"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """`name[:tag][@digest]`, validated; `name` as the client wrote it (routing maps it)."""

    name: str
    tag: str | None
    digest: Digest | None

    @property
    def reference(self) -> str:
        """The manifest reference: the digest when given, else the tag."""
        return str(self.digest) if self.digest is not None else (self.tag or DEFAULT_TAG)


def parse_image_ref(text: str) -> ImageRef:
    """Parse a reference as `docker pull` takes it.

    Raises:
        ImageRefInvalid: empty, too long, or no valid `name[:tag][@digest]`.
        NameInvalid, TagInvalid, DigestInvalid: a part that breaks its grammar.
    """
    text = text.strip()
    if not text or len(text) > grammar.NAME_MAX_LENGTH + 200:
        raise ImageRefInvalid(f"invalid image reference: {text[:300]!r}")
    name, at, digest_text = text.partition("@")
    digest = Digest.parse(digest_text) if at else None
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not grammar.is_valid_tag(tag):
            raise TagInvalid(f"invalid tag: {tag!r}")
    if not grammar.is_valid_name(name):
        raise NameInvalid(f"invalid repository name: {name!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageRef(name, tag, digest)


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = (self.os, self.architecture, self.variant)
        return "/".join(p for p in parts if p)


DEFAULT_PLATFORM = Platform("linux", "amd64")

# containerd's normalisation (platforms.Normalize): other spellings of one platform.
_ARCH_ALIASES = {"i386": "386", "x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}
_ARM_NAMES = {"armhf": "v7", "armel": "v6"}
_DEFAULT_VARIANTS = {("amd64", "v1"), ("arm64", "8"), ("arm64", "v8"), ("arm64", "v8.0")}


def normalize(platform: Platform) -> Platform:
    """`linux/arm64/v8` is `linux/arm64`, `linux/arm` is `linux/arm/v7`, `x86_64` is
    `amd64`: as containerd matches them."""
    os_name, arch, variant = platform.os.lower(), platform.architecture, platform.variant
    arch = _ARCH_ALIASES.get(arch, arch)
    if arch in _ARM_NAMES:
        arch, variant = "arm", _ARM_NAMES[arch]
    if (arch, variant) in _DEFAULT_VARIANTS:
        variant = ""
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "arm" and variant in ("5", "6", "8"):
        variant = f"v{variant}"
    return Platform(os_name, arch, variant)


def same_platform(asked: Platform, described: Platform) -> bool:
    """Whether an image config's platform is the one asked for; a config without a
    variant (most say none) matches on os and architecture."""
    asked, normal = normalize(asked), normalize(described)
    if not described.variant:
        return (asked.os, asked.architecture) == (normal.os, normal.architecture)
    return asked == normal


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]`, as `docker pull --platform` takes it.

    Raises:
        PlatformInvalid: not two or three lower-case parts.
    """
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(_PLATFORM_PART.fullmatch(p) for p in parts):
        raise PlatformInvalid(f"invalid platform {text[:80]!r}: expected os/arch[/variant]")
    return Platform(*parts)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"{what}: not a descriptor")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise UpstreamProtocolError(f"{what}: descriptor without mediaType or digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
        raise UpstreamProtocolError(f"{what}: descriptor with an invalid size {size!r}")
    try:
        parsed = Digest.parse(digest)
    except ClientError as exc:
        raise UpstreamProtocolError(f"{what}: {exc.message}") from None
    if value.get("urls"):
        raise ManifestUnsupported(f"{what}: foreign layers (urls) are not downloadable")
    return Descriptor(media_type, parsed, size)


# The sha256 of no bytes: the only digest a blob of size 0 may have.
EMPTY_SHA256 = Digest("sha256", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")

Document = dict[str, object]


def load_document(body: bytes | Document, what: str) -> Document:
    """A JSON object (a document parsed already is passed through: parse once, share).

    Raises:
        UpstreamProtocolError: not JSON, too many values, nested too deep, not an object.
    """
    if isinstance(body, dict):
        return body
    # Parsing costs time in proportion to the values, on the event loop: bound them
    # first (each value but the last of a list or object is followed by a comma).
    if body.count(b",") > MAX_JSON_VALUES:
        raise UpstreamProtocolError(f"{what}: over {MAX_JSON_VALUES} JSON values")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UpstreamProtocolError(f"{what}: not JSON (or nested too deep)") from None
    if not isinstance(document, dict):
        raise UpstreamProtocolError(f"{what}: not a JSON object")
    return document


def media_type_of(body: bytes | Document, content_type: str | None) -> str:
    """The manifest's media type: its own `mediaType`, else the Content-Type it came with.

    Raises:
        UpstreamProtocolError: not a JSON object.
        ManifestUnsupported: neither an index nor an image manifest.
    """
    document = load_document(body, "manifest")
    declared = document.get("mediaType")
    media_type = declared if isinstance(declared, str) else (content_type or "")
    media_type = media_type.split(";")[0].strip()
    if media_type in INDEX_TYPES or media_type in IMAGE_TYPES:
        return media_type
    if "manifests" in document:  # an OCI index may leave mediaType out
        return MT_OCI_INDEX
    if "config" in document and "layers" in document:
        return MT_OCI_MANIFEST
    raise ManifestUnsupported(f"not an image manifest or index: {media_type[:100]!r}")


def select_platform(body: bytes | Document, platform: Platform) -> Descriptor:
    """The index entry for `platform` (an entry without a variant matches any variant
    asked for only when it is the only one of its os/arch).

    Raises:
        PlatformUnknown: no entry for it (the message lists the ones there are).
        UpstreamProtocolError: a malformed index.
    """
    document = load_document(body, "index")
    entries = document.get("manifests")
    if not isinstance(entries, list):
        raise UpstreamProtocolError("index: no manifests list")
    offered: list[tuple[Platform, Descriptor]] = []
    for number, entry in enumerate(entries[:MAX_LAYERS]):
        if not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
            continue  # attestations and other entries without a platform
        described = entry["platform"]
        os_name, arch = described.get("os"), described.get("architecture")
        variant = described.get("variant") or ""
        if not all(isinstance(p, str) for p in (os_name, arch, variant)):
            continue
        try:
            descriptor = _descriptor(entry, f"index[{number}]")
        except (UpstreamProtocolError, ManifestUnsupported):
            continue  # another platform's odd entry (windows with urls) spoils nothing
        offered.append((Platform(os_name, arch, variant), descriptor))
    listed = sorted({str(p) for p, _ in offered})  # as the index spells them
    offered = [(normalize(p), d) for p, d in offered]
    platform = normalize(platform)
    exact = [d for p, d in offered if p == platform]
    if not exact and not platform.variant:
        same = [
            d for p, d in offered if (p.os, p.architecture) == (platform.os, platform.architecture)
        ]
        exact = same[:1]
    if not exact or exact[0].media_type not in IMAGE_TYPES:
        raise PlatformUnknown(
            f"no image for {platform} (this image has: {', '.join(listed) or 'none'})"
        )
    return exact[0]


@dataclass(frozen=True, slots=True)
class ImageManifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]


def parse_image_manifest(body: bytes | Document) -> ImageManifest:
    """The config and layers of an image manifest, each checked.

    Raises:
        ManifestUnsupported: an artifact (a config or layer that is no image's).
        UpstreamProtocolError: malformed.
    """
    document = load_document(body, "manifest")
    config = _descriptor(document.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ManifestUnsupported(f"not a container image: config type {config.media_type!r}")
    layers = document.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise UpstreamProtocolError("manifest: no layers list, or too many layers")
    parsed = tuple(_descriptor(layer, f"layers[{n}]") for n, layer in enumerate(layers))
    for layer in parsed:
        # A blob of size 0 is never fetched (nothing to check): only the empty one has it.
        if layer.size == 0 and layer.digest != EMPTY_SHA256:
            raise UpstreamProtocolError(f"layer {layer.digest} of size 0 is not the empty blob")
        if layer.media_type not in LAYER_TYPES:
            raise ManifestUnsupported(f"layer type {layer.media_type[:100]!r} cannot be loaded")
    return ImageManifest(config, parsed)


def config_platform(body: bytes | Document) -> Platform:
    """The platform an image config says it is for.

    Raises:
        UpstreamProtocolError: not a JSON object, or no os/architecture.
    """
    document = load_document(body, "config")
    os_name, arch = document.get("os"), document.get("architecture")
    variant = document.get("variant") or ""
    if not isinstance(os_name, str) or not isinstance(arch, str) or not isinstance(variant, str):
        raise UpstreamProtocolError("config: no os/architecture")
    return Platform(os_name, arch, variant)
