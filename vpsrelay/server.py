"""Run the relay: Hypercorn on Trio, the upstream client, signals.

Everything lives in one nursery owned by `run`; SIGTERM/SIGINT stop accepting
and give in-flight pulls `server.graceful_timeout` seconds to finish.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING

import hypercorn.config
import hypercorn.trio
import trio

from vpsrelay import (
    __version__,
    listeners,
    patches as library_patches,
    shutdown,
    worker_identity,
)
from vpsrelay.app import RelayApp
from vpsrelay.cache import open_store
from vpsrelay.core.connslots import ConnectionSlots
from vpsrelay.ops import fleet
from vpsrelay.ops.operator_paths import OperatorApp
from vpsrelay.patches import hypercorn as hypercorn_patches
from vpsrelay.upstream import Upstream

if TYPE_CHECKING:
    from vpsrelay.cache.storage import BlobStore
    from vpsrelay.config import Settings

log = logging.getLogger("vpsrelay")


def hypercorn_config(settings: Settings) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [_bind(listeners.PLAIN, address) for address in settings.server.listen]
    config.keep_alive_timeout = settings.server.keep_alive_timeout
    # Hypercorn annotates read_timeout `int` but uses it as seconds (`or inf`, a deadline):
    # int() made 0.5 into 0, which it reads as "no timeout".
    config.read_timeout = settings.server.read_timeout  # type: ignore[assignment]
    config.graceful_timeout = settings.server.graceful_timeout
    config.include_server_header = False
    # Request line and headers, HTTP/1.1 and HTTP/2 alike (issue 5): over the limit, h11
    # answers 431 and h2 resets the stream, before the app sees anything.
    config.h11_max_incomplete_size = settings.server.max_header_bytes
    config.h2_max_header_list_size = settings.server.max_header_bytes
    config.accesslog = None  # the app writes its own access log, with upstream timings
    config.errorlog = logging.getLogger("vpsrelay.server")
    return config


def _bind(role: str, address: str) -> str:
    # A worker serves the socket its supervisor bound (`fd://N`); alone, it binds itself.
    return listeners.bind_spec(role, address)


def _check_descriptor_limit(max_connections: int) -> None:
    """Warn when the connection cap cannot be reached: descriptors run out first."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Each client connection may need an upstream connection too, plus files and slack.
    needed = 2 * max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-file limit (%d) is below what server.max_connections = %d needs (%d): "
            "raise it (ulimit -n, LimitNOFILE=) or lower max_connections",
            soft, max_connections, needed,
        )  # fmt: skip


def _connection_policy(settings: Settings, app: RelayApp) -> hypercorn_patches.ConnectionPolicy:
    server = settings.server
    slots = ConnectionSlots(
        server.max_connections,
        server.max_connections_per_ip,
        server.trusted_proxies,
        settings.limits.ipv6_prefix_length,
    )

    def refused(reason: str, detail: str) -> None:
        app.guard.record_reason(reason, detail)
        app.metrics.refused(reason)

    return hypercorn_patches.ConnectionPolicy(
        slots=slots,
        head_timeout=server.head_timeout,
        stall_timeout=server.stall_timeout,
        on_refused=refused,
        on_error=app.metrics.connection_error,
    )


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()
            return


async def _serve_operator(
    nursery: trio.Nursery, settings: Settings, app: RelayApp, stop: trio.Event
) -> None:
    """`/metrics` (and /readyz, /healthz) on their own address: `metrics.listen`."""
    assert settings.metrics.listen is not None
    config = hypercorn_config(settings)
    config.bind = [_bind(listeners.METRICS, settings.metrics.listen)]
    serve = partial(
        hypercorn.trio.serve,
        OperatorApp(app.operator),  # type: ignore[arg-type]
        config,
        shutdown_trigger=stop.wait,
    )
    binds: list[str] = await nursery.start(serve)
    if not worker_identity.current().supervised:  # the supervisor says it once
        for bind in binds:
            log.info("metrics served at %s/metrics", bind)


async def run(
    settings: Settings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM/SIGINT; `task_status.started` gets the bound URLs.

    Raises:
        hypercorn_patches.PatchError: the safety patches cannot apply; nothing was served.
    """
    degraded = library_patches.apply_all(settings)
    stop = trio.Event()
    upstream = Upstream(settings)
    store = await open_store(settings)
    try:
        async with trio.open_nursery() as watchdog:
            watchdog.start_soon(shutdown.exit_after_grace, stop, settings.server.graceful_timeout)
            if store is not None:
                watchdog.start_soon(store.maintain)
            await _serve(settings, upstream, store, stop, task_status, degraded)
            watchdog.cancel_scope.cancel()  # every server returned within the grace period
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
            if store is not None:
                await store.aclose()


async def _serve(
    settings: Settings,
    upstream: Upstream,
    store: BlobStore | None,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]],
    degraded: tuple[library_patches.Degraded, ...] = (),
) -> None:
    """Every listener in one nursery; returns once they have all stopped."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        app = RelayApp(settings, upstream, store)
        app.health.degraded = degraded
        config = hypercorn_config(settings)
        # One connection policy (and one set of slots) for every listener: the TLS ones
        # copy this config. It subclasses Hypercorn's internals: pinned versions only.
        if library_patches.applied(library_patches.HYPERCORN, degraded):
            policy = _connection_policy(settings, app)
            hypercorn_patches.install_connection_policy(config, policy)
        _check_descriptor_limit(settings.server.max_connections)
        # hypercorn's app type is a union of its own TypedDict protocols; ours is generic.
        serve = partial(
            hypercorn.trio.serve,
            app,  # type: ignore[arg-type]
            config,
            shutdown_trigger=stop.wait,
        )
        binds: list[str] = await nursery.start(serve)
        if settings.tls.enabled:
            from vpsrelay.tls import (
                serving as tlsserver,  # imported late: plain mode needs no ACME stack
            )

            https = await tlsserver.start(nursery, settings, app, app.health.tls, stop, config)
            binds = [*https, *binds]
        identity = worker_identity.current()
        for bind in binds:
            if identity.supervised:  # the supervisor says "listening" once all are ready
                log.info("worker %s serving %s", identity.label, bind)
            else:
                log.info("vpsrelay %s listening on %s", __version__, bind)
        if settings.metrics.enabled and settings.metrics.listen is not None:
            await _serve_operator(nursery, settings, app, stop)
        sys.stderr.flush()
        task_status.started(binds)
        # A supervised worker's status file (for /readyz and /metrics in every worker).
        nursery.start_soon(fleet.keep_status, settings.data_dir, app.health.own_status, stop)
        nursery.start_soon(app.guard.settle_owed, stop)
        await stop.wait()
        # hypercorn returns once in-flight requests finish (or the grace period ends).
