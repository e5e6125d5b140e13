"""Real container clients for integration tests: dockerd, containerd + ``ctr``, podman.

Everything runs with private state (data roots, exec roots, pid files, sockets) in temporary
directories, and every process started here is stopped (bounded wait, then SIGKILL) on exit.

The network rule: nothing may leave the machine. The off-box resolver is reachable, so a client
that falls back to ``registry-1.docker.io`` would send a DNS query out. Therefore:

* ``DockerDaemon`` runs dockerd inside its own network namespace with only ``lo`` up. Each
  root-namespace TCP port it must reach (the relay, a registry) is bridged with a pair of socat
  processes through a unix socket (unix sockets cross network namespaces), so dockerd uses the
  very same ``http://127.0.0.1:PORT`` URL as the tests. A fallback to the real Docker Hub fails at
  once with "network is unreachable". The docker CLI stays outside and talks to dockerd's unix
  socket.
* ``Containerd`` and ``Podman`` run in the root namespace, but their configuration replaces the
  real ``docker.io`` endpoint with a dead loopback port (see ``DeadPort``), so a failed mirror
  cannot fall back off the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Self

from tests.infra.binaries import require_binary

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from types import TracebackType

__all__ = [
    "ClientError",
    "Containerd",
    "DeadPort",
    "DockerDaemon",
    "Podman",
]

# Environment variables that would redirect a client to another daemon or through a proxy.
_SCRUB_ENV = (
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_CONFIG",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "DOCKER_API_VERSION",
    "CONTAINERD_ADDRESS",
    "CONTAINERD_NAMESPACE",
    "CONTAINERD_SNAPSHOTTER",
    "CONTAINERS_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "CONTAINERS_STORAGE_CONF",
    "REGISTRY_AUTH_FILE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)

_STOP_TIMEOUT = 20.0
_LOG_TAIL = 4000


class ClientError(subprocess.CalledProcessError):
    """A client command failed; ``str()`` shows its output and the daemon log tail."""

    def __init__(
        self,
        proc: subprocess.CompletedProcess[str],
        *,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(proc.returncode, proc.args, proc.stdout, proc.stderr)
        self.log_path = log_path

    def __str__(self) -> str:
        parts = [
            f"command {self.cmd!r} exited with {self.returncode}",
            f"--- stdout ---\n{self.stdout}",
            f"--- stderr ---\n{self.stderr}",
        ]
        if self.log_path is not None:
            parts.append(f"--- tail of {self.log_path} ---\n{_tail(self.log_path)}")
        return "\n".join(parts)


def _tail(path: Path, size: int = _LOG_TAIL) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read: {e}>"


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB_ENV}
    if extra:
        env.update(extra)
    return env


def _short_tmpdir(prefix: str) -> Path:
    """A private dir with a short path: unix socket paths are limited to 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    check: bool,
    log_path: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise ClientError(proc, log_path=log_path)
    return proc


