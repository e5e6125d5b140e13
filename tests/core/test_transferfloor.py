from __future__ import annotations

from vpsrelay.core.transferfloor import TransferFloor

KiB = 1024


def test_a_fast_body_never_breaks_the_floor() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(10_000):  # 64 KiB every 10 ms: 6.4 MiB/s for 100 s of waiting
        assert not floor.feed(64 * KiB, 0.01)


def test_a_drip_breaks_it_once_the_window_is_waited_out() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    broke_at = None
    for second in range(1, 30):
        if floor.feed(1 * KiB, 1.0):
            broke_at = second
            break
    assert broke_at == 10


def test_a_fast_start_does_not_cover_a_drip_later() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(100):
        assert not floor.feed(1024 * KiB, 0.1)  # 10 MiB/s for 10 s
    waited = 0.0
    while not floor.feed(100, 0.5):
        waited += 0.5
        assert waited < 30, "never broken"
    assert 10.0 <= waited + 0.5 <= 12.0  # the window, give or take a slot


def test_only_time_spent_waiting_counts() -> None:
    """A slow client holds the stream back between reads: those seconds are not fed, so
    chunks that are ready at once never break the floor however long the download."""
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(1000):
        assert not floor.feed(16 * KiB, 0.001)


def test_one_long_wait_breaks_it() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    assert not floor.feed(64 * KiB, 0.1)
    assert floor.feed(64 * KiB, 11.0)


def test_the_rate_just_above_the_floor_holds() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(200):
        assert not floor.feed(300 * KiB, 1.0)
    below = TransferFloor(256 * KiB, 10.0)
    assert any(below.feed(200 * KiB, 1.0) for _ in range(20))


def test_the_history_stays_bounded() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(100_000):
        floor.feed(64 * KiB, 0.05)
    assert len(floor._slots) <= 12


def test_one_long_wait_after_a_fast_burst_breaks_it() -> None:
    """Review 15b, finding 1: a stall merged into a slot of fast bytes never fell out of
    the window alone, and ~2.6 MiB sent just before it covered it."""
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(48):  # 3 MiB in 0.05 s
        assert not floor.feed(64 * KiB, 0.001)
    assert floor.feed(0, 10.0)


def test_a_long_wait_with_its_bytes_is_judged_alone() -> None:
    floor = TransferFloor(256 * KiB, 10.0)
    for _ in range(48):
        assert not floor.feed(64 * KiB, 0.001)
    assert not floor.feed(3 * 1024 * KiB, 10.0)  # 300 KiB/s over the whole wait: fine
    assert floor.feed(1 * KiB, 10.0)
