from __future__ import annotations

from vpsrelay.cache.memory import ManifestMemory, Pins


def test_manifest_memory_drops_the_least_recently_used_past_its_limit() -> None:
    memory = ManifestMemory(limit=10)
    memory.remember("a", b"1234")
    memory.remember("b", b"1234")
    assert memory.get("a") == b"1234"  # now the most recently used
    memory.remember("c", b"1234")  # 12 bytes: "b" goes
    assert memory.get("b") is None
    assert memory.get("a") == b"1234"
    assert memory.get("c") == b"1234"
    memory.forget("a")
    memory.remember("d", b"123456")  # 10 bytes with "c": both fit
    assert memory.get("c") == b"1234"
    assert memory.get("d") == b"123456"


def test_pins_count_readers_until_the_last_lets_go() -> None:
    pins = Pins()
    with pins.hold("x"):
        with pins.hold("x"):
            assert "x" in pins
        assert list(pins) == ["x"]
    assert "x" not in pins
