"""The supervising parent of `server.workers` > 1: listeners, workers, signals, ACME.

The parent binds every listener once, then starts the workers (`python -m vpsrelay.worker`)
with those sockets inherited: one shared listening socket per address, whichever worker
accepts first gets the connection (docs/architecture.md says why not SO_REUSEPORT). It
handles no client traffic at all: its only sockets are the listeners it hands on (it never
accepts on them) and the `cert renew` control socket.

- A worker that dies is replaced under the same number. One that dies within
  `FAST_EXIT_SECONDS` of starting waits a doubling backoff first; `MAX_FAST_EXITS` such
  deaths in a row make the parent stop everything and exit 1: a worker that cannot start
  is a broken installation, not something to retry forever.
- A worker whose heartbeat (its status file) is older than `STALE_SECONDS` is hung: it
  is killed, then replaced like a dead one.
- SIGTERM/SIGINT: every worker gets SIGTERM and drains within `server.graceful_timeout`
  (it ends itself after that, `shutdown.exit_after_grace`); one still there a margin later
  is killed. The parent then exits 0.
- SIGHUP is forwarded: workers reload their own certificate files.
- ACME (`tls.acme`): orders and renewals happen here, in one process; the workers answer
  the CA's validations from files (`tls/challenge_files.py`) and reload the stored
  certificate when the parent sends SIGHUP after a renewal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import vpsrelay
from vpsrelay import __version__, listeners, patches as library_patches, shutdown, worker_identity
from vpsrelay.core.fleet import HEARTBEAT_SECONDS, STALE_SECONDS
from vpsrelay.ops import fleet

if TYPE_CHECKING:
    import socket

    from vpsrelay.config import Settings

log = logging.getLogger("vpsrelay.supervisor")

# -P: `-m` would otherwise put the working directory first on sys.path, and anyone who can
# write there (/tmp, a shared home, a container's WORKDIR) would run code in every worker.
# Not -I: PYTHONPATH is how the workers find the same code as this process (`_environment`).
WORKER_COMMAND = (sys.executable, "-P", "-m", "vpsrelay.worker")
WORKER_UMASK = 0o077
READY_FD_ENVIRONMENT = "_VPSRELAY_READY_FD"  # where a worker writes `ready`
SETTINGS_LENGTH = struct.Struct("!I")
START_TIMEOUT = 60.0  # seconds from spawn to every listener served
FAST_EXIT_SECONDS = 10.0
MAX_FAST_EXITS = 5
MAX_BACKOFF = 8.0
STOP_MARGIN = shutdown.MARGIN_SECONDS + 2.0  # after graceful_timeout, before SIGKILL


class StartError(Exception):
    """A worker could not start; the message says which and how it ended."""


@dataclass(slots=True)
class _Listener:
    address: str
    scheme: str
    role: str  # listeners.PLAIN, HTTPS, PORT80, METRICS
    sock: socket.socket


def _exit_description(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.server.workers
        self.listeners: list[_Listener] = []
        self.processes: dict[int, trio.Process] = {}
        self.started_at: dict[int, float] = {}
        self.stop = trio.Event()
        self.stopping = False
        self.failure: str | None = None
        self._payload = b""
        self._exited: set[int] = set()
        self._told_unwritable = False

    # --- listeners

    def bind_all(self) -> None:
        """Bind every configured address, before any worker exists.

        Raises:
            OSError: an address is taken (nothing else was left bound).
        """
        settings = self.settings
        wanted: list[tuple[str, str, str]] = []
        if settings.tls.enabled:
            wanted += [(a, "https", listeners.HTTPS) for a in settings.tls.https_listen]
            wanted += [(a, "http", listeners.PORT80) for a in settings.tls.http_listen]
        wanted += [(a, "http", listeners.PLAIN) for a in settings.server.listen]
        if settings.metrics.enabled and settings.metrics.listen is not None:
            wanted.append((settings.metrics.listen, "http", listeners.METRICS))
        try:
            for address, scheme, role in wanted:
                self.listeners.append(_Listener(address, scheme, role, listeners.bind(address)))
        except OSError:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        for listener in self.listeners:
            listener.sock.close()

    def _announce(self) -> None:
        """The lines `scripts/serve`, tests and operators wait for, once every worker serves."""
        for listener in self.listeners:
            url = listeners.url(listener.sock, listener.scheme)
            if listener.role in (listeners.HTTPS, listeners.PLAIN):
                log.info("vpsrelay %s listening on %s", __version__, url)
            elif listener.role == listeners.PORT80:
                log.info("ACME HTTP-01 answers and https redirects on %s", url)
            else:
                log.info("metrics served at %s/metrics", url)
        log.info("%d workers serving, supervisor pid %d", self.count, os.getpid())
        sys.stderr.flush()

    # --- workers

    def _environment(self, number: int, ready_fd: int) -> dict[str, str]:
        environment = dict(os.environ)  # noqa: TID251 - the workers' own environment
        identity = worker_identity.WorkerIdentity(number, self.count)
        environment[worker_identity.ENVIRONMENT_NAME] = identity.environment_value()
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(
            worker_identity.metrics_dir(self.settings.data_dir)
        )
        table = {
            listeners.key(item.role, item.address): item.sock.fileno() for item in self.listeners
        }
        environment[listeners.ENVIRONMENT_NAME] = listeners.encode(table)
        environment[READY_FD_ENVIRONMENT] = str(ready_fd)
        # The workers run the same code as this process, wherever it was imported from.
        root = str(Path(vpsrelay.__file__).resolve().parents[1])
        if root not in sys.path:
            environment["PYTHONPATH"] = os.pathsep.join(
                p for p in (root, environment.get("PYTHONPATH", "")) if p
            )
        return environment

    async def _start(self, number: int) -> bool:
        """Start worker `number`; True once it serves, False if it died (or hung) first."""
        ready_read, ready_write = os.pipe()
        try:
            process = await trio.lowlevel.open_process(
                WORKER_COMMAND,
                stdin=subprocess.PIPE,
                pass_fds=(*(item.sock.fileno() for item in self.listeners), ready_write),
                env=self._environment(number, ready_write),
                # prometheus-client creates its files with the umask's mode: the owner's alone,
                # like everything else under the data dir (private_files).
                umask=WORKER_UMASK,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        self.processes[number] = process
        self.started_at[number] = trio.current_time()
        answer = b""
        async with trio.lowlevel.FdStream(ready_read) as ready:
            assert process.stdin is not None
            with trio.move_on_after(START_TIMEOUT) as waiting:
                try:
                    # The pipe stays open for the worker's life: its EOF tells it we are gone.
                    await process.stdin.send_all(_settings_payload(self))
                    while chunk := await ready.receive_some(64):
                        answer += chunk
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # it died before reading its settings
        if answer.startswith(b"ready"):
            log.info("worker w%d started, pid %d", number, process.pid)
            return True
        if waiting.cancelled_caught:
            log.error("worker w%d (pid %d) did not start within %gs", number, process.pid,
                      START_TIMEOUT)  # fmt: skip
            process.kill()
        await process.wait()
        return False

    async def start_all(self) -> None:
        """Start every worker at once; all serve, or none is left running.

        Raises:
            StartError: which worker did not start, and how it ended.
        """
        results: dict[int, bool] = {}

        async def one(number: int) -> None:
            results[number] = await self._start(number)

        async with trio.open_nursery() as nursery:
            for number in range(1, self.count + 1):
                nursery.start_soon(one, number)
        failed = sorted(number for number, ok in results.items() if not ok)
        if failed:
            number = failed[0]
            how = _exit_description(self.processes[number].returncode or 0)
            await self.stop_all()
            raise StartError(f"worker w{number} exited with {how} before it was ready")

    async def _keep(self, number: int) -> None:
        """Replace worker `number` whenever it dies, until the relay stops."""
        fast_exits = 0
        while True:
            process = self.processes[number]
            status = await process.wait()
            self._worker_exited(number, process.pid)
            if self.stopping:
                return
            lived = trio.current_time() - self.started_at[number]
            fast_exits = fast_exits + 1 if lived < FAST_EXIT_SECONDS else 0
            if fast_exits >= MAX_FAST_EXITS:
                self.failure = (
                    f"worker w{number} exited {fast_exits} times in a row within "
                    f"{FAST_EXIT_SECONDS:g}s of starting (last: {_exit_description(status)}); "
                    "giving up"
                )
                log.error("%s", self.failure)
                self.stop.set()
                return
            delay = min(MAX_BACKOFF, 0.25 * 2 ** (fast_exits - 1)) if fast_exits else 0.0
            log.warning(
                "worker w%d (pid %d) exited with %s after %.1fs; starting a new one in %.2gs",
                number, process.pid, _exit_description(status), lived, delay,
            )  # fmt: skip
            await trio.sleep(delay)
            if self.stop.is_set():
                return
            await self._start(number)

    async def watch_heartbeats(self) -> None:
        """Kill a worker whose heartbeat stopped (its event loop is stuck): `_keep` then
        replaces it like any dead one. The connections it holds hang until then; new ones
        go to the others, which keep accepting."""
        while True:
            await trio.sleep(HEARTBEAT_SECONDS)
            statuses = await trio.to_thread.run_sync(fleet.read_statuses, self.settings.data_dir)
            now = time.monotonic()  # the clock the heartbeats are written in
            for number, process in self.processes.items():
                status = statuses.get(number)
                if self.stopping or process.returncode is not None or status is None:
                    continue
                if status.pid != process.pid or status.draining or status.exited:
                    continue  # still starting (no status of its own yet), or stopping
                silent = now - status.heartbeat
                if silent > STALE_SECONDS and not await self._status_writable():
                    continue  # it cannot write its heartbeat: that is no hang
                if silent > STALE_SECONDS:
                    log.error(
                        "worker w%d (pid %d) sent no heartbeat for %.0fs: killing it",
                        number, process.pid, silent,
                    )  # fmt: skip
                    process.kill()

    async def _status_writable(self) -> bool:
        writable = await trio.to_thread.run_sync(fleet.status_writable, self.settings.data_dir)
        if not writable and not self._told_unwritable:
            log.warning("worker status files cannot be written (disk full or read-only?): "
                        "no worker is killed for a missing heartbeat meanwhile")  # fmt: skip
        self._told_unwritable = not writable
        return writable

    def signal_workers(self, signum: int) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signum)

    def reload_certificates(self) -> None:
        log.info("telling every worker to reload its certificate")
        self.signal_workers(signal.SIGHUP)

    async def stop_all(self) -> None:
        """SIGTERM to every worker; wait out the grace period; kill what is left."""
        self.stopping = True
        self.close_listeners()
        self.signal_workers(signal.SIGTERM)
        grace = self.settings.server.graceful_timeout
        with trio.move_on_after(grace + STOP_MARGIN):
            for process in self.processes.values():
                await process.wait()
        for number, process in self.processes.items():
            if process.returncode is None:
                log.warning("worker w%d (pid %d) outlived the grace period: killing it",
                            number, process.pid)  # fmt: skip
                process.kill()
                await process.wait()
            self._worker_exited(number, process.pid)

    def _worker_exited(self, number: int, pid: int) -> None:
        """Tell the fleet files once per process (its metrics are folded into the totals)."""
        if pid not in self._exited:
            self._exited.add(pid)
            fleet.worker_exited(self.settings.data_dir, number, pid)

    # --- signals, and children that are not ours (as PID 1 in a container)

    async def handle_signals(self) -> None:
        """For the parent's whole life: a second SIGTERM must not end it mid-drain."""
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as received:
            async for signum in received:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    log.info("received SIGHUP, forwarding it to every worker")
                    self.signal_workers(signal.SIGHUP)
                elif self.stop.is_set():
                    log.info("received %s, already stopping", name)
                else:
                    log.info("received %s, stopping every worker", name)
                    self.stop.set()

    async def reap_orphans(self) -> None:
        """As PID 1, processes orphaned anywhere in the container become our children."""
        while True:
            await trio.sleep(5)
            ours = {process.pid for process in self.processes.values()}
            for pid in _zombie_children(os.getpid()) - ours:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - a zombie: returns at once


