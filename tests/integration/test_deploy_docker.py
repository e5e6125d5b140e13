"""Issue 7: the Dockerfile and docker-compose.yml, built and run for real.

The session's dockerd (loopback-only network namespace, overlay2, no bridge; shared by the
deploy tests, tests/infra/deployhost.py) builds the shipped Dockerfile from a debootstrap'd
Debian base and host-built wheels (no registry, no PyPI), runs the image with host networking
(the namespace's loopback), and skopeo, run inside the same namespace, pulls through the
container from the Docker Hub stand-in (its ports forwarded in). The container binds port 80
as its non-root user: that needs the image's file capability.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.infra import require_binary
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from tests.infra.clients import DockerDaemon
    from tests.infra.deployhost import DeployHost
    from tests.infra.hub import Hub

pytestmark = [pytest.mark.integration, pytest.mark.clients]

CAP_NET_BIND_SERVICE = 1 << 10
UID = 10001


@pytest.fixture(scope="module")
def dockerd(deploy_host: DeployHost) -> DockerDaemon:
    """The session's dockerd (the hub's ports forwarded in) with the image built."""
    deploy_host.relay_image()
    return deploy_host.docker


def _inspect(dockerd: DockerDaemon, name: str) -> dict[str, object]:
    out = dockerd.docker("inspect", name).stdout
    result: dict[str, object] = json.loads(out)[0]
    return result


def _health(dockerd: DockerDaemon, name: str) -> str:
    return dockerd.docker(
        "inspect", "--format", "{{.State.Health.Status}}", name, check=False
    ).stdout.strip()


def _wait_healthy(dockerd: DockerDaemon, name: str, timeout: float = 90) -> float:
    began = time.monotonic()
    status = ""
    while time.monotonic() - began < timeout:
        status = _health(dockerd, name)
        if status == "healthy":
            return time.monotonic() - began
        if status == "unhealthy":
            break
        time.sleep(0.5)
    logs = dockerd.docker("logs", name, check=False)
    state = dockerd.docker("inspect", "--format", "{{json .State}}", name, check=False).stdout
    raise AssertionError(f"{name} is {status!r}\n{state}\n{logs.stdout}\n{logs.stderr}")


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def skopeo_in_netns(
    dockerd: DockerDaemon, tmp_path: Path, source: str
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://source oci:...`` inside dockerd's network namespace."""
    skopeo = require_binary("skopeo")
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors, no search registries\n")
    return subprocess.run(
        ["nsenter", f"--net={dockerd.netns_path}", "--", skopeo, "copy",
         "--src-tls-verify=false", "--preserve-digests",
         f"docker://{source}", f"oci:{tmp_path / 'out'}:pulled"],
        capture_output=True, text=True, timeout=300, check=True,
        env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
    )  # fmt: skip


def assert_pulled(tmp_path: Path, image: BuiltImage) -> None:
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == image.manifest_digest
    for blob in iter_blobs(image):
        path = tmp_path / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert path.stat().st_size == blob.size


def test_image_is_small_and_holds_no_build_leftovers(dockerd: DockerDaemon) -> None:
    image = _inspect(dockerd, "vpsrelay:test")
    config = image["Config"]
    assert isinstance(config, dict)
    assert config["User"] == "vpsrelay:vpsrelay"
    assert config["Healthcheck"]["Test"] == ["CMD", "vpsrelay", "healthcheck"]
    assert "/data" in config["Volumes"]
    assert config["Entrypoint"] == ["vpsrelay"]
    # The runtime stage adds the virtualenv only (84 MiB with the ACME, metrics, auth and
    # S3-signing libraries; botocore is about 30 of it), no wheels, sources or compilers.
    added = int(str(image["Size"])) - int(str(_base_size(dockerd)))
    assert 0 < added < 90 * 1024 * 1024, added
    listing = dockerd.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", "vpsrelay:test", "-c",
        "ls -d /wheels /src /opt/build-venv 2>/dev/null; command -v gcc; true",
    ).stdout  # fmt: skip
    assert listing.strip() == "", listing


def _base_size(dockerd: DockerDaemon) -> int:
    from tests.infra.image import base_image_tag

    return int(dockerd.docker("image", "inspect", "--format", "{{.Size}}", base_image_tag()).stdout)


