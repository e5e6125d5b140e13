"""Read the shared limit state a relay left in its data dir (`limits.db`)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def budget_counters(data_dir: Path) -> dict[str, int]:
    """The traffic budget's counters (bytes granted per period key), as all processes see."""
    db = sqlite3.connect(f"file:{data_dir / 'limits.db'}?mode=ro", uri=True)
    try:
        return {str(key): int(value) for key, value in db.execute("SELECT key, bytes FROM budget")}
    finally:
        db.close()