def encode_settings(settings: Settings) -> bytes:
    """What a worker reads from its stdin (`vpsrelay.worker.read_settings`)."""
    payload = pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
    return SETTINGS_LENGTH.pack(len(payload)) + payload


def _settings_payload(supervisor: Supervisor) -> bytes:
    if not supervisor._payload:
        supervisor._payload = encode_settings(supervisor.settings)
    return supervisor._payload


def _zombie_children(parent: int) -> set[int]:
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) >= 2 and fields[0] == "Z" and fields[1] == str(parent):
            found.add(int(entry.name))
    return found


async def supervise(settings: Settings, supervisor: Supervisor) -> int:
    """Run the workers until a stop signal (exit status 0) or a worker that cannot run (1)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.handle_signals)
        try:
            await supervisor.start_all()
        except StartError as exc:
            supervisor.failure = str(exc)
            log.error("%s", exc)
            nursery.cancel_scope.cancel()
            return 1
        supervisor._announce()
        keepers = trio.CancelScope()
        nursery.start_soon(_run_in, keepers, supervisor)
        if os.getpid() == 1:
            nursery.start_soon(supervisor.reap_orphans)
        if settings.tls.enabled and settings.tls.acme:
            from vpsrelay.tls import serving as tlsserver  # late: plain mode needs no ACME

            await nursery.start(
                tlsserver.keep_certificate,
                settings,
                supervisor.stop,
                supervisor.reload_certificates,
            )
        await supervisor.stop.wait()
        keepers.cancel()
        await supervisor.stop_all()
        nursery.cancel_scope.cancel()
    return 1 if supervisor.failure else 0


async def _run_in(scope: trio.CancelScope, supervisor: Supervisor) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            for number in range(1, supervisor.count + 1):
                nursery.start_soon(supervisor._keep, number)
            nursery.start_soon(supervisor.watch_heartbeats)


def run(settings: Settings) -> int:
    """`vpsrelay serve` with workers > 1: the exit status.

    Raises:
        OSError: a listener cannot be bound, or another supervisor runs on this data dir
            (`fleet.RunDirTaken`); no worker was started.
        hypercorn_patches.PatchError: the safety patches cannot apply (each worker would
            refuse to serve): said once, here, before anything starts.
    """
    library_patches.apply_all(settings)
    # A second `serve` on this data dir stops here, before touching the first one's files.
    run_lock = fleet.hold_run_dir(settings.data_dir)
    try:
        supervisor = Supervisor(settings)
        supervisor.bind_all()
        try:
            fleet.prepare(settings.data_dir)
            return trio.run(supervise, settings, supervisor)
        finally:
            supervisor.close_listeners()
    finally:
        os.close(run_lock)