def test_container_binds_80_as_non_root_turns_healthy_and_serves_a_pull(
    dockerd: DockerDaemon, clean_hub: Hub, tmp_path: Path
) -> None:
    name = "vpsrelay-run"
    dockerd.docker(
        "run", "--detach", "--name", name, "--network", "host",
        "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
        "--health-interval", "1s", "--health-start-period", "30s",
        "--env", "VPSRELAY_SERVER__LISTEN=127.0.0.1:80",
        "--env", f"VPSRELAY_UPSTREAMS=docker.io={clean_hub.registry_url}",
        # The test CDN lives on loopback, which redirect protection refuses by default.
        "--env", f"VPSRELAY_ACCESS__REDIRECT_ALLOW={clean_hub.cdn.url}",
        "--volume", "vpsrelay-run-data:/data",
        "vpsrelay:test",
    )  # fmt: skip
    try:
        seconds = _wait_healthy(dockerd, name)
        print(f"healthy after {seconds:.1f}s")
        pid = int(dockerd.docker("inspect", "--format", "{{.State.Pid}}", name).stdout)
        status = _proc_status(pid)
        assert status["Uid"].split()[:2] == [str(UID), str(UID)]
        # The only privilege: binding ports below 1024.
        assert int(status["CapEff"], 16) == CAP_NET_BIND_SERVICE
        assert int(status["CapPrm"], 16) == CAP_NET_BIND_SERVICE

        health = _inspect(dockerd, name)["State"]
        assert isinstance(health, dict)
        last = health["Health"]["Log"][-1]
        assert last["ExitCode"] == 0
        report = json.loads(last["Output"].split(": 200 ", 1)[1])
        assert report["status"] == "ok"

        image = clean_hub.images["library/alpine:latest"]
        assert isinstance(image, BuiltImage)
        skopeo_in_netns(dockerd, tmp_path, "127.0.0.1:80/library/alpine:latest")
        assert_pulled(tmp_path, image)
        assert clean_hub.cdn.requests(), "blobs should have come through the CDN hop"

        # docker stop sends SIGTERM: the relay stops cleanly, well within the grace period.
        began = time.monotonic()
        dockerd.docker("stop", "--time", "30", name)
        assert time.monotonic() - began < 10
        state = _inspect(dockerd, name)["State"]
        assert isinstance(state, dict)
        assert state["ExitCode"] == 0
        assert "received SIGTERM, stopping" in dockerd.docker("logs", name).stderr
    finally:
        dockerd.docker("rm", "--force", "--volumes", name, check=False)
        dockerd.docker("volume", "rm", "vpsrelay-run-data", check=False)


