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

import hypercorn.config
import hypercorn.trio
import trio

from vpsrelay import __version__, hypercorn_patches
from vpsrelay.app import RelayApp
from vpsrelay.config import Settings, parse_listen
from vpsrelay.upstream import Upstream

log = logging.getLogger("vpsrelay")


def hypercorn_config(settings: Settings) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [_bind(address) for address in settings.server.listen]
    config.keep_alive_timeout = settings.server.keep_alive_timeout
    config.read_timeout = int(settings.server.read_timeout)
    config.graceful_timeout = settings.server.graceful_timeout
    config.include_server_header = False
    # Request line and headers, HTTP/1.1 and HTTP/2 alike (issue 5): over the limit, h11
    # answers 431 and h2 resets the stream, before the app sees anything.
    config.h11_max_incomplete_size = settings.server.max_header_bytes
    config.h2_max_header_list_size = settings.server.max_header_bytes
    config.accesslog = None  # the app writes its own access log, with upstream timings
    config.errorlog = logging.getLogger("vpsrelay.server")
    return config


def _bind(address: str) -> str:
    host, port = parse_listen(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()
            return


async def run(
    settings: Settings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until SIGTERM/SIGINT; `task_status.started` gets the bound URLs."""
    hypercorn_patches.apply()
    stop = trio.Event()
    upstream = Upstream(settings)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, stop)
            app = RelayApp(settings, upstream)
            config = hypercorn_config(settings)
            hypercorn_patches.cap_connections(
                config, settings.server.max_connections, app.guard.record_reason
            )
            _check_descriptor_limit(settings.server.max_connections)
            # hypercorn's app type is a union of its own TypedDict protocols; ours is generic.
            serve = partial(
                hypercorn.trio.serve,
                app,  # type: ignore[arg-type]
                config,
                shutdown_trigger=stop.wait,
            )
            binds: list[str] = await nursery.start(serve)
            for bind in binds:
                log.info("vpsrelay %s listening on %s", __version__, bind)
            sys.stderr.flush()
            task_status.started(binds)
            await stop.wait()
            # hypercorn returns once in-flight requests finish (or the grace period ends).
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
