"""The grace period on SIGTERM is a promise: the process ends when it is over.

Hypercorn gives in-flight requests `graceful_timeout` seconds and then cancels them, but it
writes to the socket inside a shielded cancel scope (`TCPServer.protocol_send`), so a response
whose client stopped reading cannot be cancelled: a single stalled client kept the relay alive
past the grace period, for as long as TCP keeps the connection (verified with a client that
reads one MiB of a large layer and stops). `docker stop` and systemd would then SIGKILL it.
`exit_after_grace` waits `grace` (plus a margin for Hypercorn's own clean-up) after the stop
signal; if the servers have not returned by then, it logs how it ends and exits the process.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

log = logging.getLogger("vpsrelay")

MARGIN_SECONDS = 1.0


async def exit_after_grace(stop: trio.Event, grace: float) -> None:
    """After `stop`, give the servers `grace` seconds plus a margin to return (the caller
    cancels this when they do); then end the process (exit status 0: a requested stop)."""
    await stop.wait()
    await trio.sleep(grace + MARGIN_SECONDS)
    log.warning("grace period of %gs is over and a client still holds a response: exiting", grace)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)