def test_the_capability_stays_within_the_bounding_set(dockerd: DockerDaemon) -> None:
    """The file capability grants nothing the container's bounding set lacks: with every
    capability dropped the kernel refuses to run the capability-marked interpreter at all
    (the README tells `--cap-drop ALL` users to add NET_BIND_SERVICE back)."""
    result = dockerd.docker(
        "run", "--rm", "--network", "host", "--cap-drop", "ALL",
        "--env", "VPSRELAY_SERVER__LISTEN=127.0.0.1:80", "vpsrelay:test",
        check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "operation not permitted" in result.stderr, result


# --- docker-compose.yml ------------------------------------------------------------------


def _compose() -> list[str]:
    return [require_binary("docker-compose")]


def _compose_run(
    args: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*_compose(), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _project(tmp_path: Path, env_lines: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO_ROOT / "docker-compose.yml", project / "docker-compose.yml")
    shutil.copy2(REPO_ROOT / "Caddyfile.alt", project / "Caddyfile.alt")
    (project / ".env").write_text(env_lines)
    return project


NO_DAEMON = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def _volume(entry: str | dict[str, str]) -> tuple[str, str]:
    """(source, target) from compose v1's `src:dst:mode` string or v2's long form."""
    if isinstance(entry, str):
        source, target = entry.split(":")[:2]
        return source, target
    return entry["source"], entry["target"]


def test_compose_config_validates_both_profiles(tmp_path: Path) -> None:
    project = _project(
        tmp_path, "VPSRELAY_DOMAIN=relay.example.com\nVPSRELAY_EMAIL=you@example.com\n"
    )
    default = yaml.safe_load(_compose_run(["config"], project, NO_DAEMON).stdout)
    relay = default["services"]["relay"]
    assert relay["environment"]["VPSRELAY_TLS__DOMAINS"] == "relay.example.com"
    assert relay["environment"]["VPSRELAY_TLS__EMAIL"] == "you@example.com"
    assert relay["restart"] == "unless-stopped"
    assert relay["logging"]["options"] == {"max-size": "10m", "max-file": "5"}
    assert relay["healthcheck"]["test"] == ["CMD", "vpsrelay", "healthcheck"]
    assert _volume(relay["volumes"][0]) == ("vpsrelay-data", "/data")
    assert {p["published"] for p in relay["ports"]} == {80, 443}
    # Only the direct-TLS relay runs without a profile; Caddy and its plain relay need one.
    assert "profiles" not in relay
    for name in ("relay-plain", "caddy"):
        assert default["services"][name]["profiles"] == ["caddy"]
    caddy = yaml.safe_load(
        _compose_run(["--profile", "caddy", "config"], project, NO_DAEMON).stdout
    )["services"]["caddy"]
    assert caddy["environment"]["VPSRELAY_UPSTREAM"] == "h2c://relay-plain:5000"
    assert _volume(caddy["volumes"][0]) == (str(project / "Caddyfile.alt"), "/etc/caddy/Caddyfile")
    assert caddy["depends_on"] == {"relay-plain": {"condition": "service_healthy"}}


def test_compose_config_names_the_missing_env(tmp_path: Path) -> None:
    project = _project(tmp_path, "VPSRELAY_EMAIL=you@example.com\n")
    result = _compose_run(["config", "-q"], project, NO_DAEMON, check=False)
    assert result.returncode != 0
    assert "set VPSRELAY_DOMAIN in .env" in result.stderr


def test_compose_up_brings_the_relay_up_and_it_serves_a_pull(
    dockerd: DockerDaemon, clean_hub: Hub, tmp_path: Path
) -> None:
    project = _project(tmp_path, "VPSRELAY_DOMAIN=relay.test\nVPSRELAY_EMAIL=ops@relay.test\n")
    # The test override: the image built above, the namespace's loopback, the test upstream,
    # plain HTTP (TLS is another issue's), and a fast health check.
    (project / "docker-compose.override.yml").write_text(
        json.dumps(
            {
                "services": {
                    "relay": {
                        "image": "vpsrelay:test",
                        "network_mode": "host",
                        "environment": {
                            "VPSRELAY_SERVER__LISTEN": "127.0.0.1:8080",
                            "VPSRELAY_UPSTREAMS": f"docker.io={clean_hub.registry_url}",
                            "VPSRELAY_ACCESS__REDIRECT_ALLOW": clean_hub.cdn.url,
                            "VPSRELAY_TLS__DOMAINS": "",
                            "VPSRELAY_TLS__EMAIL": "",
                            "VPSRELAY_SERVER__PUBLIC_URL": "",
                        },
                        "healthcheck": {"interval": "1s"},
                    }
                },
            }
        )
    )
    env = {"DOCKER_HOST": dockerd.host, "COMPOSE_PROJECT_NAME": "vrtest"}
    # The test daemon has host networking only, where compose v1 refuses published ports
    # (v2 ignores them): run the merged configuration (shipped file + override) minus `ports`.
    merged = yaml.safe_load(_compose_run(["config"], project, NO_DAEMON).stdout)
    del merged["services"]["relay"]["ports"]
    (project / "merged.yml").write_text(json.dumps(merged))
    env["COMPOSE_FILE"] = "merged.yml"
    try:
        _compose_run(["up", "-d", "--no-build", "relay"], project, env)
        container = _compose_run(["ps", "-q", "relay"], project, env).stdout.strip()
        seconds = _wait_healthy(dockerd, container)
        print(f"compose relay healthy after {seconds:.1f}s")
        info = _inspect(dockerd, container)
        host_config = info["HostConfig"]
        assert isinstance(host_config, dict)
        assert host_config["RestartPolicy"]["Name"] == "unless-stopped"
        assert host_config["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-file": "5", "max-size": "10m"},
        }
        mounts = info["Mounts"]
        assert isinstance(mounts, list)
        assert [m["Name"] for m in mounts if m["Destination"] == "/data"] == [
            "vrtest_vpsrelay-data"
        ]
        image = clean_hub.images["library/alpine:v2s2"]
        assert isinstance(image, BuiltImage)
        skopeo_in_netns(dockerd, tmp_path, "127.0.0.1:8080/library/alpine:v2s2")
        assert_pulled(tmp_path, image)
    finally:
        _compose_run(["down", "--volumes", "--timeout", "30"], project, env, check=False)
