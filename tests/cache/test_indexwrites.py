"""`IndexWrites`: the index flush both stores share (a real SQLite file, no store)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest

from vpsrelay.cache import indexwrites
from vpsrelay.cache.index import Database, Index, Obj
from vpsrelay.cache.indexwrites import IndexWrites

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def stored_digests(path: Path) -> set[str]:
    database = Database(path)
    try:
        return set(database.load().objects)
    finally:
        database.close()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "cache.db")
    yield database
    database.close()


async def test_unforced_flushes_wait_for_the_interval_and_forced_ones_do_not(
    tmp_path: Path, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = Index()
    writes = IndexWrites(index, database)
    index.add("sha256:a", Obj(1, 1.0, "blob"))
    await writes.flush()  # just made: within the interval
    assert stored_digests(tmp_path / "cache.db") == set()
    assert index.pending()
    await writes.flush(force=True)
    assert stored_digests(tmp_path / "cache.db") == {"sha256:a"}
    assert not index.pending()

    index.add("sha256:b", Obj(1, 1.0, "blob"))
    monkeypatch.setattr(indexwrites, "FLUSH_INTERVAL", 0.0)
    await writes.flush()
    assert stored_digests(tmp_path / "cache.db") == {"sha256:a", "sha256:b"}


async def test_a_failed_write_is_logged_not_raised(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    index = Index()
    writes = IndexWrites(index, database)
    database.close()  # every write now fails
    index.add("sha256:a", Obj(1, 1.0, "blob"))
    with caplog.at_level(logging.ERROR, logger="vpsrelay.cache"):
        await writes.flush(force=True)
    assert "could not write the index" in caplog.text
    assert not writes.lock.locked()