def _start(
    argv: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str],
    stdout: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a process in its own session (so its process group can be killed as a whole)."""
    with log.open("ab") as logf:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf if stdout is None else stdout,
            stderr=logf,
            env=dict(env),
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], *, timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM the process, wait up to ``timeout``, then SIGKILL its whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The group id is the pid of our own child (start_new_session=True): leftovers such as
    # socat's per-connection children die with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


def _kill_pidfile(pidfile: Path, must_contain: str) -> None:
    """Kill a daemon's helper left behind (by its pidfile), if its cmdline mentions our dir."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError):
        return
    if must_contain.encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_until(
    what: str, predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _listening_in_netns(pid: int, port: int, *, ipv6: bool = False) -> bool:
    """Whether 127.0.0.1:port (or [::1]:port) is in LISTEN state in the netns of ``pid``."""
    address = "00000000000000000000000001000000" if ipv6 else "0100007F"
    want = f"{address}:{port:04X}"
    try:
        lines = Path(f"/proc/{pid}/net/tcp{'6' if ipv6 else ''}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
            return True
    return False


def _strip_scheme(location: str) -> str:
    for scheme in ("http://", "https://"):
        if location.startswith(scheme):
            return location[len(scheme) :].rstrip("/")
    return location.rstrip("/")


class DeadPort:
    """A loopback TCP port that refuses connections: bound but never listening.

    Held for the lifetime of the object so nothing else can take it. Use it as the "real"
    upstream in containerd/podman config so a mirror failure cannot fall back off the machine.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class DockerDaemon:
    """dockerd 20.10 in a private network namespace (only ``lo``), driven by the docker CLI.

    ``forward_ports``: root-namespace TCP ports on 127.0.0.1 that dockerd must reach (more can be
    added later with ``forward()``). ``mirrors`` go to ``registry-mirrors`` (for example
    ``http://127.0.0.1:PORT``).

    dockerd also gets a private mount namespace in which ``/etc/docker`` is a bind mount of
    ``etc_dir``: its ``key.json`` and ``certs.d`` stay private (see ``add_registry_ca``), and
    whatever it mounts disappears with it. Caveat: dockerd always treats 127.0.0.0/8 as an
    insecure registry, so TLS to ``https://127.0.0.1:PORT`` works but is *not verified*.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        forward_ports: Sequence[int],
        mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        """``hosts``: extra ``name -> IP`` lines for dockerd's private ``/etc/hosts``."""
        self.hosts = dict(hosts or {})
        self.dockerd = require_binary("dockerd")
        # Prefer Debian docker.io's CLI (20.10): a fresh machine has it, and it matches the daemon.
        self.docker_cli: str = (
            "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else require_binary("docker")
        )
        require_binary("containerd")  # dockerd starts its own, found on PATH
        self._unshare = require_binary("unshare")
        self._nsenter = require_binary("nsenter")
        self._socat = require_binary("socat")
        self._ip = require_binary("ip")
        self._mount = require_binary("mount")

        self.workdir = Path(workdir)
        self._initial_ports = list(forward_ports)
        self.mirrors = list(mirrors)
        self.insecure_registries = list(insecure_registries)

        self.log_path = self.workdir / "dockerd.log"
        self.config_path = self.workdir / "daemon.json"
        self.data_root = self.workdir / "data-root"
        self.docker_config_dir = self.workdir / "docker-config"
        self.etc_dir = self.workdir / "etc-docker"
        self._rundir: Path | None = None
        self._holder: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._forwarders: dict[
            tuple[int, bool], tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]
        ] = {}

    # -- paths -------------------------------------------------------------------------------
    @property
    def rundir(self) -> Path:
        if self._rundir is None:
            raise RuntimeError("DockerDaemon is not started")
        return self._rundir

    @property
    def socket_path(self) -> Path:
        return self.rundir / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.rundir / "exec"

    @property
    def host(self) -> str:
        """The DOCKER_HOST value for this daemon."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("DockerDaemon is not started")
        return self._proc.pid

    @property
    def netns_path(self) -> str:
        if self._holder is None:
            raise RuntimeError("DockerDaemon is not started")
        return f"/proc/{self._holder.pid}/ns/net"

    @property
    def mntns_path(self) -> str:
        if self._holder is None:
            raise RuntimeError("DockerDaemon is not started")
        return f"/proc/{self._holder.pid}/ns/mnt"

    def add_registry_ca(self, host: str, ca: Path) -> Path:
        """Trust ``ca`` for registry ``host`` (``host:port``): dockerd's
        ``/etc/docker/certs.d/<host>/ca.crt`` (read per connection; no reload needed)."""
        d = self.etc_dir / "certs.d" / host
        d.mkdir(parents=True, exist_ok=True)
        dest = d / "ca.crt"
        shutil.copyfile(ca, dest)
        return dest

    def netns_interfaces(self) -> list[str]:
        """Interface names in dockerd's network namespace (should be just ``lo``)."""
        text = Path(f"/proc/{self.pid}/net/dev").read_text()
        return [line.split(":", 1)[0].strip() for line in text.splitlines()[2:] if ":" in line]

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown()

    def _config(self) -> dict[str, object]:
        return {
            "data-root": str(self.data_root),
            "exec-root": str(self.exec_root),
            "pidfile": str(self.rundir / "dockerd.pid"),
            "hosts": [self.host],
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "ip-forward": False,
            "ip-masq": False,
            "bridge": "none",
            "debug": True,
            "insecure-registries": self.insecure_registries,
            "registry-mirrors": self.mirrors,
        }

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.docker_config_dir.mkdir(exist_ok=True)
        (self.etc_dir / "certs.d").mkdir(parents=True, exist_ok=True)
        self._rundir = _short_tmpdir("vr-dockerd-")
        self._start_netns()
        for port in self._initial_ports:
            self.forward(port)
        self._write_config()
        env = _clean_env()
        self._proc = _start(
            [self._nsenter, f"--net={self.netns_path}", f"--mount={self.mntns_path}", "--",
             self.dockerd,
             "--config-file", str(self.config_path)],
            log=self.log_path,
            env=env,
        )  # fmt: skip
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {proc.returncode}\n{_tail(self.log_path)}")
            return _ping_unix(self.socket_path)

        _wait_until("dockerd /_ping", ready, timeout=60)
        # The hard rule, checked on the real daemon process: it sees only lo.
        if self.netns_interfaces() != ["lo"]:
            raise RuntimeError(f"dockerd netns has unexpected interfaces {self.netns_interfaces()}")
        if os.readlink(f"/proc/{self.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            raise RuntimeError("dockerd is in the root network namespace")

    def _start_netns(self) -> None:
        """A ``sleep`` holding fresh network + mount namespaces (``lo`` up, private
        ``/etc/docker``); dockerd and the in-namespace forwarders are nsenter'ed into them."""
        script = (
            '"$0" link set lo up'
            ' && { [ ! -d /etc/docker ] || "$1" --bind "$2" /etc/docker; }'
            ' && { [ -z "$3" ] || "$1" --bind "$3" /etc/hosts; }'
            " && echo ready && exec sleep infinity"
        )
        hosts_file = ""
        if self.hosts:
            hosts_path = self.workdir / "hosts"
            lines = ["127.0.0.1 localhost", "::1 localhost"]
            lines += [f"{address} {name}" for name, address in self.hosts.items()]
            hosts_path.write_text("\n".join(lines) + "\n")
            hosts_file = str(hosts_path)
        holder = subprocess.Popen(
            [self._unshare, "--net", "--mount", "--propagation", "private", "--",
             "sh", "-c", script, self._ip, self._mount, str(self.etc_dir), hosts_file],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_clean_env(),
            start_new_session=True,
        )  # fmt: skip
        self._holder = holder
        assert holder.stdout is not None
        line = _readline_timeout(holder.stdout, 15)
        if line.strip() != b"ready":
            err = holder.stderr.read() if holder.poll() is not None and holder.stderr else b""
            raise RuntimeError(f"could not create the namespaces: {line!r} {err!r}")
        if os.readlink(self.netns_path) == os.readlink("/proc/self/ns/net"):
            raise RuntimeError("unshare --net did not create a new network namespace")
        if os.readlink(self.mntns_path) == os.readlink("/proc/self/ns/mnt"):
            raise RuntimeError("unshare --mount did not create a new mount namespace")
        dev = Path(f"/proc/{holder.pid}/net/dev").read_text()
        names = [ln.split(":", 1)[0].strip() for ln in dev.splitlines()[2:] if ":" in ln]
        if names != ["lo"]:
            raise RuntimeError(f"new network namespace has unexpected interfaces {names}")

    def forward(self, port: int, *, ipv6: bool = False) -> None:
        """Make root-namespace 127.0.0.1:port reachable as 127.0.0.1:port inside the netns
        (as [::1]:port with ``ipv6``: dockerd does not treat ::1 as an insecure registry)."""
        if (port, ipv6) in self._forwarders:
            return
        if self._holder is None or self._holder.poll() is not None:
            raise RuntimeError("network namespace holder is not running")
        sock = self.rundir / f"fwd-{port}{'-6' if ipv6 else ''}.sock"
        log = self.workdir / f"socat-{port}.log"
        env = _clean_env()
        outer = _start(
            [self._socat, f"UNIX-LISTEN:{sock},fork,unlink-early,mode=600",
             f"TCP:127.0.0.1:{port}"],
            log=log,
            env=env,
        )  # fmt: skip
        try:

            def outer_ready() -> bool:
                if outer.poll() is not None:
                    raise RuntimeError(f"outer socat for {port} exited\n{_tail(log)}")
                return sock.exists()

            _wait_until(f"forwarder socket {sock}", outer_ready, timeout=10, interval=0.02)
            inner = _start(
                [self._nsenter, f"--net={self.netns_path}", "--", self._socat,
                 f"TCP6-LISTEN:{port},bind=[::1],fork,reuseaddr,ipv6only=1" if ipv6
                 else f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr",
                 f"UNIX-CONNECT:{sock}"],
                log=log,
                env=env,
            )  # fmt: skip
        except BaseException:
            _stop(outer)
            raise
        self._forwarders[(port, ipv6)] = (outer, inner)

        def inner_ready() -> bool:
            if inner.poll() is not None:
                raise RuntimeError(f"inner socat for {port} exited\n{_tail(log)}")
            return _listening_in_netns(inner.pid, port, ipv6=ipv6)

        _wait_until(f"in-netns listener on {port}", inner_ready, timeout=10, interval=0.02)

    def _shutdown(self) -> None:
        if self._proc is not None:
            _stop(self._proc, timeout=30)
            # dockerd's managed containerd normally stops with it (and has a parent-death
            # signal); make sure.
            if self._rundir is not None:
                _kill_pidfile(self.exec_root / "containerd" / "containerd.pid", str(self.exec_root))
            self._proc = None
        for outer, inner in self._forwarders.values():
            _stop(inner, timeout=5)
            _stop(outer, timeout=5)
        self._forwarders.clear()
        if self._holder is not None:
            _stop(self._holder, timeout=5)
            self._holder = None
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    # -- use ---------------------------------------------------------------------------------
    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon (private DOCKER_CONFIG for ``docker login``)."""
        env = _clean_env({"DOCKER_HOST": self.host, "DOCKER_CONFIG": str(self.docker_config_dir)})
        return _run(
            [self.docker_cli, *args], env=env, timeout=timeout, check=check,
            log_path=self.log_path,
        )  # fmt: skip

    def reload(
        self,
        *,
        mirrors: Sequence[str] | None = None,
        insecure_registries: Sequence[str] | None = None,
        timeout: float = 15,
    ) -> None:
        """Rewrite daemon.json (new mirrors / insecure registries if given) and SIGHUP dockerd.

        Waits for dockerd's "Reloaded configuration" log line. Forward new ports first.
        """
        if mirrors is not None:
            self.mirrors = list(mirrors)
        if insecure_registries is not None:
            self.insecure_registries = list(insecure_registries)
        self._write_config()
        offset = self.log_path.stat().st_size
        os.kill(self.pid, signal.SIGHUP)

        def reloaded() -> bool:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                text = f.read()
            if b"Error reloading configuration" in text or b"failed to reload" in text:
                raise RuntimeError(f"dockerd reload failed\n{text.decode('utf-8', 'replace')}")
            return b"Reloaded configuration" in text

        _wait_until("dockerd reload", reloaded, timeout=timeout)


def _ping_unix(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = s.recv(4096)
    except OSError:
        return False
    return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]


def _readline_timeout(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    return stream.readline()


class Containerd:
    """containerd started by hand with private root/state/sockets; the CRI plugin is disabled."""

    def __init__(self, workdir: Path, *, namespace: str = "vpsrelay-test") -> None:
        self.containerd = require_binary("containerd")
        self.ctr_bin = require_binary("ctr")
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.root = self.workdir / "root"
        self.hosts_dir = self.workdir / "certs.d"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self._rundir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        if self._rundir is None:
            raise RuntimeError("Containerd is not started")
        return self._rundir / "containerd.sock"

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown()

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_dir.mkdir(exist_ok=True)
        self._rundir = rundir = _short_tmpdir("vr-ctrd-")
        sock = self.socket_path
        self.config_path.write_text(
            "version = 2\n"
            f"root = {json.dumps(str(self.root))}\n"
            f"state = {json.dumps(str(rundir / 'state'))}\n"
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f"  address = {json.dumps(str(sock))}\n"
            "[ttrpc]\n"
            f"  address = {json.dumps(str(sock) + '.ttrpc')}\n"
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f"  path = {json.dumps(str(self.workdir / 'opt'))}\n"
        )
        self._proc = proc = _start(
            [self.containerd, "--config", str(self.config_path)],
            log=self.log_path,
            env=_clean_env(),
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {proc.returncode}\n{_tail(self.log_path)}"
                )
            if not sock.exists():
                return False
            return self.ctr("version", timeout=10, check=False).returncode == 0

        _wait_until("containerd", ready, timeout=60, interval=0.2)

    def _shutdown(self) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def write_hosts(
        self,
        registry: str,
        *,
        mirror_url: str,
        dead_server: str,
        ca: Path | None = None,
    ) -> Path:
        """Write ``<hosts_dir>/<registry>/hosts.toml`` (``registry`` may be ``_default``).

        ``dead_server`` replaces the real registry (the fallback after the mirror): use a
        ``DeadPort`` URL so a mirror failure cannot leave the machine.
        """
        d = self.hosts_dir / registry
        d.mkdir(parents=True, exist_ok=True)
        lines = [
            f"server = {json.dumps(dead_server)}",
            "",
            f"[host.{json.dumps(mirror_url)}]",
            '  capabilities = ["pull", "resolve"]',
        ]
        if ca is not None:
            lines.append(f"  ca = {json.dumps(str(ca))}")
        path = d / "hosts.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def ctr(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run(
            [self.ctr_bin, "--address", str(self.socket_path), "--namespace", self.namespace,
             *args],
            env=_clean_env(), timeout=timeout, check=check, log_path=self.log_path,
        )  # fmt: skip

    def remove_image(self, ref: str) -> None:
        """Remove ``ref`` and garbage-collect its content synchronously (next pull is cold)."""
        self.ctr("images", "rm", "--sync", ref, check=False)

    def pull(
        self,
        ref: str,
        *,
        plain_http: bool = True,
        extra: Sequence[str] = (),
        timeout: float = 120,
        check: bool = True,
        cold: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir ...``; with ``cold`` the image is removed first."""
        if cold:
            self.remove_image(ref)
        args = ["images", "pull", "--hosts-dir", str(self.hosts_dir)]
        if plain_http:
            args.append("--plain-http")
        return self.ctr(*args, *extra, ref, timeout=timeout, check=check)


class Podman:
    """podman (no daemon) with private --root/--runroot/--tmpdir, vfs, cgroupfs, a file events
    backend, and private containers.conf / registries.conf / storage.conf / auth file.

    ``docker.io`` is mapped to ``dead_location`` (a ``DeadPort`` address) with ``mirror`` as its
    only mirror, so a mirror failure cannot fall back off the machine. ``mirror`` may be given
    as ``127.0.0.1:PORT`` or ``http://127.0.0.1:PORT``. Use it as a context manager (or call
    ``close()``) to remove the temporary runroot.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mirror: str,
        dead_location: str,
        insecure: bool = True,
    ) -> None:
        self.podman_bin = require_binary("podman")
        self.workdir = Path(workdir)
        self.mirror = _strip_scheme(mirror)
        self.dead_location = _strip_scheme(dead_location)
        self.insecure = insecure
        self.root = self.workdir / "root"
        self.registries_conf = self.workdir / "registries.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.storage_conf = self.workdir / "storage.conf"
        self.auth_file = self.workdir / "auth.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._rundir: Path | None = _short_tmpdir("vr-podman-")
        self.runroot = self._rundir / "runroot"
        self.tmpdir = self._rundir / "tmp"
        (self._rundir / "copy").mkdir()
        self.write_registries_conf()
        if not self.auth_file.exists():  # podman insists that REGISTRY_AUTH_FILE exists
            self.auth_file.write_text('{"auths": {}}\n')
        self.containers_conf.write_text(
            "[containers]\n"
            # No CAP_SYS_RESOURCE here: podman's default ulimits cannot be applied.
            'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f"events_logfile_path = {json.dumps(str(self.workdir / 'events.log'))}\n"
            f"tmp_dir = {json.dumps(str(self.tmpdir))}\n"
            f"image_copy_tmp_dir = {json.dumps(str(self._rundir / 'copy'))}\n"
            'runtime = "runc"\n'
            "[network]\n"
            f"network_config_dir = {json.dumps(str(self.workdir / 'net.d'))}\n"
        )
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {json.dumps(str(self.root))}\n"
            f"runroot = {json.dumps(str(self.runroot))}\n"
        )

    def write_registries_conf(self, *, mirror: str | None = None) -> Path:
        """(Re)write registries.conf; podman reads it on every command."""
        if mirror is not None:
            self.mirror = _strip_scheme(mirror)
        insecure = "true" if self.insecure else "false"
        self.registries_conf.write_text(
            'unqualified-search-registries = ["docker.io"]\n'
            'short-name-mode = "permissive"\n'
            "\n"
            "[[registry]]\n"
            'prefix = "docker.io"\n'
            "# the real location is a dead loopback port: a mirror failure never leaves the box\n"
            f"location = {json.dumps(self.dead_location)}\n"
            f"insecure = {insecure}\n"
            "\n"
            "[[registry.mirror]]\n"
            f"location = {json.dumps(self.mirror)}\n"
            f"insecure = {insecure}\n"
        )
        return self.registries_conf

    def close(self) -> None:
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if self._rundir is None:
            raise RuntimeError("Podman is closed")
        env = _clean_env(
            {
                "CONTAINERS_CONF": str(self.containers_conf),
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
                "REGISTRY_AUTH_FILE": str(self.auth_file),
                "TMPDIR": str(self._rundir / "copy"),
            }
        )
        argv = [
            self.podman_bin,
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--tmpdir", str(self.tmpdir),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            *args,
        ]  # fmt: skip
        return _run(argv, env=env, timeout=timeout, check=check)

    def pull(
        self, ref: str, *, timeout: float = 120, check: bool = True, cold: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``podman pull ref``; with ``cold`` the image is removed first. Use fully qualified
        refs (``docker.io/library/x:tag``): short names may touch podman's global alias cache.
        """
        if cold:
            self.podman("rmi", "--force", "--ignore", ref, timeout=timeout, check=False)
        return self.podman("pull", ref, timeout=timeout, check=check)
