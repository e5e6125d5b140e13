"""References, platforms and manifests as a download reads them; every bad input refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from vpsrelay.core import imageref
from vpsrelay.core.digest import Digest
from vpsrelay.core.imageref import Platform
from vpsrelay.errors import ClientError, RelayError, UpstreamProtocolError

HEX = "a" * 64
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
UNSUPPORTED = imageref.ManifestUnsupported


def _desc(
    media_type: str = LAYER, size: object = 10, digest: str = f"sha256:{HEX}"
) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


@pytest.mark.parametrize(
    ("text", "name", "tag", "digest"),
    [
        ("alpine", "alpine", "latest", None),
        ("alpine:3.19", "alpine", "3.19", None),
        ("ghcr.io/owner/app:1.0", "ghcr.io/owner/app", "1.0", None),
        (f"alpine@sha256:{HEX}", "alpine", None, f"sha256:{HEX}"),
        (f"alpine:3@sha256:{HEX}", "alpine", "3", f"sha256:{HEX}"),
        (" library/alpine ", "library/alpine", "latest", None),
    ],
)
def test_parse_image_ref(text: str, name: str, tag: str | None, digest: str | None) -> None:
    ref = imageref.parse_image_ref(text)
    assert (ref.name, ref.tag, None if ref.digest is None else str(ref.digest)) == (
        name, tag, digest,
    )  # fmt: skip
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(
    "text",
    ["", "Alpine", "alpine:", "alpine:bad tag", "../etc", "a/../b", "alpine@sha256:xyz",
     "alpine\r\nx", 'al"pine', "x" * 600, "host:5000/app"],
)  # fmt: skip
def test_bad_references_are_client_errors(text: str) -> None:
    with pytest.raises(ClientError):
        imageref.parse_image_ref(text)


@given(st.text(max_size=300))
def test_any_reference_parses_or_is_a_client_error(text: str) -> None:
    try:
        ref = imageref.parse_image_ref(text)
    except ClientError:
        return
    assert "\r" not in ref.name
    assert '"' not in ref.reference


def test_platforms() -> None:
    assert imageref.parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert str(imageref.parse_platform(" linux/amd64 ")) == "linux/amd64"
    for bad in ("linux", "linux/", "Linux/amd64", "a/b/c/d", 'linux/amd64"'):
        with pytest.raises(imageref.PlatformInvalid):
            imageref.parse_platform(bad)


def _index(*entries: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "manifests": list(entries)}).encode()


def _entry(os: str, arch: str, variant: str = "", digest: str = HEX) -> dict[str, object]:
    platform = {"os": os, "architecture": arch, **({"variant": variant} if variant else {})}
    return {**_desc(imageref.MT_OCI_MANIFEST, 100, f"sha256:{digest}"), "platform": platform}


def test_select_platform() -> None:
    body = _index(
        _entry("linux", "amd64", digest="1" * 64),
        _entry("linux", "arm64", "v8", digest="2" * 64),
        {"mediaType": imageref.MT_OCI_MANIFEST, "digest": f"sha256:{'3' * 64}", "size": 1},
        _entry("linux", "arm", "v7", digest="4" * 64),
        {"platform": {"os": 1, "architecture": "x"}},
        "junk",
    )
    assert imageref.select_platform(body, Platform("linux", "amd64")).digest.hex == "1" * 64
    assert imageref.select_platform(body, Platform("linux", "arm64")).digest.hex == "2" * 64
    assert imageref.select_platform(body, Platform("linux", "arm64", "v8")).digest.hex == "2" * 64
    with pytest.raises(imageref.PlatformUnknown, match="linux/amd64, linux/arm/v7, linux/arm64/v8"):
        imageref.select_platform(body, Platform("linux", "arm", "v6"))
    with pytest.raises(imageref.PlatformUnknown, match="none"):
        imageref.select_platform(_index(), Platform("linux", "amd64"))
    nested = _index({**_entry("linux", "amd64"), "mediaType": imageref.MT_OCI_INDEX})
    with pytest.raises(imageref.PlatformUnknown):
        imageref.select_platform(nested, Platform("linux", "amd64"))
    with pytest.raises(UpstreamProtocolError):
        imageref.select_platform(b'{"manifests": 1}', Platform("linux", "amd64"))


def test_media_type_of() -> None:
    oci = json.dumps({"mediaType": imageref.MT_OCI_MANIFEST}).encode()
    assert imageref.media_type_of(oci, None) == imageref.MT_OCI_MANIFEST
    assert (
        imageref.media_type_of(b"{}", f"{imageref.MT_DOCKER_LIST}; x=y") == imageref.MT_DOCKER_LIST
    )
    assert imageref.media_type_of(b'{"manifests": []}', None) == imageref.MT_OCI_INDEX
    assert imageref.media_type_of(b'{"config": {}, "layers": []}', "") == imageref.MT_OCI_MANIFEST
    schema1 = b'{"schemaVersion": 1, "fsLayers": []}'
    with pytest.raises(imageref.ManifestUnsupported):
        imageref.media_type_of(schema1, "application/vnd.docker.distribution.manifest.v1+json")
    for bad in (b"not json", b"[]", b"\xff"):
        with pytest.raises(UpstreamProtocolError):
            imageref.media_type_of(bad, None)


def _manifest(config: object = None, layers: object = None) -> bytes:
    return json.dumps({
        "config": _desc(CONFIG, 5) if config is None else config,
        "layers": [_desc()] if layers is None else layers,
    }).encode()  # fmt: skip


def test_parse_image_manifest() -> None:
    parsed = imageref.parse_image_manifest(_manifest())
    assert parsed.config.digest == Digest("sha256", HEX)
    assert [layer.size for layer in parsed.layers] == [10]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (_manifest(config=_desc("application/vnd.cncf.helm.config.v1+json")), UNSUPPORTED),
        (_manifest(layers=[_desc("application/x-artifact")]), UNSUPPORTED),
        (_manifest(layers=[{**_desc(), "urls": ["https://example.com/x"]}]), UNSUPPORTED),
        (_manifest(layers=[_desc(size=-1)]), UpstreamProtocolError),
        (_manifest(layers=[_desc(size=2**53)]), UpstreamProtocolError),
        (_manifest(layers=[_desc(size=True)]), UpstreamProtocolError),
        (_manifest(layers=[_desc(size="10")]), UpstreamProtocolError),
        (_manifest(layers=[_desc(digest="sha256:../../x")]), UpstreamProtocolError),
        (_manifest(layers=[{"digest": f"sha256:{HEX}", "size": 1}]), UpstreamProtocolError),
        (_manifest(layers=["x"]), UpstreamProtocolError),
        (_manifest(layers={"a": 1}), UpstreamProtocolError),
        (_manifest(layers=[_desc()] * (imageref.MAX_LAYERS + 1)), UpstreamProtocolError),
    ],
)  # fmt: skip
def test_bad_manifests(body: bytes, error: type[RelayError]) -> None:
    with pytest.raises(error):
        imageref.parse_image_manifest(body)


def test_config_platform() -> None:
    config = json.dumps({"os": "linux", "architecture": "arm", "variant": "v7"}).encode()
    assert imageref.config_platform(config) == Platform("linux", "arm", "v7")
    with pytest.raises(UpstreamProtocolError):
        imageref.config_platform(b'{"os": "linux"}')


# -- the security review of issue 17 ------------------------------------------------------------


def test_platforms_are_matched_as_containerd_normalises_them() -> None:
    body = _index(
        _entry("linux", "arm64", digest="2" * 64),
        _entry("linux", "arm", "v7", digest="4" * 64),
        _entry("linux", "arm", "v6", digest="6" * 64),
        _entry("linux", "amd64", digest="1" * 64),
    )
    assert imageref.select_platform(body, Platform("linux", "arm64", "v8")).digest.hex == "2" * 64
    # `linux/arm` is v7, not whichever arm entry comes first.
    assert imageref.select_platform(body, Platform("linux", "arm")).digest.hex == "4" * 64
    assert imageref.select_platform(body, Platform("linux", "x86_64")).digest.hex == "1" * 64
    assert imageref.normalize(Platform("linux", "aarch64")) == Platform("linux", "arm64")
    assert imageref.normalize(Platform("linux", "armhf")) == Platform("linux", "arm", "v7")
    assert imageref.normalize(Platform("linux", "amd64", "v1")) == Platform("linux", "amd64")
    assert imageref.normalize(Platform("linux", "amd64", "v3")) == Platform("linux", "amd64", "v3")


def test_an_image_configs_variant_is_checked() -> None:
    arm_v6 = Platform("linux", "arm", "v6")
    assert imageref.same_platform(Platform("linux", "arm", "v7"), Platform("linux", "arm", "7"))
    assert not imageref.same_platform(Platform("linux", "arm", "v7"), arm_v6)
    assert not imageref.same_platform(Platform("linux", "arm"), arm_v6)
    assert imageref.same_platform(Platform("linux", "arm64", "v8"), Platform("linux", "arm64"))
    assert not imageref.same_platform(Platform("linux", "amd64"), Platform("linux", "arm64"))


def test_one_unparsable_entry_does_not_spoil_the_index() -> None:
    foreign = {**_entry("windows", "amd64", digest="9" * 64), "urls": ["https://x.invalid/"]}
    bad_size = {**_entry("linux", "s390x", digest="8" * 64), "size": -1}
    body = _index(foreign, bad_size, _entry("linux", "amd64", digest="1" * 64))
    assert imageref.select_platform(body, Platform("linux", "amd64")).digest.hex == "1" * 64
    with pytest.raises(imageref.PlatformUnknown):
        imageref.select_platform(body, Platform("windows", "amd64"))


def test_a_layer_of_size_0_must_be_the_empty_blob() -> None:
    def manifest(layer: dict[str, object]) -> bytes:
        return json.dumps({"config": _desc(CONFIG), "layers": [layer]}).encode()

    empty = f"sha256:{imageref.EMPTY_SHA256.hex}"
    assert imageref.parse_image_manifest(manifest(_desc(size=0, digest=empty))).layers[0].size == 0
    with pytest.raises(UpstreamProtocolError, match="size 0"):
        imageref.parse_image_manifest(manifest(_desc(size=0)))


def test_json_nested_too_deep_is_an_upstream_error() -> None:
    deep = b'{"os":"linux","architecture":"amd64","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(UpstreamProtocolError, match="too deep"):
        imageref.config_platform(deep)
    document = imageref.load_document(b'{"manifests": []}', "index")
    assert imageref.load_document(document, "index") is document  # parsed once, shared


def test_json_of_too_many_values_is_refused_before_parsing() -> None:
    junk = b'{"manifests":[' + b",".join([b"[]"] * (imageref.MAX_JSON_VALUES + 2)) + b"]}"
    with pytest.raises(UpstreamProtocolError, match="JSON values"):
        imageref.select_platform(junk, Platform("linux", "amd64"))
    many = b'{"manifests":[' + b",".join([b"[]"] * 1000) + b"]}"
    with pytest.raises(imageref.PlatformUnknown):
        imageref.select_platform(many, Platform("linux", "amd64"))
