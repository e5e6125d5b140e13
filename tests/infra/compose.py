"""A copy of the shipped compose project, driven with the `docker-compose` CLI against a test
dockerd.

The test dockerd has host networking only (no bridge), where compose v1 refuses published
ports: the project runs the merged configuration (the shipped file plus the test's override,
as `docker-compose config` prints it) with `ports` removed, through `COMPOSE_FILE`. Every other
command is the one the README gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING

import yaml

from tests.infra.binaries import require_binary
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.clients import DockerDaemon

NO_DAEMON = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
SHIPPED = ("docker-compose.yml", "Caddyfile.alt")


class ComposeProject:
    def __init__(
        self,
        directory: Path,
        dockerd: DockerDaemon,
        *,
        dotenv: dict[str, str],
        override: dict[str, object],
        name: str,
        profile: str | None = None,
    ) -> None:
        self.compose = require_binary("docker-compose")
        self.directory = directory
        self.dockerd = dockerd
        self.profile = profile
        directory.mkdir(parents=True)
        for file in SHIPPED:
            shutil.copy2(REPO_ROOT / file, directory / file)
        (directory / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
        (directory / "docker-compose.override.yml").write_text(json.dumps(override, indent=2))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))},
            "DOCKER_HOST": dockerd.host,
            "DOCKER_CONFIG": str(dockerd.docker_config_dir),
            "COMPOSE_PROJECT_NAME": name,
        }
        merged = yaml.safe_load(self.run("config", env=NO_DAEMON).stdout)
        for service in merged["services"].values():
            service.pop("ports", None)
        (directory / "merged.yml").write_text(json.dumps(merged, indent=2))
        self.env["COMPOSE_FILE"] = "merged.yml"

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 240,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        profile = ["--profile", self.profile] if self.profile else []
        began = time.monotonic()
        proc = subprocess.run(
            [self.compose, *profile, *args], cwd=self.directory,
            env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        print(f"[compose {' '.join(args)}] rc={proc.returncode} {time.monotonic() - began:.1f}s")
        if check and proc.returncode != 0:
            raise AssertionError(
                f"compose {args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def container(self, service: str) -> str:
        return self.run("ps", "-q", service).stdout.strip()

    def wait_healthy(self, service: str, timeout: float = 120) -> float:
        """Seconds until the service's health check says healthy (bounded)."""
        began = time.monotonic()
        status = ""
        container = ""
        while time.monotonic() - began < timeout:
            container = container or self.container(service)
            if container:
                status = self.dockerd.docker(
                    "inspect", "--format", "{{.State.Health.Status}}", container, check=False
                ).stdout.strip()
                if status == "healthy":
                    return time.monotonic() - began
                if status == "unhealthy":
                    break
            time.sleep(0.5)
        raise AssertionError(f"{service} is {status!r}:\n{self.logs(service)}")

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", service, check=False).stdout[-6000:]

    def down(self) -> None:
        self.run("down", "--volumes", "--timeout", "30", check=False)
