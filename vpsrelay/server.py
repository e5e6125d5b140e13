"""Run the relay: Hypercorn on Trio, the upstream client, signals.

Everything lives in one nursery owned by `run`; SIGTERM/SIGINT stop accepting
and give in-flight pulls `server.graceful_timeout` seconds to finish.
"""

from __future__ import annotations

import logging
import signal
import sys
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from vpsrelay import __version__, hypercorn_patches, shutdown
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
    config.accesslog = None  # the app writes its own access log, with upstream timings
    config.errorlog = logging.getLogger("vpsrelay.server")
    return config


def _bind(address: str) -> str:
    host, port = parse_listen(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
            # hypercorn's app type is a union of its own TypedDict protocols; ours is generic.
            serve = partial(
                hypercorn.trio.serve,
                app,  # type: ignore[arg-type]
                hypercorn_config(settings),
                shutdown_trigger=stop.wait,
            )
            binds: list[str] = await nursery.start(
                shutdown.serve_with_deadline, serve, stop, settings.server.graceful_timeout
            )
            for bind in binds:
                log.info("vpsrelay %s listening on %s", __version__, bind)
            sys.stderr.flush()
            task_status.started(binds)
            await stop.wait()
            # hypercorn returns once in-flight requests finish (or the grace period ends).
    finally:
        with trio.CancelScope(shield=True):
            await upstream.aclose()
