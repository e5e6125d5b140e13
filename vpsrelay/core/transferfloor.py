"""A minimum transfer rate for a streamed body, over the time spent waiting for it.

A store that drips a byte every few seconds never trips a per-read timeout, and a slow
client must not count against the store: the caller feeds `TransferFloor` each chunk's
size and the seconds it waited for that chunk only, and stops reading when `broken`.
"""

from __future__ import annotations

from collections import deque

SLOT_SECONDS = 1.0  # waits are summed in slots of about this long: a bounded history


class TransferFloor:
    """At least `min_rate` bytes per second over any `window` seconds of waiting."""

    def __init__(self, min_rate: float, window: float) -> None:
        self.min_rate = min_rate
        self.window = window
        self._slots: deque[tuple[float, int]] = deque()  # (seconds waited, bytes), oldest first
        self._waited = 0.0  # in `_slots`
        self._bytes = 0

    def feed(self, size: int, waited: float) -> bool:
        """`size` bytes arrived after `waited` seconds of waiting; True: the floor is broken."""
        waited = max(0.0, waited)
        # A long wait gets a slot of its own: merged into a slot of fast bytes, it would
        # never fall out of the window alone, and those bytes would cover it.
        if self._slots and self._slots[-1][0] < SLOT_SECONDS and waited < SLOT_SECONDS:
            last_wait, last_bytes = self._slots.pop()
            self._slots.append((last_wait + waited, last_bytes + size))
        else:
            self._slots.append((waited, size))
        self._waited += waited
        self._bytes += size
        # The oldest slots fall out once the rest still spans the window.
        while len(self._slots) > 1 and self._waited - self._slots[0][0] >= self.window:
            old_wait, old_bytes = self._slots.popleft()
            self._waited -= old_wait
            self._bytes -= old_bytes
        return self.broken

    @property
    def broken(self) -> bool:
        return self._waited >= self.window and self._bytes < self.min_rate * self._waited
