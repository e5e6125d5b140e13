"""Issue 7: the Ansible playbook, linted and run for real against this machine (venv mode).

PID 1 here is not systemd, so the role's test-only `vpsrelay_service_manager: process` starts
the relay with start-stop-daemon instead of a unit. Everything the role writes goes under a
private directory in /tmp; its user is `vpsrelay-test`, removed afterwards. pip installs
offline from wheels built here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.ansible import ANSIBLE_DIR, RECAP, ansible_env
from tests.infra.deployhost import DOMAIN, TRUST, upstream_env
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage
from tests.infra.pebble import free_port
from tests.infra.relay import REPO_ROOT

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.infra.deployhost import DeployHost
    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
USER = "vpsrelay-test"


def test_syntax_check_and_lint_production_profile(tmp_path: Path) -> None:
    playbook = require_binary("ansible-playbook")
    env = ansible_env(tmp_path)
    subprocess.run(
        [playbook, "--syntax-check", "-i", "localhost,", "site.yml"],
        cwd=ANSIBLE_DIR, env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent)) or require_binary(
        "ansible-lint"
    )
    result = subprocess.run(
        [lint, "--offline", "--profile", "production", "site.yml"],
        cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stderr + result.stdout


def test_role_unit_template_is_the_shipped_unit() -> None:
    """deploy/systemd/vpsrelay.service and the role's template, rendered with the role's
    defaults, are the same unit."""
    jinja2 = pytest.importorskip("jinja2")
    import yaml

    defaults = yaml.safe_load((ANSIBLE_DIR / "roles/vpsrelay/defaults/main.yml").read_text())
    template = (ANSIBLE_DIR / "roles/vpsrelay/templates/vpsrelay.service.j2").read_text()
    rendered = jinja2.Template(template, trim_blocks=True).render(
        **defaults, ansible_managed="managed"
    )

    def unit(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    assert unit(rendered) == unit((REPO_ROOT / "deploy/systemd/vpsrelay.service").read_text())


@pytest.fixture
def base() -> Iterator[Path]:
    """A private directory the role's unprivileged user can traverse."""
    directory = Path(tempfile.mkdtemp(prefix="vr-ansible-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        pidfile = directory / "data" / "vpsrelay.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(directory).encode() in cmdline:  # the relay this test started, nothing else
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["userdel", USER], capture_output=True, check=False)
        subprocess.run(["groupdel", USER], capture_output=True, check=False)
        shutil.rmtree(directory, ignore_errors=True)


def _play(
    base: Path, extra_vars: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], tuple[int, ...]]:
    playbook = require_binary("ansible-playbook")
    result = subprocess.run(
        [playbook, "-i", "localhost,", "-c", "local", "-e", f"@{extra_vars}", *args, "site.yml"],
        cwd=ANSIBLE_DIR, env={**ansible_env(base), **(env or {})}, capture_output=True,
        text=True, timeout=600,
        check=False,
    )  # fmt: skip
    match = RECAP.search(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert match, result.stdout[-6000:]
    return result, tuple(int(n) for n in match.groups())


def test_playbook_venv_mode_runs_serves_and_is_idempotent(
    base: Path, clean_hub: Hub, tmp_path: Path
) -> None:
    require_binary("start-stop-daemon")
    wheelhouse = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheelhouse),
         str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    port = free_port()
    extra_vars = base / "vars.json"
    extra_vars.write_text(
        json.dumps(
            {
                "ansible_python_interpreter": "/usr/bin/python3",
                "vpsrelay_install_method": "venv",
                "vpsrelay_service_manager": "process",
                "vpsrelay_user": USER,
                "vpsrelay_group": USER,
                "vpsrelay_config_dir": str(base / "etc"),
                "vpsrelay_data_dir": str(base / "data"),
                "vpsrelay_venv_dir": str(base / "venv"),
                "vpsrelay_pip_environment": {
                    "PIP_NO_INDEX": "1",
                    "PIP_FIND_LINKS": str(wheelhouse),
                },
                "vpsrelay_listen": [f"127.0.0.1:{port}"],
                "vpsrelay_upstreams": {"docker.io": clean_hub.registry_url},
                # The test CDN is on loopback, which redirect protection refuses by default.
                "vpsrelay_extra_env": {"VPSRELAY_ACCESS__REDIRECT_ALLOW": clean_hub.cdn.url},
                "vpsrelay_graceful_timeout": 5,
                # This machine's kernel settings are not the test's to change.
                "vpsrelay_tune_kernel": False,
            }
        )
    )
    _, (ok, changed, _, failed) = _play(base, extra_vars)
    assert failed == 0
    assert changed > 0

    health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    pid = int((base / "data" / "vpsrelay.pid").read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    uid = subprocess.run(["id", "-u", USER], capture_output=True, text=True, check=True).stdout
    assert re.search(rf"^Uid:\s+{uid.strip()}\s", status, re.M), status

    image = clean_hub.images["library/alpine:latest"]
    assert isinstance(image, BuiltImage)
    conf = tmp_path / "registries.conf"
    conf.write_text("# no mirrors\n")
    subprocess.run(
        [require_binary("skopeo"), "copy", "--src-tls-verify=false", "--preserve-digests",
         f"docker://127.0.0.1:{port}/library/alpine:latest", f"oci:{tmp_path / 'out'}:pulled"],
        check=True, capture_output=True, timeout=300,
        env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
    )  # fmt: skip
    for blob in iter_blobs(image):
        path = tmp_path / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert path.stat().st_size == blob.size

    second, (_, changed_again, _, failed_again) = _play(base, extra_vars)
    assert (changed_again, failed_again) == (0, 0), second.stdout[-6000:]
    # The same relay process is still serving (nothing was restarted).
    assert int((base / "data" / "vpsrelay.pid").read_text()) == pid

    checked, (_, changed_check, _, failed_check) = _play(base, extra_vars, "--check", "--diff")
    assert (changed_check, failed_check) == (0, 0), checked.stdout[-6000:]
    print(f"first run: ok={ok} changed={changed}; second and --check: changed=0")


# --- docker mode, onto the session's dockerd ---------------------------------------------

_PORTS = re.compile(r"^ +ports:\n(?: +- .*\n)+", re.M)


def _source_for_host_networking(directory: Path) -> Path:
    """This checkout's compose files, as the role copies them with a prebuilt image, with the
    compose file's `ports` taken out: the test dockerd has host networking only, where compose
    v1 (docker-py) refuses published ports. Everything else is the shipped file."""
    directory.mkdir()
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    stripped, removed = _PORTS.subn("", compose)
    assert removed == 2, "expected the relay's and Caddy's ports"
    (directory / "docker-compose.yml").write_text(stripped)
    shutil.copy2(REPO_ROOT / "Caddyfile.alt", directory / "Caddyfile.alt")
    return directory


@pytest.mark.clients
def test_playbook_docker_mode_deploys_the_stack_onto_dockerd_and_is_idempotent(
    deploy_host: DeployHost, clean_hub: Hub, base: Path
) -> None:
    image = deploy_host.relay_image()
    trust = deploy_host.trust_dir(base / "trust")
    project = base / "project"
    extra_vars = base / "vars.json"
    extra_vars.write_text(
        json.dumps(
            {
                "ansible_python_interpreter": "/usr/bin/python3",
                "vpsrelay_install_method": "docker",
                # No systemd here: the role's "Start Docker" is skipped; dockerd is the test's.
                "vpsrelay_service_manager": "process",
                "vpsrelay_install_docker": False,
                "vpsrelay_tune_kernel": False,
                "vpsrelay_firewall_ports": [],
                "vpsrelay_domain": DOMAIN,
                "vpsrelay_email": "ops@relay.test",
                "vpsrelay_acme_directory": deploy_host.acme.directory_url,
                "vpsrelay_extra_env": {
                    "VPSRELAY_TLS__ACME_CA_BUNDLE": f"{TRUST}/acme-api-ca.pem",
                    **upstream_env(clean_hub),
                },
                "vpsrelay_image": image,
                "vpsrelay_project_dir": str(project),
                "vpsrelay_source_dir": str(_source_for_host_networking(base / "source")),
                "vpsrelay_compose_override": {
                    "services": {
                        "relay": {
                            "network_mode": "host",
                            "volumes": [f"{trust}:{TRUST}:ro"],
                            "healthcheck": {"interval": "1s"},
                        }
                    }
                },
                "vpsrelay_health_delay": 1,
            }
        )
    )
    docker_env = {
        "DOCKER_HOST": deploy_host.docker.host,
        "DOCKER_CONFIG": str(deploy_host.docker.docker_config_dir),
        "COMPOSE_PROJECT_NAME": "vrans",
    }
    try:
        _, (ok, changed, _, _) = _play(base, extra_vars, env=docker_env)
        assert changed > 0
        container = deploy_host.docker.docker(
            "ps", "-q", "--filter", "label=com.docker.compose.project=vrans"
        ).stdout.split()
        assert len(container) == 1, container
        assert deploy_host.probe()["status"] == 401  # HTTPS with pebble's certificate

        pulled = clean_hub.images["library/alpine:latest"]
        assert isinstance(pulled, BuiltImage)
        deploy_host.pull_through_mirror(pulled)

        second, (_, changed_again, _, _) = _play(base, extra_vars, env=docker_env)
        assert changed_again == 0, second.stdout[-6000:]
        checked, (_, changed_check, _, _) = _play(
            base, extra_vars, "--check", "--diff", env=docker_env
        )
        assert changed_check == 0, checked.stdout[-6000:]
        still = deploy_host.docker.docker(
            "ps", "-q", "--filter", "label=com.docker.compose.project=vrans"
        ).stdout.split()
        assert still == container, "the second run recreated the container"
        print(f"docker mode, first run: ok={ok} changed={changed}; second and --check: changed=0")
    finally:
        if project.exists():
            subprocess.run(
                [require_binary("docker-compose"), "down", "--volumes", "--timeout", "30"],
                cwd=project, env={**os.environ, **docker_env}, capture_output=True,
                timeout=180, check=False,
            )  # fmt: skip
