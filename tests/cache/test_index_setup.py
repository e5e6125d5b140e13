"""Workers starting together on a new data dir all open the cache index: none may fail
(switching SQLite to WAL raced: "database is locked" ended a worker at start)."""

from __future__ import annotations

import multiprocessing
from typing import TYPE_CHECKING

from vpsrelay.cache.index import Database

if TYPE_CHECKING:
    from pathlib import Path

PROCESSES = 8
ROUNDS = 40


def _open(path: str, start: multiprocessing.synchronize.Event) -> None:
    from pathlib import Path

    start.wait(10)
    Database(Path(path)).close()


def test_processes_opening_a_new_index_at_once_all_succeed(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = tmp_path / f"round{round_}" / "cache.db"
        path.parent.mkdir()
        start = context.Event()
        workers = [context.Process(target=_open, args=(str(path), start)) for _ in range(PROCESSES)]
        for worker in workers:
            worker.start()
        start.set()
        for worker in workers:
            worker.join(30)
        assert [w.exitcode for w in workers] == [0] * PROCESSES, round_
