"""Issue 14 review, the supervisor: what a writable working directory, a second `serve`
on the same data dir and a hung worker must not be able to do to a `--workers 2` relay."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.infra.relay import REPO_ROOT, RelayProcess
from tests.infra.tmpfs import fill_up, mounted_tmpfs
from tests.infra.workers import current_pids, wait_for
from vpsrelay.core.fleet import HEARTBEAT_SECONDS, STALE_SECONDS

if TYPE_CHECKING:
    from pathlib import Path

    from tests.infra.hub import Hub

pytestmark = pytest.mark.integration

# A `trio.py` planted in the directory `serve` runs from: it notes who imported it (the
# worker number, or nothing for a process that is not a worker), then hands over the real
# trio so the relay still runs and the note is all it leaves.
_PLANTED_TRIO = textwrap.dedent(
    """
    import importlib, os, sys
    with open({marker!r}, "a") as f:
        f.write(os.environ.get("_VPSRELAY_WORKER", "-") + "\\n")
    here = os.path.dirname(os.path.abspath(__file__))
    del sys.modules["trio"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in ("", ".", here)]
    try:
        sys.modules["trio"] = importlib.import_module("trio")
    finally:
        sys.path[:] = saved
    """
)


def test_a_module_in_the_working_directory_runs_in_no_worker(tmp_path: Path) -> None:
    workdir = tmp_path / "relay"
    workdir.mkdir()
    marker = tmp_path / "imported-by"
    (workdir / "trio.py").write_text(_PLANTED_TRIO.format(marker=str(marker)))
    with RelayProcess(workdir, "--workers", "2") as relay:
        assert len(current_pids(relay)) == 2
        assert httpx.get(f"{relay.url}/healthz", timeout=10).status_code == 200
    # The test's own `python -m vpsrelay` parent imports it (so the plant works) ...
    importers = marker.read_text().split()
    assert "-" in importers
    # ... and no worker does.
    assert [who for who in importers if who != "-"] == []


def _files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


def test_metrics_files_are_the_owners_alone_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual one, inherited by the relay
    try:
        relay = RelayProcess(tmp_path / "relay", "--workers", "2")
    finally:
        os.umask(old)
    with relay:
        metrics = tmp_path / "relay" / "data" / "run" / "metrics"
        # Every worker counts the request it serves: its files exist once it served one.
        for _ in range(6):
            httpx.get(f"{relay.url}/healthz", timeout=10).raise_for_status()
        wait_for("metrics files", lambda: any(p.suffix == ".db" for p in _files_under(metrics)), 10)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in _files_under(metrics)}
    wider = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
    assert wider == {}, wider


def test_a_hung_worker_is_replaced_and_readyz_stays_ready(hub: Hub, tmp_path: Path) -> None:
    upstream = f"docker.io={hub.registry_url}"  # answers: only the workers decide readiness
    with RelayProcess(tmp_path / "relay", "--workers", "2", "--upstream", upstream) as relay:
        hung = current_pids(relay)["w2"]
        os.kill(hung, signal.SIGSTOP)
        try:
            readyz: list[dict[str, object]] = []

            def reported_stale() -> bool:
                # A connection that lands on the stopped worker waits: short timeouts.
                try:
                    response = httpx.get(f"{relay.url}/readyz", timeout=1)
                except httpx.HTTPError:
                    return False
                body = response.json()
                readyz.append({"code": response.status_code, **body})
                workers = {w["worker"]: w["state"] for w in body.get("workers", [])}
                return workers.get("w2") == "stale" or current_pids(relay)["w2"] != hung

            wait_for("w2 to be seen stale or replaced", reported_stale, 40)
            # While w2 hangs, w1 serves: the relay is degraded, never unready.
            for entry in readyz:
                assert entry["status"] != "unready", entry
            wait_for("w2 to be replaced", lambda: current_pids(relay)["w2"] != hung, 40)
        finally:
            # Gone already when the fix holds; otherwise let the relay stop it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert f"worker w2 (pid {hung}) sent no heartbeat" in relay.log_text()
        # The new w2 serves, and the relay is whole again.

        def whole() -> bool:
            try:
                body = httpx.get(f"{relay.url}/readyz", timeout=5).json()
            except httpx.HTTPError:
                return False
            return bool(body["checks"]["workers"] == "ok")

        wait_for("both workers ready again", whole, 20)
        assert relay.process.poll() is None


def _run_files(data_dir: Path) -> set[str]:
    run = data_dir / "run"
    return {str(p.relative_to(run)) for p in _files_under(run) if p.suffix in (".db", ".json")}


def test_a_second_serve_on_the_data_dir_is_refused_and_touches_nothing(tmp_path: Path) -> None:
    with RelayProcess(tmp_path / "relay", "--workers", "2") as first:
        data_dir = tmp_path / "relay" / "data"
        httpx.get(f"{first.url}/healthz", timeout=10).raise_for_status()
        wait_for("both status files", lambda: {"workers/1.json", "workers/2.json"}
                 <= _run_files(data_dir), 10)  # fmt: skip
        before = _run_files(data_dir)
        # Any free port: only the data dir is shared, so binding cannot be what stops it.
        second = subprocess.run(
            [sys.executable, "-m", "vpsrelay", "serve", "--workers", "2",
             "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--upstream", "docker.io=http://127.0.0.1:9"],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("vpsrelay: cannot serve: another relay with workers"), lines
        assert "listening on" not in second.stderr
        # The first relay's files are all still there, and it still counts and reports.
        assert before <= _run_files(data_dir)
        body = httpx.get(f"{first.url}/readyz", timeout=10).json()
        assert {w["worker"]: w["state"] for w in body["workers"]} == {"w1": "ready", "w2": "ready"}
        assert "vpsrelay_" in httpx.get(f"{first.url}/metrics", timeout=10).text
    # Its end released the lock: the next one starts on the same data dir.
    with RelayProcess(tmp_path / "again", "--workers", "2", "--data-dir", str(data_dir)) as again:
        assert len(current_pids(again)) == 2


def test_a_full_disk_that_stops_heartbeats_kills_no_worker(hub: Hub, tmp_path: Path) -> None:
    upstream = f"docker.io={hub.registry_url}"
    with mounted_tmpfs(tmp_path / "disk", "64m") as disk:
        relay = RelayProcess(
            tmp_path / "relay", "--workers", "2", "--upstream", upstream,
            "--data-dir", str(disk / "data"),
        )  # fmt: skip
        with relay:
            pids = current_pids(relay)
            fill_up(disk)
            try:
                # Long past the stale limit: the heartbeats stopped, the workers did not.
                deadline = time.monotonic() + STALE_SECONDS + 3 * HEARTBEAT_SECONDS + 2
                while time.monotonic() < deadline:
                    assert current_pids(relay) == pids
                    time.sleep(0.5)
                assert "sent no heartbeat" not in relay.log_text()
                assert "status files cannot be written" in relay.log_text()
                assert httpx.get(f"{relay.url}/healthz", timeout=5).status_code == 200
            finally:
                (disk / "filler").unlink()
