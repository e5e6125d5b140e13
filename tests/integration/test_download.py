"""Issue 17: images as files. The relay's tar loads in dockerd and podman, reproduces the
image for skopeo, picks platforms, holds several images, and resumes byte-exactly."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.clients import DeadPort, DockerDaemon, Podman
from tests.infra.limitsdb import budget_counters
from tests.infra.oci import BuiltImage, BuiltIndex, build_image
from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.tmpfs import mounted_tmpfs

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration]

TIMEOUT = httpx.Timeout(60.0)
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def relay(hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    with RelayProcess(
        tmp_path_factory.mktemp("relay"), "--upstream", f"docker.io={hub.registry_url}"
    ) as process:
        yield process


def _image(hub: Hub, ref: str) -> BuiltImage:
    image = hub.images[ref]
    assert isinstance(image, BuiltImage)
    return image


def _arm64(hub: Hub) -> BuiltImage:
    index = hub.images["library/multi:latest"]
    assert isinstance(index, BuiltIndex)
    (arm,) = [i for i in index.images if json.loads(_config(i))["architecture"] == "arm64"]
    return arm


def _config(image: BuiltImage) -> bytes:
    return (image.layout / "blobs" / "sha256" / image.config.digest.split(":")[1]).read_bytes()


def download(url: str, path: Path, **kwargs: object) -> httpx.Response:
    """GET `url` into `path` (streamed); the response, its body read."""
    with (
        httpx.stream("GET", url, timeout=TIMEOUT, **kwargs) as response,  # type: ignore[arg-type]
        path.open("wb") as file,
    ):
        if response.status_code in (200, 206):
            for chunk in response.iter_raw():
                file.write(chunk)
        else:
            response.read()
    return response


@pytest.mark.clients
def test_the_tar_loads_in_dockerd_single_multi_arch_and_two_images(
    relay: RelayProcess, hub: Hub, tmp_path: Path
) -> None:
    alpine, tool, arm = (
        _image(hub, "library/alpine:latest"),
        _image(hub, "someuser/tool:1.0"),
        _arm64(hub),
    )
    single, multi, both = tmp_path / "alpine.tar", tmp_path / "multi.tar", tmp_path / "both.tar"
    response = download(f"{relay.url}/download/alpine:latest", single)
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == (
        'attachment; filename="alpine_latest_linux-amd64.tar"'
    )
    assert int(response.headers["content-length"]) == single.stat().st_size
    response = download(f"{relay.url}/download/multi?platform=linux/arm64", multi)
    assert response.status_code == 200, response.text
    response = download(f"{relay.url}/download?image=alpine&image=someuser/tool:1.0", both)
    assert response.status_code == 200, response.text
    with DockerDaemon(tmp_path / "dockerd", forward_ports=[]) as dockerd:
        assert dockerd.netns_interfaces() == ["lo"]
        loaded = dockerd.docker("load", "-i", str(single), timeout=120).stdout
        assert "Loaded image: alpine:latest" in loaded
        inspect = ("image", "inspect", "--format", "{{.Id}} {{.Architecture}}")
        assert dockerd.docker(*inspect, "alpine:latest").stdout.split() == [
            alpine.config.digest, "amd64",
        ]  # fmt: skip
        dockerd.docker("rmi", "alpine:latest")
        assert "Loaded image: multi:latest" in dockerd.docker("load", "-i", str(multi)).stdout
        assert dockerd.docker(*inspect, "multi:latest").stdout.split() == [
            arm.config.digest, "arm64",
        ]  # fmt: skip
        loaded = dockerd.docker("load", "-i", str(both)).stdout
        assert "Loaded image: alpine:latest" in loaded
        assert "Loaded image: someuser/tool:1.0" in loaded
        assert dockerd.docker(*inspect, "someuser/tool:1.0").stdout.split()[0] == tool.config.digest
        assert dockerd.docker(*inspect, "alpine:latest").stdout.split()[0] == alpine.config.digest


@pytest.mark.clients
def test_the_tar_loads_in_podman(relay: RelayProcess, hub: Hub, tmp_path: Path) -> None:
    alpine, tool = _image(hub, "library/alpine:latest"), _image(hub, "someuser/tool:1.0")
    single, both = tmp_path / "alpine.tar", tmp_path / "both.tar"
    response = download(f"{relay.url}/download?image=alpine&image=someuser/tool:1.0", both)
    assert response.status_code == 200, response.text
    assert download(f"{relay.url}/download/someuser/tool:1.0", single).status_code == 200
    with (
        DeadPort() as dead,
        Podman(tmp_path / "podman", mirror=relay.url, dead_location=dead.url) as podman,
    ):
        loaded = podman.podman("load", "-i", str(single), timeout=120).stdout
        assert "docker.io/someuser/tool:1.0" in loaded, loaded
        podman.podman("rmi", "docker.io/someuser/tool:1.0")
        loaded = podman.podman("load", "-i", str(both), timeout=120).stdout
        assert "docker.io/library/alpine:latest" in loaded, loaded
        assert "docker.io/someuser/tool:1.0" in loaded, loaded
        ids = podman.podman(
            "image", "inspect", "--format", "{{.Id}}",
            "docker.io/library/alpine:latest", "docker.io/someuser/tool:1.0",
        ).stdout.split()  # fmt: skip
    assert ids == [alpine.config.digest.split(":")[1], tool.config.digest.split(":")[1]]


def test_skopeo_reproduces_the_image_from_both_layouts(
    relay: RelayProcess, hub: Hub, tmp_path: Path
) -> None:
    skopeo = require_binary("skopeo")
    alpine = _image(hub, "library/alpine:latest")
    tar = tmp_path / "alpine.tar"
    assert download(f"{relay.url}/download/alpine:latest", tar).status_code == 200
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120, "env": env}
    # The OCI layout in the tar: the very manifest, config and layers of the registry.
    subprocess.run([skopeo, "copy", f"oci-archive:{tar}:latest", f"dir:{tmp_path / 'oci'}"], **run)  # type: ignore[call-overload]
    copied = json.loads((tmp_path / "oci" / "manifest.json").read_text())
    assert (tmp_path / "oci" / "manifest.json").read_bytes() == alpine.manifest_bytes
    assert [layer["digest"] for layer in copied["layers"]] == [b.digest for b in alpine.layers]
    for layer in alpine.layers:
        data = (tmp_path / "oci" / layer.digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    # The docker-archive layout: the same config, so the same image ID and layer diff IDs.
    subprocess.run([skopeo, "copy", f"docker-archive:{tar}", f"dir:{tmp_path / 'docker'}"], **run)  # type: ignore[call-overload]
    manifest = json.loads((tmp_path / "docker" / "manifest.json").read_text())
    assert manifest["config"]["digest"] == alpine.config.digest
    diff_ids = json.loads(_config(alpine))["rootfs"]["diff_ids"]
    digests = [layer["digest"] for layer in manifest["layers"]]
    assert len(digests) == len(alpine.layers)
    # skopeo keeps each layer as the tar has it (compressed: the registry's digest) or
    # names it by its uncompressed digest: both are the image's own.
    for digest, layer, diff_id in zip(digests, alpine.layers, diff_ids, strict=True):
        assert digest in (layer.digest, diff_id)


def test_range_requests_are_slices_of_the_whole(relay: RelayProcess, tmp_path: Path) -> None:
    url = f"{relay.url}/download/multi?platform=linux/arm64"
    whole = httpx.get(url, timeout=TIMEOUT)
    assert whole.status_code == 200
    etag, size = whole.headers["etag"], len(whole.content)
    assert whole.headers["accept-ranges"] == "bytes"
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
        assert {"manifest.json", "index.json", "oci-layout", "repositories"} <= set(tar.getnames())
    for start, end in [(0, 10), (511, 513), (1000, size - 1), (size - 1, size - 1)]:
        part = httpx.get(url, headers={"range": f"bytes={start}-{end}"}, timeout=TIMEOUT)
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert part.content == whole.content[start : end + 1]
        assert part.headers["etag"] == etag
    # A browser's resume names the tar it has: another tar's ETag gets the whole one.
    stale = httpx.get(url, headers={"range": "bytes=10-", "if-range": '"old"'}, timeout=TIMEOUT)
    assert stale.status_code == 200
    assert stale.content == whole.content
    head = httpx.head(url, timeout=TIMEOUT)
    assert (head.status_code, head.headers["content-length"]) == (200, str(size))


def test_errors_come_before_the_first_byte(relay: RelayProcess) -> None:
    missing = httpx.get(f"{relay.url}/download/nosuchimage:1", timeout=TIMEOUT)
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/plain")
    assert "manifest unknown" in missing.text
    platform = httpx.get(
        f"{relay.url}/download/multi?platform=linux/s390x",
        headers={"accept": "application/json"},
        timeout=TIMEOUT,
    )
    assert platform.status_code == 404
    error = platform.json()["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert "linux/amd64" in error["message"]
    assert "linux/arm64" in error["message"]
    bad = httpx.get(f"{relay.url}/download/alpine?platform=linux", timeout=TIMEOUT)
    assert bad.status_code == 400


def test_a_docker_v2s2_image_in_both_layouts(relay: RelayProcess, hub: Hub, tmp_path: Path) -> None:
    """OCI layout readers take OCI manifests only: a Docker schema 2 image is listed in
    `index.json` as its OCI equal, with the very config and layers."""
    skopeo = require_binary("skopeo")
    v2s2 = _image(hub, "library/alpine:v2s2")
    tar = tmp_path / "v2s2.tar"
    assert download(f"{relay.url}/download/alpine:v2s2", tar).status_code == 200
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    for source, out in ((f"oci-archive:{tar}:v2s2", "oci"), (f"docker-archive:{tar}", "docker")):
        subprocess.run(
            [skopeo, "copy", source, f"dir:{tmp_path / out}"],
            check=True, capture_output=True, timeout=120, env=env,
        )  # fmt: skip
    copied = json.loads((tmp_path / "oci" / "manifest.json").read_text())
    original = json.loads(v2s2.manifest_bytes)
    assert copied["config"]["digest"] == original["config"]["digest"]
    assert [d["digest"] for d in copied["layers"]] == [d["digest"] for d in original["layers"]]
    docker = json.loads((tmp_path / "docker" / "manifest.json").read_text())
    assert docker["config"]["digest"] == original["config"]["digest"]


def test_vpsrelay_save_says_what_went_wrong(relay: RelayProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "vpsrelay", "save", "nosuchimage:1", "-o", str(tmp_path / "x.tar"),
         "--relay", relay.url],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "the relay answered 404: manifest unknown" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.tar").exists()


# --- 300 MiB: cut, resumed with curl -C -, stable, bounded memory ------------------------------


def test_big_image_resumes_with_curl_and_is_stable(hub: Hub, tmp_path: Path) -> None:
    curl = require_binary("curl")
    big = _image(hub, "library/big:latest")
    with mounted_tmpfs(tmp_path / "tmpfs", "1400m") as fast:
        with RelayProcess(fast / "relay", "--upstream", f"docker.io={hub.registry_url}") as relay:
            url = f"{relay.url}/download/big:latest"
            before = relay.rss_bytes()
            whole = fast / "whole.tar"
            subprocess.run([curl, "-sS", "-f", "-o", str(whole), url], check=True, timeout=300)
            size = whole.stat().st_size
            assert size > sum(layer.size for layer in big.layers)
            whole_sha = _sha256(whole)
            whole.unlink()
            # Cut after 100 MiB: curl's output is taken until then, and curl is killed.
            partial = fast / "resumed.tar"
            with (
                subprocess.Popen([curl, "-sS", url], stdout=subprocess.PIPE) as cut,
                partial.open("wb") as file,
            ):
                assert cut.stdout is not None
                left = 100 * MiB
                while left:
                    chunk = cut.stdout.read(min(left, MiB))
                    assert chunk, "curl ended before 100 MiB"
                    file.write(chunk)
                    left -= len(chunk)
                cut.kill()
            assert partial.stat().st_size == 100 * MiB
            subprocess.run(
                [curl, "-sS", "-f", "-C", "-", "-o", str(partial), url], check=True, timeout=300
            )
            assert partial.stat().st_size == size
            assert _sha256(partial) == whole_sha
            partial.unlink()
            again = fast / "again.tar"
            subprocess.run([curl, "-sS", "-f", "-o", str(again), url], check=True, timeout=300)
            assert _sha256(again) == whole_sha
            growth = relay.peak_rss_bytes() - before
        print(f"tar {size} bytes, relay RSS growth {growth / MiB:.1f} MiB")  # for the log
        assert growth < 64 * MiB, f"relay RSS grew by {growth / MiB:.1f} MiB"
        with tarfile.open(again) as tar:
            names = tar.getnames()
        assert f"blobs/sha256/{big.layers[-1].digest.split(':')[1]}" in names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# --- access control and budgets ---------------------------------------------------------------


def test_private_repository_needs_credentials(relay: RelayProcess, hub: Hub) -> None:
    url = f"{relay.url}/download/private/secret:1.0"
    anonymous = httpx.get(url, timeout=TIMEOUT)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Basic ")
    assert b"the cake" not in anonymous.content
    wrong = httpx.get(url, auth=(hub.creds[0], "wrong password"), timeout=TIMEOUT)
    assert wrong.status_code == 401
    owner = httpx.get(url, auth=hub.creds, timeout=TIMEOUT)
    assert owner.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(owner.content)) as tar:
        assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == [  # type: ignore[arg-type]
            "docker.io/private/secret:1.0"
        ]


def test_relay_with_access_control(hub: Hub, tmp_path: Path) -> None:
    import bcrypt

    user_hash = bcrypt.hashpw(b"bob's password", bcrypt.gensalt(rounds=4)).decode()
    env = {"VPSRELAY_AUTH__ENABLED": "true", "VPSRELAY_AUTH__USERS": f"bob:{user_hash}"}
    with RelayProcess(tmp_path, "--upstream", f"docker.io={hub.registry_url}", env=env) as relay:
        url = f"{relay.url}/download/alpine:latest"
        assert httpx.get(url, timeout=TIMEOUT).status_code == 401
        assert httpx.get(url, auth=("bob", "nope"), timeout=TIMEOUT).status_code == 401
        allowed = httpx.get(url, auth=("bob", "bob's password"), timeout=TIMEOUT)
        assert allowed.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(allowed.content)) as tar:
            assert "manifest.json" in tar.getnames()


def test_budgets_count_the_tar_bytes(hub: Hub, tmp_path: Path) -> None:
    alpine = _image(hub, "library/alpine:latest")
    args = ("--upstream", f"docker.io={hub.registry_url}")
    env = {"VPSRELAY_LIMITS__BUDGET_DAILY": "10MiB"}
    with RelayProcess(tmp_path / "a", *args, env=env) as relay:
        answer = httpx.get(f"{relay.url}/download/alpine", timeout=TIMEOUT)
        assert answer.status_code == 200
        ranged = httpx.get(
            f"{relay.url}/download/alpine", headers={"range": "bytes=0-99"}, timeout=TIMEOUT
        )
        assert ranged.status_code == 206
    counters = budget_counters(tmp_path / "a" / "data")
    # What the client got, the tar's every byte (not the blobs read to check a range).
    sent = len(answer.content) + 100
    assert sorted(counters.values()) == [sent, sent]  # the day's, the month's
    # A budget the image does not fit in: refused before the first byte.
    env = {"VPSRELAY_LIMITS__BUDGET_DAILY": str(alpine.config.size - 1)}
    with RelayProcess(tmp_path / "b", *args, env=env) as relay:
        refused = httpx.get(f"{relay.url}/download/alpine", timeout=TIMEOUT)
        assert refused.status_code == 429
        assert "retry-after" in refused.headers


def test_downloads_can_be_disabled(hub: Hub, tmp_path: Path) -> None:
    env = {"VPSRELAY_DOWNLOAD__ENABLED": "false"}
    with RelayProcess(tmp_path, "--upstream", f"docker.io={hub.registry_url}", env=env) as relay:
        assert httpx.get(f"{relay.url}/download/alpine", timeout=TIMEOUT).status_code == 404
        page = httpx.get(f"{relay.url}/", timeout=TIMEOUT)
        assert 'action="/download"' not in page.text
        assert "form-action 'none'" in page.headers["content-security-policy"]


# --- the landing page form, in Chromium ---------------------------------------------------------


def test_the_landing_page_form_downloads_in_chromium(
    relay: RelayProcess, hub: Hub, tmp_path: Path
) -> None:
    from tests.infra.cdp import chromium

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium() as (browser, page):
        browser.call(
            "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads),
            eventsEnabled=True,
        )  # fmt: skip
        page.call("Page.enable")
        page.call("Page.navigate", url=f"{relay.url}/")
        page.wait_event("Page.loadEventFired")
        page.evaluate(
            "(() => { const image = document.getElementById('download-image');"
            " image.value = 'multi:latest'; image.dispatchEvent(new Event('input'));"
            " const platform = document.getElementById('download-platform');"
            " platform.value = 'linux/arm64'; platform.dispatchEvent(new Event('input')); })()"
        )
        curl = page.evaluate("document.getElementById('download-curl').textContent")
        page.evaluate("document.getElementById('download').scrollIntoView()")
        page.screenshot(tmp_path / "download-form.png")
        page.evaluate("document.getElementById('download-button').click()")
        done = browser.wait_event("Browser.downloadWillBegin")
        assert done["suggestedFilename"] == "multi_latest_linux-arm64.tar"
        for _ in range(600):  # at most 60 s
            progress = browser.wait_event("Browser.downloadProgress")
            if progress["state"] != "inProgress":
                break
        assert progress["state"] == "completed"
    saved = downloads / "multi_latest_linux-arm64.tar"
    expected = httpx.get(f"{relay.url}/download/multi?platform=linux/arm64", timeout=TIMEOUT)
    assert saved.read_bytes() == expected.content
    assert (tmp_path / "download-form.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curl == (
        f"curl -C - -o multi_latest.tar '{relay.url}/download?image=multi%3Alatest"
        "&platform=linux%2Farm64'"
    )
    # The command the page shows gives the same bytes.
    shown = tmp_path / "from-curl.tar"
    command = [require_binary("curl"), "-sS", "-f", "-C", "-", "-o", str(shown)]
    subprocess.run([*command, curl.split("'")[1]], check=True, timeout=60)
    assert shown.read_bytes() == expected.content


# --- vpsrelay save: interrupted, resumed, loaded ------------------------------------------------

SAVE_LAYER_BYTES = 40 * MiB


def _save(relay: RelayProcess, out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "vpsrelay", "save", "saveme:1", "-o", str(out)]
    with log.open("ab") as sink:
        return subprocess.Popen(
            [*command, "--relay", relay.url, *extra], stdout=sink, stderr=sink, env=env
        )


@pytest.mark.clients
def test_vpsrelay_save_resumes_after_a_kill_and_the_tar_loads(hub: Hub, tmp_path: Path) -> None:
    image = build_image(
        tmp_path / "oci", "1", files={"etc/save": b"save me\n"}, extra_layer_bytes=SAVE_LAYER_BYTES
    )
    hub.push_image(image, "library/saveme:1")
    # Slow enough (8 MiB/s per blob) to be killed halfway.
    env = {"VPSRELAY_LIMITS__STREAM_BYTES_PER_SECOND": "8MiB"}
    with RelayProcess(
        tmp_path / "relay", "--upstream", f"docker.io={hub.registry_url}", env=env
    ) as relay:
        out, log = tmp_path / "saveme.tar", tmp_path / "save.log"
        first = _save(relay, out, log)
        for _ in range(600):  # at most 60 s
            if out.exists() and out.stat().st_size > 8 * MiB:
                break
            time.sleep(0.1)
        first.kill()
        first.wait(10)
        cut = out.stat().st_size
        assert 8 * MiB < cut < SAVE_LAYER_BYTES
        assert (tmp_path / "saveme.tar.etag").exists()
        second = _save(relay, out, log)
        assert second.wait(120) == 0, log.read_text()
        assert not (tmp_path / "saveme.tar.etag").exists()
        access = [line for line in relay.log_text().splitlines() if 'path="/download?' in line]
        assert any("status=206" in line for line in access), access
    assert "MiB/s" in log.read_text()
    assert f"{out}: {out.stat().st_size} bytes" in log.read_text()
    with (
        DeadPort() as dead,
        Podman(tmp_path / "podman", mirror=relay.url, dead_location=dead.url) as podman,
    ):
        loaded = podman.podman("load", "-i", str(out), timeout=120).stdout
        assert "docker.io/library/saveme:1" in loaded, loaded
        found = podman.podman(
            "image", "inspect", "--format", "{{.Id}}", "docker.io/library/saveme:1"
        )
    assert found.stdout.strip() == image.config.digest.split(":")[1]
