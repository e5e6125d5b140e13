"""HTTPS next to the plain listeners: Hypercorn with a switchable certificate, port 80,
the renewal loop, and the control socket `vpsrelay cert renew` talks to.

Everything runs in the nursery of `server.run` and stops with it. ACME calls run in
worker threads (`trio.to_thread.run_sync`); the event loop never waits on the CA.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import hypercorn.config
import hypercorn.trio
import trio

from vpsrelay import listeners, worker_identity
from vpsrelay.core import renewal
from vpsrelay.tls import certs, challenge_files, contexts as tls

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from vpsrelay.config import Settings
    from vpsrelay.exchange import Receive, Scope, Send

    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("vpsrelay.tls")

CONTROL_SOCKET = "control.sock"
CONTROL_TIMEOUT = 10.0
# Unix socket paths are limited to 107 bytes (sun_path).
MAX_SOCKET_PATH = 100
RENEW_REPLY_TIMEOUT = certs.ORDER_TIMEOUT.total_seconds() + 4 * certs.HTTP_TIMEOUT


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class TLSSetupError(Exception):
    """The TLS side cannot start (for example, unreadable `cert_file`); one line for the user."""


class Renewer:
    """Keeps an ACME certificate for `settings.tls.domains` current.

    `attempts` records the Trio clock at every order attempt, so a test can check the
    backoff schedule without waiting for it.
    """

    def __init__(
        self,
        settings: Settings,
        state: tls.TLSState,
        *,
        now: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.settings = settings
        self.tls = settings.tls
        self.state = state
        self.now = now
        self.attempts: list[float] = []
        self.failures = 0
        self._lock = trio.Lock()
        self._client: certs.AcmeClient | None = None
        # Told after a new certificate is stored and installed (the supervisor: tell workers).
        self.on_renewed: Callable[[], None] | None = None

    @property
    def live(self) -> Path:
        return certs.live_dir(self.settings.data_dir, self.tls.domains)

    def load_existing(self) -> certs.CertificateInfo | None:
        """Serve the stored certificate, if there is a usable one."""
        if certs.load_live(self.settings.data_dir, self.tls.domains) is None:
            return None
        try:
            info = self.state.install(self.live / "fullchain.pem", self.live / "privkey.pem")
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.warning("ignoring the stored certificate in %s: %s", self.live, exc)
            return None
        if not certs.covers(info, self.tls.domains):
            log.info("the stored certificate does not name all of %s", ",".join(self.tls.domains))
        return info

    def _acme(self) -> certs.AcmeClient:
        if self._client is None:
            self._client = certs.AcmeClient(self.tls, self.settings.data_dir)
        return self._client

    async def _due(self) -> bool:
        info = self.state.info
        if info is None or not certs.covers(info, self.tls.domains):
            return True
        source = certs.issued_by(self.settings.data_dir, self.tls.domains)
        if source is not None and source != self.tls.acme_directory:
            log.info("the stored certificate came from %s; ordering one from the CA now", source)
            return True
        now = self.now()
        if renewal.renewal_due(now, info.validity, self.tls.renew_before):
            return True
        fullchain = self.live / "fullchain.pem"
        suggested = await trio.to_thread.run_sync(
            lambda: self._acme().suggested_renewal(fullchain.read_bytes()), abandon_on_cancel=True
        )
        return renewal.renewal_due(now, info.validity, self.tls.renew_before, suggested)

    async def check(self, *, force: bool = False) -> certs.CertificateInfo | None:
        """Renew if due (or if `force`); the new certificate, or None if none was needed.

        Raises:
            certs.AcmeError: the CA's error; the certificate served so far stays.
        """
        async with self._lock:
            if not force and not await self._due():
                return None
            self.attempts.append(trio.current_time())
            domains = ",".join(self.tls.domains)
            log.info(
                "requesting a certificate for %s from %s (%s)",
                domains,
                self.tls.acme_directory,
                self.tls.challenge,
            )

            def issue_and_store() -> None:
                issued = self._acme().issue(self.tls.domains, self.state)
                certs.store(
                    self.settings.data_dir, self.tls.domains, issued, self.tls.acme_directory
                )

            await trio.to_thread.run_sync(issue_and_store, abandon_on_cancel=True)
            info = self.state.install(self.live / "fullchain.pem", self.live / "privkey.pem")
            if self.on_renewed is not None:
                self.on_renewed()
            return info

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check now and every 12 hours; after a failure retry with backoff (1, 2, 4 ... min)."""
        task_status.started()
        while True:
            try:
                await self.check()
                self.failures = 0
                delay = renewal.CHECK_INTERVAL
                info = self.state.info
                if info is not None:
                    due = renewal.renewal_time(info.validity, self.tls.renew_before)
                    delay = renewal.next_check_delay(self.now(), due) or renewal.CHECK_INTERVAL
            except certs.AcmeError as exc:
                self.failures += 1
                delay = renewal.retry_delay(self.failures)
                serving = (
                    "still serving the current certificate" if self.state.info else "no TLS yet"
                )
                log.error(
                    "certificate for %s not obtained (attempt %d): %s; %s; next attempt in %.0fs",
                    ",".join(self.tls.domains),
                    self.failures,
                    exc,
                    serving,
                    delay,
                )
            await trio.sleep(delay)


