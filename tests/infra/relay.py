"""Start the real `vpsrelay serve` as a subprocess, on a port the OS picks."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import IO

import httpx

from vpsrelay.registry_config import BUILTIN_REGISTRIES

_LISTENING = re.compile(r'listening on (https?://[^\s"]+)')
# The checkout under test, so the subprocess runs this tree's code whatever is installed.
REPO_ROOT = Path(__file__).resolve().parents[2]


def pull_token(base_url: str, repository: str) -> str:
    """An anonymous pull token from the relay at `base_url` (its `/token`, as clients ask)."""
    response = httpx.get(
        f"{base_url}/token",
        params={"service": "registry.docker.io", "scope": f"repository:{repository}:pull"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def _dead_upstreams(args: tuple[str, ...]) -> list[str]:
    """`--upstream NAME=<dead loopback>` for every built-in registry the test did not point
    somewhere itself, so a relay under test can never resolve or reach a public registry."""
    named: set[str] = set()
    for flag, value in itertools.pairwise(args):
        if flag == "--upstream":
            named.add(value.partition("=")[0])
        elif flag == "--config":
            document = tomllib.loads(Path(value).read_text())
            named |= {n for n, t in document.get("registries", {}).items() if "url" in t}
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens on loopback
    extra: list[str] = []
    for registry in BUILTIN_REGISTRIES:
        if registry.name not in named:
            extra += ["--upstream", f"{registry.name}={dead}"]
    return extra


class RelayProcess:
    """`python -m vpsrelay serve --listen 127.0.0.1:0 ...`; `url` is where it listens."""

    def __init__(
        self,
        workdir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 20.0,
        prefix: tuple[str, ...] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.log_path = workdir / "relay.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        # `prefix`: a wrapper that execs the relay (a mount namespace with its own hosts).
        command = [*prefix, sys.executable, "-m", "vpsrelay", "serve", *args]
        command += _dead_upstreams(args)
        if not any(a.startswith("--listen") for a in args):
            command += ["--listen", "127.0.0.1:0"]
        if not any(a.startswith("--data-dir") for a in args):
            command += ["--data-dir", str(workdir / "data")]
        # One process per relay unless the test asks for workers (the default is one per CPU).
        if not any(a.startswith("--workers") for a in args):
            command += ["--workers", "1"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VPSRELAY_")}
        full_env["PYTHONPATH"] = str(REPO_ROOT)
        # Every stand-in (CDN, token servers) lives on loopback, which redirect-target
        # protection refuses by default; tests of that protection pass their own value.
        full_env["VPSRELAY_ACCESS__REDIRECT_ALLOW"] = "127.0.0.1/32"
        full_env.update(env or {})
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=workdir
        )
        self.urls = self._wait_listening(startup_timeout)
        self.url = self.urls[0]
        self.port = int(self.url.rsplit(":", 1)[1])

    def _wait_listening(self, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _LISTENING.findall(self.log_text())
            if found:
                return found
            if self.process.poll() is not None:
                self._log.close()
                raise RuntimeError(
                    f"relay exited with {self.process.returncode}:\n{self.log_text()}"
                )
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"relay did not start within {timeout}s:\n{self.log_text()}")

    def worker_pids(self) -> list[int]:
        """The live workers of a supervised relay (`--workers N`): the parent's children."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if int(ppid) == self.process.pid and state != "Z":
                found.append(int(entry.name))
        return sorted(found)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident set size now, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def close(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
