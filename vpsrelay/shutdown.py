"""The grace period on SIGTERM is a promise: the process ends when it is over.

Hypercorn gives in-flight requests `graceful_timeout` seconds and then cancels them, but it
writes to the socket inside a shielded cancel scope (`TCPServer.protocol_send`), so a response
whose client stopped reading cannot be cancelled: a single stalled client kept the relay alive
past the grace period, for as long as TCP keeps the connection (verified with a client that
reads one MiB of a large layer and stops). `docker stop` and systemd would then SIGKILL it.
This wrapper waits `grace` (plus a margin for Hypercorn's own clean-up) after the stop
signal; if the server has not returned by then, it logs how it ends and exits the process.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger("vpsrelay")

MARGIN_SECONDS = 1.0


async def serve_with_deadline(
    serve: Callable[..., Awaitable[None]],
    stop: trio.Event,
    grace: float,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `serve` (Hypercorn's, started with `task_status`); after `stop`, give it `grace`
    seconds plus a margin to return, then end the process (exit status 0: a requested stop)."""
    async with trio.open_nursery() as nursery:

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(task_status=task_status)
            nursery.cancel_scope.cancel()  # returned in time: no deadline needed

        binds: list[str] = await nursery.start(run)
        task_status.started(binds)
        await stop.wait()
        await trio.sleep(grace + MARGIN_SECONDS)
        log.warning(
            "grace period of %gs is over and a client still holds a response: exiting", grace
        )
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