# --- Hypercorn


class _ManagedTLSConfig(hypercorn.config.Config):
    """Hypercorn's config, with the context from `TLSState` instead of cert/key files."""

    front_context: ssl.SSLContext

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self.front_context


def _bind(role: str, address: str) -> str:
    return listeners.bind_spec(role, address)


def _copy_config(
    base: hypercorn.config.Config, cls: type[hypercorn.config.Config], binds: tuple[str, ...]
) -> Any:
    config = cls()
    config.__dict__.update(base.__dict__)
    role = listeners.HTTPS if issubclass(cls, _ManagedTLSConfig) else listeners.PORT80
    config.bind = [_bind(role, address) for address in binds]
    config.insecure_bind = []
    return config


async def _until(stop: trio.Event, function: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(function)
        await stop.wait()
        nursery.cancel_scope.cancel()


class CertificateWatch(Protocol):
    """Who hears which certificate is in service (readiness: `ops.health.TlsStatus`)."""

    enabled: bool

    def loaded(self, not_after: float) -> None: ...


async def start(
    nursery: trio.Nursery,
    settings: Settings,
    app: ASGIApp,
    watch: CertificateWatch,
    stop: trio.Event,
    base: hypercorn.config.Config,
) -> list[str]:
    """Start HTTPS, port 80 and the certificate upkeep in `nursery`; the HTTPS URLs bound.

    Raises:
        TLSSetupError: your own certificate files cannot be loaded.
    """
    config = settings.tls
    supervised = worker_identity.current().supervised
    shared = challenge_files.ChallengeFiles(challenge_files.directory(settings.data_dir))
    state = tls.TLSState(shared if supervised else None)
    watch.enabled = True  # unready until a certificate is in service
    state.on_install = watch.loaded
    renewer: Renewer | None = None
    live = certs.live_dir(settings.data_dir, config.domains) if config.acme else None
    if config.acme and supervised:
        # The supervisor orders and renews; this worker serves what it stores (`follow`).
        _install_stored(state, settings)
    elif config.acme:
        renewer = Renewer(settings, state)
        renewer.load_existing()
    elif config.cert_file is not None and config.key_file is not None:
        try:
            state.install(config.cert_file, config.key_file)
        except (OSError, ValueError) as exc:
            raise TLSSetupError(
                f"cannot load {config.cert_file} / {config.key_file}: {exc}"
            ) from exc
    https_config = _copy_config(base, _ManagedTLSConfig, config.https_listen)
    https_config.front_context = state.front
    https_binds: list[str] = await nursery.start(
        partial(
            hypercorn.trio.serve,
            tls.HSTS(app),  # type: ignore[arg-type]
            https_config,
            shutdown_trigger=stop.wait,
        )
    )
    https_port = int(https_binds[0].rsplit(":", 1)[1])
    plain_config = _copy_config(base, hypercorn.config.Config, config.http_listen)
    http_binds: list[str] = await nursery.start(
        partial(
            hypercorn.trio.serve,
            tls.PlainPort(state, https_port),  # type: ignore[arg-type]
            plain_config,
            shutdown_trigger=stop.wait,
        )
    )
    for bind in http_binds:
        log.info("ACME HTTP-01 answers and https redirects on %s", bind)
    if renewer is not None:
        nursery.start_soon(_until, stop, renewer.run)
        control = settings.data_dir / CONTROL_SOCKET
        nursery.start_soon(_until, stop, partial(serve_control, control, renewer))
    elif live is not None:  # a worker: reload what the supervisor stores (it sends SIGHUP)
        follow = partial(tls.watch_files, state, live / "fullchain.pem", live / "privkey.pem")
        nursery.start_soon(_until, stop, follow)
    elif config.cert_file is not None and config.key_file is not None:
        nursery.start_soon(
            _until, stop, partial(tls.watch_files, state, config.cert_file, config.key_file)
        )
    return https_binds


def _install_stored(state: tls.TLSState, settings: Settings) -> None:
    """A worker's start: serve the stored ACME certificate, if there is one yet."""
    live = certs.live_dir(settings.data_dir, settings.tls.domains)
    if certs.load_live(settings.data_dir, settings.tls.domains) is None:
        return
    try:
        state.install(live / "fullchain.pem", live / "privkey.pem")
    except (OSError, ValueError) as exc:
        log.warning("ignoring the stored certificate in %s: %s", live, exc)


async def keep_certificate(
    settings: Settings,
    stop: trio.Event,
    on_renewed: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The supervisor's part of ACME: order and renew for every worker, answer `cert renew`.

    Challenges go to files the workers answer from; `on_renewed` tells them to reload.
    """
    shared = challenge_files.ChallengeFiles(challenge_files.directory(settings.data_dir))
    shared.clear()
    renewer = Renewer(settings, tls.TLSState(shared))
    renewer.load_existing()
    renewer.on_renewed = on_renewed
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until, stop, renewer.run)
        control = settings.data_dir / CONTROL_SOCKET
        nursery.start_soon(_until, stop, partial(serve_control, control, renewer))
        task_status.started()


# --- control socket: `vpsrelay cert renew` asks the running relay


def _prepare_socket_path(path: Path) -> bool:
    if len(os.fsencode(path.resolve())) > MAX_SOCKET_PATH:
        log.warning(
            "%s: path too long for a unix socket; `cert renew` cannot reach this relay", path
        )
        return False
    _remove(path)  # left by a relay that was killed
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def serve_control(path: Path, renewer: Renewer) -> None:
    if not _prepare_socket_path(path):
        return
    listener_socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await listener_socket.bind(str(path))
    finally:
        os.umask(old_umask)
    listener_socket.listen(8)
    try:
        await trio.serve_listeners(
            partial(_control_connection, renewer), [trio.SocketListener(listener_socket)]
        )
    finally:
        _remove(path)


async def _control_connection(renewer: Renewer, stream: trio.SocketStream) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(CONTROL_TIMEOUT):
            while b"\n" not in request and len(request) < 4096:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
        try:
            command = json.loads(request)
            force = bool(command.get("force", False))
            if command.get("command") != "renew":
                raise ValueError("unknown command")
        except (ValueError, AttributeError) as exc:
            await stream.send_all(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
            return
        reply: dict[str, object]
        try:
            info = await renewer.check(force=force)
            reply = {"ok": True, "renewed": info is not None}
            current = renewer.state.info
            if current is not None:
                reply.update(_describe(current, renewer.now()))
        except certs.AcmeError as exc:
            reply = {"ok": False, "error": str(exc)}
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


def _describe(info: certs.CertificateInfo, now: datetime.datetime) -> dict[str, object]:
    return {
        "serial": f"{info.serial:x}",
        "names": list(info.names),
        "issuer": info.issuer,
        "not_after": info.validity.not_after.isoformat(),
        "days_left": round(info.days_left(now), 1),
    }


def request_renewal(data_dir: Path, *, force: bool) -> dict[str, Any] | None:
    """Ask a running relay to renew (blocking; for the CLI). None if no relay answers."""
    path = data_dir / CONTROL_SOCKET
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(RENEW_REPLY_TIMEOUT)
        try:
            client.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        client.sendall(json.dumps({"command": "renew", "force": force}).encode() + b"\n")
        reply = b""
        while b"\n" not in reply:
            chunk = client.recv(65536)
            if not chunk:
                break
            reply += chunk
    result: dict[str, Any] = json.loads(reply)
    return result


async def renew_standalone(settings: Settings, *, force: bool) -> dict[str, Any]:
    """`cert renew` with no relay running: answer the challenges ourselves, then exit."""
    state = tls.TLSState()
    renewer = Renewer(settings, state)
    renewer.load_existing()
    stop = trio.Event()
    base = hypercorn.config.Config()
    base.accesslog = None
    base.errorlog = logging.getLogger("vpsrelay.server")
    try:
        async with trio.open_nursery() as nursery:
            plain = _copy_config(base, hypercorn.config.Config, settings.tls.http_listen)
            listen = partial(hypercorn.trio.serve, shutdown_trigger=stop.wait)
            if settings.tls.challenge == "http-01":
                await nursery.start(listen, tls.PlainPort(state, 443), plain)
            else:
                secure = _copy_config(base, _ManagedTLSConfig, settings.tls.https_listen)
                secure.front_context = state.front
                await nursery.start(listen, tls.PlainPort(state, 443), secure)
            try:
                info = await renewer.check(force=force)
                reply: dict[str, Any] = {"ok": True, "renewed": info is not None}
                if state.info is not None:
                    reply.update(_describe(state.info, renewer.now()))
            except certs.AcmeError as exc:
                reply = {"ok": False, "error": str(exc)}
            stop.set()
    finally:
        stop.set()
    return reply
