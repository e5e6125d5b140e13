"""Connection slots: the total cap, the per-address cap, trusted proxies counted in total only."""

from __future__ import annotations

import ipaddress

from hypothesis import given, strategies as st

from vpsrelay.core.connslots import ADDRESS_CAP, TOTAL_CAP, ConnectionSlots


def test_one_address_gets_at_most_its_share() -> None:
    slots = ConnectionSlots(total=10, per_address=3)
    assert [slots.take("192.0.2.1") for _ in range(4)] == [None, None, None, ADDRESS_CAP]
    assert slots.take("192.0.2.2") is None  # another address still gets in
    assert slots.open == 4
    slots.give_back("192.0.2.1")
    assert slots.take("192.0.2.1") is None


def test_the_total_cap_applies_to_everyone() -> None:
    slots = ConnectionSlots(total=2, per_address=5)
    assert slots.take("192.0.2.1") is None
    assert slots.take("2001:db8::1") is None
    assert slots.take("192.0.2.3") == TOTAL_CAP
    assert "2 connections" in slots.describe(TOTAL_CAP, "192.0.2.3")


def test_a_trusted_proxy_counts_towards_the_total_only() -> None:
    slots = ConnectionSlots(total=5, per_address=1, exempt=(ipaddress.ip_network("127.0.0.1/32"),))
    assert [slots.take("127.0.0.1") for _ in range(6)] == [None] * 5 + [TOTAL_CAP]
    assert ConnectionSlots(total=5, per_address=1).take("not-an-address") is None


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c"])), max_size=60))
def test_counts_return_to_zero(steps: list[tuple[bool, str]]) -> None:
    """Any order of takes and give-backs: the caps hold and nothing is left counted."""
    slots = ConnectionSlots(total=4, per_address=2)
    held: list[str] = []
    for take, address in steps:
        if take:
            if slots.take(address) is None:
                held.append(address)
        elif address in held:
            held.remove(address)
            slots.give_back(address)
        assert slots.open == len(held) <= 4
        assert all(slots.held_by(a) == held.count(a) <= 2 for a in "abc")
    for address in held:
        slots.give_back(address)
    assert slots.open == 0
    assert slots._by_address == {}


def test_one_ipv6_network_shares_one_count() -> None:
    """A host picks any address in its /64: keyed by address it would hold unlimited slots."""
    slots = ConnectionSlots(total=100, per_address=2)
    assert slots.take("2001:db8:1:2::1") is None
    assert slots.take("2001:db8:1:2::ffff") is None
    assert slots.take("2001:db8:1:2:abcd::7") == ADDRESS_CAP
    assert slots.take("2001:db8:1:3::1") is None  # another /64
    assert "2001:db8:1:2::/64" in slots.describe(ADDRESS_CAP, "2001:db8:1:2::9")
    slots.give_back("2001:db8:1:2::ffff")
    assert slots.take("2001:db8:1:2::5") is None
    wide = ConnectionSlots(total=100, per_address=1, ipv6_prefix=48)
    assert wide.take("2001:db8:1:2::1") is None
    assert wide.take("2001:db8:1:ffff::1") == ADDRESS_CAP
