"""Writing a store's index to its SQLite file: the pending operations, in a thread, at most
every `FLUSH_INTERVAL` seconds unless forced, one write at a time. Both stores (disk and
bucket) keep their index this way; a failed write is logged and the store goes on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from vpsrelay.cache.index import Database, Index

log = logging.getLogger("vpsrelay.cache")

FLUSH_INTERVAL = 5.0  # seconds between index writes to SQLite (last-use times, counters)


class IndexWrites:
    """Flushes `index`'s pending operations to `db`. Whoever else takes the index's writes
    and writes them holds `lock` too, so the database sees them in order."""

    def __init__(self, index: Index, db: Database) -> None:
        self.index = index
        self.db = db
        self.lock = trio.Lock()
        self._flushed_at = time.monotonic()

    async def flush(self, *, force: bool = False) -> None:
        """Write the index's changes, unless there are none or the last write was less than
        `FLUSH_INTERVAL` seconds ago (and `force` is not set)."""
        if not self.index.pending():
            return
        if not force and time.monotonic() - self._flushed_at < FLUSH_INTERVAL:
            return
        async with self.lock:
            self._flushed_at = time.monotonic()
            ops = self.index.take_writes()
            try:
                await trio.to_thread.run_sync(self.db.write, ops)
            except Exception:
                log.exception("cache: could not write the index")
