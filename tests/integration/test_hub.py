"""The Docker Hub stand-in behaves like Docker Hub (talked to directly, no relay)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import TYPE_CHECKING

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.infra.hub import iter_blobs
from tests.infra.oci import (
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    BuiltImage,
    BuiltIndex,
    blob_path,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration

ACCEPT_ALL = ", ".join([MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST])


def _image(hub: Hub, ref: str) -> BuiltImage:
    item = hub.images[ref]
    assert isinstance(item, BuiltImage)
    return item


def _token(hub: Hub, *scopes: str, auth: tuple[str, str] | None = None) -> str:
    params: list[tuple[str, str | int | float | bool | None]] = [("service", hub.service)]
    params += [("scope", s) for s in scopes]
    r = httpx.get(hub.token_url, params=params, auth=auth, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    return str(body["token"])


def _client(hub: Hub, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=hub.registry_url, headers=headers, timeout=30)


def _skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_v2_ping_challenges_like_docker_hub(clean_hub: Hub) -> None:
    r = httpx.get(f"{clean_hub.registry_url}/v2/", timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == (
        f'Bearer realm="{clean_hub.token_url}",service="registry.docker.io"'
    )
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert clean_hub.wait_registry_requests(lambda reqs: ("GET", "/v2/") in reqs) == [
        ("GET", "/v2/")
    ]


def test_manifest_challenge_carries_scope(clean_hub: Hub) -> None:
    r = httpx.get(f"{clean_hub.registry_url}/v2/library/alpine/manifests/latest", timeout=10)
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer realm="{clean_hub.token_url}"')
    assert 'scope="repository:library/alpine:pull"' in challenge


def test_anonymous_token_claims(hub: Hub) -> None:
    token = _token(hub, "repository:library/alpine:pull,push")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["x5c"]
    key = hub.tokens.cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    claims = jwt.decode(token, key, algorithms=["RS256"], audience=hub.service)
    assert claims["iss"] == hub.issuer
    assert claims["sub"] == ""
    # push is not granted, only pull
    assert claims["access"] == [
        {"type": "repository", "name": "library/alpine", "actions": ["pull"]}
    ]


def test_manifests_with_token(clean_hub: Hub) -> None:
    hub = clean_hub
    img = _image(hub, "library/alpine:latest")
    token = _token(hub, "repository:library/alpine:pull")
    with _client(hub, token) as c:
        r = c.get("/v2/library/alpine/manifests/latest", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == MT_OCI_MANIFEST
        assert r.headers["docker-content-digest"] == img.manifest_digest
        assert r.content == img.manifest_bytes

        v2 = _image(hub, "library/alpine:v2s2")
        r = c.get("/v2/library/alpine/manifests/v2s2", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200
        assert r.headers["content-type"] == MT_DOCKER_MANIFEST == v2.manifest_media_type
        assert r.headers["docker-content-digest"] == v2.manifest_digest
        assert [b.digest for b in v2.layers] == [b.digest for b in img.layers]

        r = c.head(
            f"/v2/library/alpine/manifests/{img.manifest_digest}", headers={"Accept": ACCEPT_ALL}
        )
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == len(img.manifest_bytes)

        # token is scoped: another repository is refused
        r = c.get("/v2/someuser/tool/manifests/1.0", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 401
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    reqs = hub.wait_registry_requests(lambda reqs: len(reqs) >= 4)
    assert reqs[0] == ("GET", "/v2/library/alpine/manifests/latest")


def test_multi_arch_index(hub: Hub) -> None:
    idx = hub.images["library/multi:latest"]
    assert isinstance(idx, BuiltIndex)
    token = _token(hub, "repository:library/multi:pull")
    with _client(hub, token) as c:
        r = c.get("/v2/library/multi/manifests/latest", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200
        assert r.headers["content-type"] == MT_OCI_INDEX
        assert r.content == idx.index_bytes
        platforms = [m["platform"]["architecture"] for m in r.json()["manifests"]]
        assert platforms == ["amd64", "arm64"]
        for child in idx.images:
            r = c.get(
                f"/v2/library/multi/manifests/{child.manifest_digest}",
                headers={"Accept": ACCEPT_ALL},
            )
            assert r.status_code == 200
            assert r.content == child.manifest_bytes


def test_blob_redirects_to_cdn(clean_hub: Hub) -> None:
    hub = clean_hub
    img = _image(hub, "library/alpine:latest")
    layer = img.layers[0]
    token = _token(hub, "repository:library/alpine:pull")
    with _client(hub, token) as c:
        for method in ("GET", "HEAD"):
            r = c.request(method, f"/v2/library/alpine/blobs/{layer.digest}")
            assert r.status_code == 307
            location = r.headers["location"]
            hexpart = layer.digest.removeprefix("sha256:")
            assert location == (
                f"{hub.cdn_url}/docker/registry/v2/blobs/sha256/{hexpart[:2]}/{hexpart}/data"
            )
            assert location == hub.cdn.url_for(layer.digest)
        # unknown blob: a registry 404, not a redirect
        r = c.get("/v2/library/alpine/blobs/sha256:" + "0" * 64)
        assert r.status_code == 404
    assert hub.cdn.requests() == []  # nothing followed the redirects


def test_cdn_semantics(clean_hub: Hub) -> None:
    hub = clean_hub
    img = _image(hub, "library/alpine:latest")
    layer = img.layers[0]
    data = blob_path(img.layout, layer.digest).read_bytes()
    url = hub.cdn.url_for(layer.digest)
    with httpx.Client(timeout=30) as c:
        r = c.get(url, headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 400
        r = c.head(url, headers={"Authorization": "Basic YTpi"})
        assert r.status_code == 400

        r = c.get(url)
        assert r.status_code == 200
        assert r.content == data
        assert hashlib.sha256(r.content).hexdigest() == layer.digest.removeprefix("sha256:")
        assert r.headers["accept-ranges"] == "bytes"
        assert int(r.headers["content-length"]) == layer.size

        r = c.head(url)
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == layer.size
        assert r.content == b""

        r = c.get(url, headers={"Range": "bytes=10-19"})
        assert r.status_code == 206
        assert r.content == data[10:20]
        assert r.headers["content-range"] == f"bytes 10-19/{layer.size}"
        assert r.headers["content-length"] == "10"

        r = c.get(url, headers={"Range": "bytes=100-"})
        assert r.status_code == 206
        assert r.content == data[100:]
        assert r.headers["content-range"] == f"bytes 100-{layer.size - 1}/{layer.size}"

        r = c.get(url, headers={"Range": "bytes=-7"})
        assert r.status_code == 206
        assert r.content == data[-7:]

        r = c.get(url, headers={"Range": f"bytes={layer.size}-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == f"bytes */{layer.size}"

        r = c.get(hub.cdn.url_for("sha256:" + "1" * 64))
        assert r.status_code == 404

    log = hub.cdn.requests()
    assert [e.method for e in log[:2]] == ["GET", "HEAD"]
    assert log[0].header("authorization") == "Bearer whatever"
    assert hub.cdn.bytes_sent >= layer.size + 10 + 7


def test_cdn_corrupt_switch(clean_hub: Hub) -> None:
    hub = clean_hub
    layer = _image(hub, "library/alpine:latest").layers[0]
    hub.cdn.corrupt = True
    try:
        r = httpx.get(hub.cdn.url_for(layer.digest), timeout=10)
    finally:
        hub.cdn.corrupt = False
    assert r.status_code == 200
    assert len(r.content) == layer.size
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() != layer.digest


def test_big_layer_served_by_cdn_with_ranges(clean_hub: Hub) -> None:
    hub = clean_hub
    img = _image(hub, "library/big:latest")
    big = img.layers[1]
    assert big.size > 300 * 1024 * 1024
    url = hub.cdn.url_for(big.digest)
    with httpx.Client(timeout=30) as c:
        r = c.head(url)
        assert int(r.headers["content-length"]) == big.size
        tail = c.get(url, headers={"Range": "bytes=-1048576"})
        assert tail.status_code == 206
        expected = blob_path(img.layout, big.digest).read_bytes()[-1048576:]
        assert tail.content == expected
    assert hub.cdn.bytes_sent == 1048576


def test_tag_pagination(hub: Hub) -> None:
    token = _token(hub, "repository:library/paged:pull")
    with _client(hub, token) as c:
        r = c.get("/v2/library/paged/tags/list", params={"n": 2})
        assert r.status_code == 200
        assert r.json() == {"name": "library/paged", "tags": ["t01", "t02"]}
        assert 'rel="next"' in r.headers["link"]
        assert "last=t02" in r.headers["link"]
        r = c.get("/v2/library/paged/tags/list", params={"n": 2, "last": "t04"})
        assert r.json()["tags"] == ["t05"]


def test_private_repository_needs_alice(hub: Hub) -> None:
    scope = "repository:private/secret:pull"
    anon = _token(hub, scope)
    claims = jwt.decode(anon, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "private/secret", "actions": []}]
    with _client(hub, anon) as c:
        r = c.get("/v2/private/secret/manifests/1.0", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 401
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    alice = _token(hub, scope, auth=hub.creds)
    with _client(hub, alice) as c:
        r = c.get("/v2/private/secret/manifests/1.0", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 200
        assert r.content == _image(hub, "private/secret:1.0").manifest_bytes


def test_token_wrong_credentials(clean_hub: Hub) -> None:
    r = httpx.get(
        clean_hub.token_url,
        params={"service": clean_hub.service, "scope": "repository:library/alpine:pull"},
        auth=("alice", "nope"),
        timeout=10,
    )
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    assert "details" in r.json()
    log = clean_hub.tokens.requests()
    assert len(log) == 1
    assert log[0].method == "GET"
    assert log[0].path.startswith("/token?")
    assert (
        log[0].header(
            "authorization",
        )
        is not None
    )


def test_token_for_other_service_is_rejected(hub: Hub) -> None:
    r = httpx.get(
        hub.token_url,
        params={"service": "evil.example", "scope": "repository:library/alpine:pull"},
        timeout=10,
    )
    token = r.json()["token"]
    with _client(hub, token) as c:
        r = c.get("/v2/library/alpine/manifests/latest", headers={"Accept": ACCEPT_ALL})
        assert r.status_code == 401


def test_oauth_post_password_and_refresh(clean_hub: Hub) -> None:
    hub = clean_hub
    form = {
        "grant_type": "password",
        "username": "alice",
        "password": "wonderland",
        "service": hub.service,
        "scope": "repository:private/secret:pull",
        "client_id": "docker",
        "access_type": "offline",
    }
    r = httpx.post(hub.token_url, data=form, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    refresh = body["refresh_token"]
    with _client(hub, body["access_token"]) as c:
        assert (
            c.get("/v2/private/secret/manifests/1.0", headers={"Accept": ACCEPT_ALL}).status_code
            == 200
        )

    r = httpx.post(
        hub.token_url,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh,
            "service": hub.service,
            "scope": "repository:private/secret:pull",
            "client_id": "docker",
        },
        timeout=10,
    )
    assert r.status_code == 200
    claims = jwt.decode(r.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert claims["access"][0]["actions"] == ["pull"]

    bad = httpx.post(hub.token_url, data={**form, "password": "x"}, timeout=10)
    assert bad.status_code == 401
    bad = httpx.post(
        hub.token_url, data={"grant_type": "refresh_token", "refresh_token": "zz"}, timeout=10
    )
    assert bad.status_code == 401
    assert [e.method for e in hub.tokens.requests()] == ["POST"] * 4
    assert b"grant_type=password" in hub.tokens.requests()[0].body


def _check_copied_layout(layout: Path, img: BuiltImage) -> None:
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["digest"] == img.manifest_digest
    for blob in (img.config, *img.layers):
        data = blob_path(layout, blob.digest).read_bytes()
        assert len(data) == blob.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest


def test_skopeo_copy_anonymous(clean_hub: Hub, tmp_path: Path) -> None:
    hub = clean_hub
    img = _image(hub, "library/alpine:latest")
    dest = tmp_path / "copy"
    res = _skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-no-creds",
        f"docker://{hub.registry_host}/library/alpine:latest",
        f"oci:{dest}:x",
    )
    assert res.returncode == 0, res.stderr
    _check_copied_layout(dest, img)
    # skopeo got an anonymous token and fetched blobs from the CDN without Authorization
    token_reqs = hub.tokens.requests()
    assert token_reqs
    assert all(r.header("authorization") is None for r in token_reqs)
    cdn_reqs = hub.cdn.requests()
    assert {r.method for r in cdn_reqs} == {"GET"}
    assert all(r.header("authorization") is None for r in cdn_reqs)
    fetched = {r.path.rsplit("/", 2)[-2] for r in cdn_reqs}
    assert fetched == {b.digest.removeprefix("sha256:") for b in iter_blobs(img)}
    reqs = hub.wait_registry_requests(
        lambda reqs: any(p.startswith("/v2/library/alpine/blobs/") for _, p in reqs)
    )
    assert ("GET", "/v2/library/alpine/manifests/latest") in reqs


def test_skopeo_private_needs_credentials(hub: Hub, tmp_path: Path) -> None:
    src = f"docker://{hub.registry_host}/private/secret:1.0"
    res = _skopeo(
        "copy", "--src-tls-verify=false", "--src-no-creds", src, f"oci:{tmp_path / 'anon'}:x"
    )
    assert res.returncode != 0
    assert "unauthorized" in res.stderr.lower() or "denied" in res.stderr.lower(), res.stderr

    res = _skopeo(
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        "alice:wonderland",
        src,
        f"oci:{tmp_path / 'alice'}:x",
    )
    assert res.returncode == 0, res.stderr
    _check_copied_layout(tmp_path / "alice", _image(hub, "private/secret:1.0"))
