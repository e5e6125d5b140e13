"""Issue 18: the systemd unit, checked by systemd's own analyzer (systemd is installed for
`systemd-analyze` only; PID 1 here is not systemd, nothing is started).

`verify` needs ExecStart's program to exist: the copy checked runs the vpsrelay entry point of
the virtualenv these tests use instead of /opt/vpsrelay's; every other line is the shipped one.
`security --offline` scores the hardening; what it still flags is exactly the list below, each
item something a public relay needs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra import require_binary
from tests.infra.hub import iter_blobs
from tests.infra.oci import BuiltImage
from tests.infra.pebble import free_port
from tests.infra.relay import REPO_ROOT, _dead_upstreams

if TYPE_CHECKING:
    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration
UNIT = REPO_ROOT / "deploy" / "systemd" / "vpsrelay.service"
SHIPPED_PROGRAM = "/opt/vpsrelay/bin/vpsrelay"
# What `systemd-analyze security` may still flag, and why the relay needs it.
ALLOWED_EXPOSURE = {
    "PrivateNetwork=",  # it serves and fetches over the host's network
    "IPAddressDeny=",  # upstreams and clients are anywhere
    "RestrictAddressFamilies=~AF_(INET|INET6)",  # the same
    "RestrictAddressFamilies=~AF_UNIX",  # control.sock (vpsrelay cert renew, cache commands)
    "AmbientCapabilities=",  # CAP_NET_BIND_SERVICE, for ports 80 and 443
    "CapabilityBoundingSet=~CAP_NET_(BIND_SERVICE|BROADCAST|RAW)",  # the same, bind only
    "PrivateUsers=",  # a user namespace would void that capability in the host's netns
    "RootDirectory=/RootImage=",  # the virtualenv lives in the host's filesystem
    "DeviceAllow=",  # char-rtc:r, added by ProtectClock=
}
MAX_EXPOSURE = 1.4


def _checked_copy(directory: Path) -> Path:
    program = Path(sys.executable).parent / "vpsrelay"
    assert program.exists(), program
    text = UNIT.read_text()
    assert SHIPPED_PROGRAM in text
    unit = directory / "vpsrelay.service"
    unit.write_text(text.replace(SHIPPED_PROGRAM, str(program)))
    return unit


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("systemd-analyze"), *args], cwd=cwd, capture_output=True, text=True,
        timeout=60, check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0"},
    )  # fmt: skip


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _checked_copy(tmp_path)
    result = _analyze("verify", "--man=no", f"./{unit.name}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: verify reports a bad value (with exit status 0, which is
    why the test above demands no output at all)."""
    unit = _checked_copy(tmp_path)
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictly"))
    result = _analyze("verify", "--man=no", f"./{unit.name}", cwd=tmp_path)
    assert "Failed to parse protect system value" in result.stderr, result.stderr


def test_unit_hardening_exposure(tmp_path: Path) -> None:
    unit = _checked_copy(tmp_path)
    result = _analyze("security", "--offline=yes", f"./{unit.name}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert score, result.stdout
    print(f"systemd-analyze security: exposure {score.group(1)} {score.group(2)}")
    flagged = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("✗")}
    assert flagged <= ALLOWED_EXPOSURE, flagged - ALLOWED_EXPOSURE
    assert float(score.group(1)) <= MAX_EXPOSURE

    directives = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert directives["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert directives["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert directives["NoNewPrivileges"] == "true"
    assert directives["ProtectSystem"] == "strict"
    assert directives["ReadWritePaths"] == "/var/lib/vpsrelay"
    assert directives["User"] == "vpsrelay"


def test_relay_serves_a_pull_with_the_units_view_of_proc(hub: Hub, tmp_path: Path) -> None:
    """`ProcSubset=pid` with `ProtectProc=invisible` cannot be tried without systemd as PID 1;
    the same /proc is: a private mount and PID namespace whose /proc is mounted with
    `subset=pid,hidepid=invisible`. The relay starts there and serves a skopeo pull."""
    port = free_port()
    data = tmp_path / "data"
    listing = tmp_path / "proc-listing"
    script = (
        'mount -t proc -o subset=pid,hidepid=invisible proc /proc && ls /proc > "$0" && exec "$@"'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
    env |= {"PYTHONPATH": str(REPO_ROOT), "VPSRELAY_ACCESS__REDIRECT_ALLOW": "127.0.0.1/32"}
    upstreams = ("--upstream", f"docker.io={hub.registry_url}")
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            [require_binary("unshare"), "--mount", "--pid", "--fork", "--propagation", "private",
             "sh", "-c", script, str(listing),
             sys.executable, "-m", "vpsrelay", "serve", "--listen", f"127.0.0.1:{port}",
             "--data-dir", str(data), *upstreams, *_dead_upstreams(upstreams)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert relay.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # The emulation holds: no system-wide /proc file is visible, only processes.
        names = listing.read_text().split()
        assert "meminfo" not in names
        assert "sys" not in names
        assert "self" in names

        image = hub.images["library/alpine:latest"]
        assert isinstance(image, BuiltImage)
        conf = tmp_path / "registries.conf"
        conf.write_text("# no mirrors\n")
        subprocess.run(
            [require_binary("skopeo"), "copy", "--src-tls-verify=false", "--preserve-digests",
             f"docker://127.0.0.1:{port}/library/alpine:latest", f"oci:{tmp_path / 'out'}:x"],
            check=True, capture_output=True, timeout=120,
            env={**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)},
        )  # fmt: skip
        for blob in iter_blobs(image):
            path = tmp_path / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
            assert path.stat().st_size == blob.size
        assert "Traceback" not in log.read_text()
    finally:
        os.killpg(relay.pid, signal.SIGTERM)
        try:
            relay.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(relay.pid, signal.SIGKILL)
            relay.wait(5)
