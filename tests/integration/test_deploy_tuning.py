"""Issue 18: the role's kernel tuning (BBR, fq, buffers, notsent_lowat, no slow start after
idle) and the file compose users install by hand.

This machine's own settings are never changed: against the host the role runs with
`--check --diff` only (the plan, and the options this kernel lacks), and for real only inside
a network namespace made here (`unshare --net`), where the per-namespace options land and are
read back. Options that are not per-namespace (net.core.default_qdisc) do not exist there, so
the role skips them with its message. The effect on a long, lossy path cannot be measured here
(no netem): docs/tuning.md cites the published figures.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.infra import require_binary
from tests.infra.ansible import ANSIBLE_DIR, RECAP, ansible_env
from tests.infra.relay import REPO_ROOT

pytestmark = pytest.mark.integration
ROLE = ANSIBLE_DIR / "roles" / "vpsrelay"
SHIPPED = REPO_ROOT / "deploy" / "sysctl" / "90-vpsrelay.conf"
# Every key of the plan; which of them are per network namespace depends on the kernel.
PLAN = {
    "net.core.default_qdisc": "fq",
    "net.ipv4.tcp_congestion_control": "bbr",
    "net.core.rmem_max": "67108864",
    "net.core.wmem_max": "67108864",
    "net.ipv4.tcp_rmem": "4096 131072 33554432",
    "net.ipv4.tcp_wmem": "4096 16384 33554432",
    "net.ipv4.tcp_notsent_lowat": "16384",
    "net.ipv4.tcp_slow_start_after_idle": "0",
}


def _proc(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def _host_values() -> dict[str, str]:
    return {k: " ".join(_proc(k).read_text().split()) for k in PLAN if _proc(k).exists()}


def _settings(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] not in "#;")
    return {key.strip(): " ".join(value.split()) for key, value in pairs}


def _playbook_argv(sysctl_file: Path, *args: str) -> list[str]:
    return [
        require_binary("ansible-playbook"), "-i", "localhost,", "-c", "local",
        "-e", "ansible_python_interpreter=/usr/bin/python3",
        "-e", f"vpsrelay_sysctl_file={sysctl_file}",
        "--tags", "vpsrelay_tuning", *args, "site.yml",
    ]  # fmt: skip


def _recap(output: str) -> tuple[int, int]:
    match = RECAP.search(output)
    assert match, output[-4000:]
    ok, changed, unreachable, failed = (int(n) for n in match.groups())
    assert (unreachable, failed) == (0, 0), output[-4000:]
    return ok, changed


def _skips(output: str) -> dict[str, str]:
    return dict(re.findall(r'"msg": "vpsrelay: skipping (\S+) = [^:]+: ([^"]+)"', output))


def test_shipped_file_is_the_roles_plan() -> None:
    """deploy/sysctl/90-vpsrelay.conf (for compose users) holds what the role writes with
    its defaults, in the same order."""
    shipped = _settings(SHIPPED.read_text())
    assert list(shipped.items()) == list(PLAN.items())
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    plan = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["vpsrelay_sysctl_plan"]
    keys = [item["key"] for item in plan]
    assert keys == list(PLAN)
    assert defaults["vpsrelay_socket_buffer_max"] == int(PLAN["net.core.rmem_max"])
    assert defaults["vpsrelay_tcp_buffer_max"] == int(PLAN["net.ipv4.tcp_rmem"].split()[-1])
    assert defaults["vpsrelay_notsent_lowat"] == int(PLAN["net.ipv4.tcp_notsent_lowat"])
    switches = [name for name in defaults if name.startswith("vpsrelay_tune_")]
    assert len(switches) == 6  # one per option, and vpsrelay_tune_kernel for all
    assert all(defaults[name] is True for name in switches)


def test_check_diff_on_this_host_shows_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    before = _host_values()
    sysctl_file = tmp_path / "90-vpsrelay.conf"
    result = subprocess.run(
        _playbook_argv(sysctl_file, "--check", "--diff"), cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    _, changed = _recap(result.stdout)
    print(result.stdout[result.stdout.find("TASK [vpsrelay : Say which") :])
    planned = _settings(
        "\n".join(line[1:] for line in result.stdout.splitlines() if line.startswith("+n"))
    )
    skipped = _skips(result.stdout)
    # Every option is either planned with its value or skipped with the reason.
    assert set(planned) | set(skipped) == set(PLAN), (planned, skipped)
    assert not set(planned) & set(skipped)
    assert all(PLAN[key] == value for key, value in planned.items())
    assert planned, "nothing planned"
    assert changed >= 1
    if _bbr_available():
        assert "net.ipv4.tcp_congestion_control" in planned
    # Nothing happened: no file, the same kernel values.
    assert not sysctl_file.exists()
    assert _host_values() == before


def test_role_applies_the_per_namespace_options_in_a_private_netns(tmp_path: Path) -> None:
    """Run, run again, then --check, all in one fresh network namespace; read the values back
    there. The host's values are the same before and after."""
    before = _host_values()
    sysctl_file = tmp_path / "90-vpsrelay.conf"
    logs = [tmp_path / f"run{i}.log" for i in (1, 2, 3)]
    values = tmp_path / "values.json"
    keys = " ".join(PLAN)
    script = (
        'set -e; "$IP" link set lo up; '
        f'"$@" > {logs[0]} 2>&1; "$@" > {logs[1]} 2>&1; "$@" --check > {logs[2]} 2>&1; '
        f'"$PY" -c \'import json, pathlib, sys; print(json.dumps({{k: " ".join(pathlib.Path('
        f'"/proc/sys", *k.split(".")).read_text().split()) for k in sys.argv[1:] '
        f'if pathlib.Path("/proc/sys", *k.split(".")).exists()}}))\' {keys} > {values}'
    )
    env = {**ansible_env(tmp_path), "IP": require_binary("ip"), "PY": "/usr/bin/python3"}
    proc = subprocess.run(
        [require_binary("unshare"), "--net", "--", "sh", "-c", script, "sh",
         *_playbook_argv(sysctl_file)],
        cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    outputs = [log.read_text() if log.exists() else "" for log in logs]
    assert proc.returncode == 0, proc.stderr + "\n".join(o[-3000:] for o in outputs)
    (_, first), (_, second), (_, checked) = (_recap(output) for output in outputs)
    assert first >= 2  # the file, then `sysctl -p`
    assert (second, checked) == (0, 0), outputs[1][-3000:] + outputs[2][-3000:]

    written = _settings(sysctl_file.read_text())
    read_back = json.loads(values.read_text())
    skipped = _skips(outputs[0])
    print(f"applied in the namespace: {written}\nskipped: {skipped}")
    assert set(written) | set(skipped) == set(PLAN)
    for key, value in written.items():
        assert read_back[key] == value, (key, read_back)
    # The per-namespace TCP options are in every kernel this role supports.
    for key in ("net.ipv4.tcp_notsent_lowat", "net.ipv4.tcp_slow_start_after_idle"):
        assert key in written
    # net.core.* are global: absent (default_qdisc) or read-only in a namespace, so skipped.
    for key in ("net.core.default_qdisc", "net.core.rmem_max", "net.core.wmem_max"):
        assert key in skipped, skipped
    assert _host_values() == before


def test_compose_users_one_liner_applies_in_a_private_netns(tmp_path: Path) -> None:
    """The documented `sysctl -p` of the shipped file, in a fresh network namespace: the
    options the namespace has take their values; the missing one is reported, not fatal."""
    before = _host_values()
    script = (
        '"$0" -p "$1"; echo "rc=$?"; for k in $2; do printf "%s=" "$k"; "$0" -n "$k" '
        "2>/dev/null || echo; done"
    )
    sysctl = require_binary("sysctl")
    proc = subprocess.run(
        [require_binary("unshare"), "--net", "--", "sh", "-c", script, sysctl, str(SHIPPED),
         " ".join(PLAN)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    values = _settings(proc.stdout.split("rc=", 1)[1].split("\n", 1)[1])
    per_namespace = [key for key in PLAN if key.startswith("net.ipv4.")]
    if not _bbr_available():
        per_namespace.remove("net.ipv4.tcp_congestion_control")
    for key in per_namespace:
        assert values[key] == PLAN[key], (key, values)
    # The global ones cannot be set in a namespace: reported on stderr, the rest applied.
    assert "default_qdisc" in proc.stderr, proc.stderr
    assert _host_values() == before


def _bbr_available() -> bool:
    return "bbr" in _proc("net.ipv4.tcp_available_congestion_control").read_text().split()
