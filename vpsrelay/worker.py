"""One worker of a supervised relay: `python -m vpsrelay.worker`, started by `supervisor`.

The supervisor writes the parsed settings to the worker's stdin (a length, then the
pickled `Settings`: every worker serves exactly what the parent validated, even if the
config file changes on disk later) and keeps that pipe open: its end (EOF) means the
parent is gone, and the worker then drains and exits like on SIGTERM. The worker
writes `ready` to the descriptor in `_VPSRELAY_READY_FD` once every listener serves.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from functools import partial

import trio

from vpsrelay import server, supervisor
from vpsrelay.config import Settings
from vpsrelay.ops import logs
from vpsrelay.patches import hypercorn as hypercorn_patches

LENGTH = supervisor.SETTINGS_LENGTH
MAX_SETTINGS_BYTES = 16 * 1024 * 1024


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the supervisor closed the settings pipe early")
        data += chunk
    return data


def read_settings(fd: int) -> Settings:
    (size,) = LENGTH.unpack(_read_exactly(fd, LENGTH.size))
    if size > MAX_SETTINGS_BYTES:
        raise ValueError(f"settings of {size} bytes")
    # The pipe comes from our own parent, which pickled what it validated.
    settings = pickle.loads(_read_exactly(fd, size))
    if not isinstance(settings, Settings):
        raise TypeError("the supervisor sent no settings")
    return settings


async def _stop_when_parent_exits() -> None:
    """The supervisor holds our stdin open; EOF means it died: drain as on SIGTERM."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    async with stream:
        while await stream.receive_some(4096):
            pass
    os.kill(os.getpid(), signal.SIGTERM)


async def _run_then_cancel(
    settings: Settings, scope: trio.CancelScope, *, task_status: trio.TaskStatus[list[str]]
) -> None:
    await server.run(settings, task_status=task_status)
    scope.cancel()


async def _serve(settings: Settings, ready_fd: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_when_parent_exits)
        await nursery.start(partial(_run_then_cancel, settings, nursery.cancel_scope))
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)


def main() -> None:
    settings = read_settings(0)
    logs.setup(settings.log.level, settings.log.format)
    # Only the first stop signal counts, and it drains (`server.run`); ignored afterwards, a
    # second one (a terminal's Ctrl-C reaches the whole process group, the supervisor then
    # forwards SIGTERM) cannot cut the drain short. SIGHUP: the supervisor forwards it, and
    # plain listeners have nothing to reload.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    ready_fd = int(os.environ.pop(supervisor.READY_FD_ENVIRONMENT))  # noqa: TID251
    try:
        trio.run(_serve, settings, ready_fd)
    except hypercorn_patches.PatchError as exc:
        print(f"vpsrelay: cannot serve: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
