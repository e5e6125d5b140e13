"""The tar layout: stable bytes, any range equal to the same slice of the whole, a tar
Python's tarfile reads back, and names that cannot break a header."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from vpsrelay.core import archive
from vpsrelay.core.archive import ArchiveImage, BlobPiece, RangeNotSatisfiable
from vpsrelay.core.digest import Digest
from vpsrelay.core.imageref import MT_DOCKER_MANIFEST, MT_OCI_MANIFEST, Descriptor, Platform

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def _descriptor(media_type: str, data: bytes) -> Descriptor:
    return Descriptor(media_type, Digest("sha256", hashlib.sha256(data).hexdigest()), len(data))


def _image(
    blobs: dict[Digest, bytes], layers: list[bytes], tag: str | None = "demo:1", arch: str = "amd64"
) -> ArchiveImage:
    config = json.dumps({"architecture": arch, "os": "linux", "n": len(layers)}).encode()
    descriptors = []
    for data in layers:
        descriptor = _descriptor(LAYER, data)
        blobs[descriptor.digest] = data
        descriptors.append(descriptor)
    config_descriptor = _descriptor(CONFIG, config)
    manifest = json.dumps({
        "config": str(config_descriptor.digest), "layers": [str(d.digest) for d in descriptors],
    }).encode()  # fmt: skip
    return ArchiveImage(
        repo_tag=tag,
        manifest=_descriptor(MT_OCI_MANIFEST, manifest),
        manifest_bytes=manifest,
        config=config_descriptor,
        config_bytes=config,
        layers=tuple(descriptors),
        platform=Platform("linux", arch),
    )


def _materialize(blobs: dict[Digest, bytes], layout: archive.Layout, start: int, end: int) -> bytes:
    out = bytearray()
    for piece in archive.pieces(layout, start, end):
        if isinstance(piece, BlobPiece):
            assert piece.length > 0
            assert piece.whole == (piece.length == piece.descriptor.size)
            out += blobs[piece.descriptor.digest][piece.start : piece.start + piece.length]
        else:
            out += piece
    return bytes(out)


layer_lists = st.lists(st.binary(min_size=0, max_size=1500), min_size=0, max_size=4)


@settings(max_examples=60, deadline=None)
@given(layer_lists, layer_lists, st.data())
def test_any_range_is_the_same_slice_of_the_whole(
    first: list[bytes], second: list[bytes], data: st.DataObject
) -> None:
    blobs: dict[Digest, bytes] = {}
    images = (_image(blobs, first), _image(blobs, second, tag="other/x:2", arch="arm64"))
    layout = archive.build_layout(images)
    whole = _materialize(blobs, layout, 0, layout.size)
    assert len(whole) == layout.size
    assert layout.size % archive.BLOCK == 0
    start = data.draw(st.integers(0, layout.size))
    end = data.draw(st.integers(start, layout.size))
    assert _materialize(blobs, layout, start, end) == whole[start:end]


def test_the_whole_tar_reads_back_with_every_file() -> None:
    blobs: dict[Digest, bytes] = {}
    shared = b"shared layer" * 100
    images = (_image(blobs, [shared, b"one"]), _image(blobs, [shared, b""], tag=None))
    layout = archive.build_layout(images)
    whole = _materialize(blobs, layout, 0, layout.size)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        names = tar.getnames()
        assert names[:6] == [
            "blobs", "blobs/sha256", "oci-layout", "index.json", "manifest.json", "repositories",
        ]  # fmt: skip
        assert len(names) == len(set(names))  # the shared layer is there once
        for digest, data in blobs.items():
            extracted = tar.extractfile(archive.blob_path(digest))
            assert extracted is not None
            assert extracted.read() == data
        for member in tar.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "")
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["docker.io/library/demo:1"]
    assert manifest[1]["RepoTags"] == []
    assert manifest[0]["Config"] == archive.blob_path(images[0].config.digest)
    assert [m["digest"] for m in index["manifests"]] == [str(i.manifest.digest) for i in images]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "1"


def test_same_images_same_bytes_and_etag_other_images_other_etag() -> None:
    blobs: dict[Digest, bytes] = {}
    one = archive.build_layout((_image(blobs, [b"a"]),))
    again = archive.build_layout((_image(blobs, [b"a"]),))
    other = archive.build_layout((_image(blobs, [b"b"]),))
    renamed = archive.build_layout((_image(blobs, [b"a"], tag="demo:2"),))
    assert one == again
    assert len({one.etag, other.etag, renamed.etag}) == 3
    assert one.etag.startswith('"')
    assert one.etag.endswith('"')


def test_a_blob_of_8_gib_or_more_gets_a_pax_size() -> None:
    big = Descriptor(LAYER, Digest("sha256", "ab" * 32), 9 * 1024**3)
    blobs: dict[Digest, bytes] = {}
    image = _image(blobs, [])
    image = ArchiveImage(
        image.repo_tag, image.manifest, image.manifest_bytes, image.config, image.config_bytes,
        (big,), image.platform,
    )  # fmt: skip
    layout = archive.build_layout((image,))
    member = layout.members[-1]
    assert member.blob == big
    header = tarfile.TarInfo.frombuf(member.header[:512], "utf-8", "strict")
    assert header.type == tarfile.XHDTYPE  # the size is in the pax header before it
    assert layout.size > big.size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("items=0-1", None),
        ("bytes=0-99", (0, 100)),
        ("bytes=10-", (10, 1000)),
        ("bytes=-100", (900, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=990-5000", (990, 1000)),
        ("bytes=5-2", None),
        ("bytes=x-y", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(value: str | None, expected: tuple[int, int] | None) -> None:
    parsed = archive.parse_range(value, 1000)
    assert (None if parsed is None else (parsed.start, parsed.end)) == expected


@pytest.mark.parametrize("value", ["bytes=0-1,5-6", "bytes=1000-", "bytes=-0"])
def test_ranges_refused(value: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        archive.parse_range(value, 1000)


def test_content_range() -> None:
    assert archive.ByteRange(10, 20).content_range(100) == "bytes 10-19/100"


def test_file_names_are_safe() -> None:
    blobs: dict[Digest, bytes] = {}
    one = _image(blobs, [b"x"], tag="alpine:3.19")
    untagged = _image(blobs, [b"x"], tag=None)
    assert archive.file_name((one,), ("library/alpine",), '"e"') == "alpine_3.19_linux-amd64.tar"
    name = archive.file_name((untagged,), ("a/b",), '"e"')
    assert name == f"b_{untagged.manifest.digest.hex[:12]}_linux-amd64.tar"
    assert archive.file_name((one, untagged), ("a", "b"), '"0123456789abcdef"') == (
        "images-2_0123456789ab.tar"
    )
    header = archive.content_disposition('x";\r\nSet-Cookie: a=b.tar')
    assert header == 'attachment; filename="x_Set-Cookie_a_b.tar"'


@pytest.mark.parametrize(
    ("short", "qualified"),
    [
        ("alpine:3", "docker.io/library/alpine:3"),
        ("someuser/tool:1", "docker.io/someuser/tool:1"),
        ("ghcr.io/owner/app:1", "ghcr.io/owner/app:1"),
        ("localhost/x:1", "localhost/x:1"),
    ],
)
def test_qualified_names(short: str, qualified: str) -> None:
    assert archive.qualified_name(short) == qualified


def test_a_docker_schema_2_image_is_listed_as_its_oci_equal() -> None:
    blobs: dict[Digest, bytes] = {}
    image = _image(blobs, [b"layer"])
    docker_layer = Descriptor(
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        image.layers[0].digest,
        image.layers[0].size,
    )
    config = Descriptor(
        "application/vnd.docker.container.image.v1+json", image.config.digest, image.config.size
    )
    docker = ArchiveImage(
        image.repo_tag, Descriptor(MT_DOCKER_MANIFEST, image.manifest.digest, 9), b"{...}",
        config, image.config_bytes, (docker_layer,), image.platform,
    )  # fmt: skip
    listed, body = archive.oci_manifest(docker)
    manifest = json.loads(body)
    assert listed.media_type == manifest["mediaType"] == MT_OCI_MANIFEST
    assert listed.digest.hex == hashlib.sha256(body).hexdigest()
    assert manifest["config"] == {
        "mediaType": CONFIG, "digest": str(config.digest), "size": config.size,
    }  # fmt: skip
    assert manifest["layers"][0]["mediaType"] == LAYER
    assert archive.oci_manifest(image) == (image.manifest, image.manifest_bytes)
    layout = archive.build_layout((docker,))
    whole = _materialize(blobs, layout, 0, layout.size)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        member = tar.extractfile(archive.blob_path(listed.digest))
        assert member is not None
        assert member.read() == body
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert index["manifests"][0]["digest"] == str(listed.digest)


@pytest.mark.parametrize(
    "value", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000]
)
def test_a_range_of_thousands_of_digits_is_ignored(value: str) -> None:
    assert archive.parse_range(value, 1000) is None  # int() of it would raise ValueError
