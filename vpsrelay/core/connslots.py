"""Connection slots: how many client connections may be open, in all and per address.

A total cap alone lets one address take every slot (300 idle sockets against a cap of
250 locked everyone else out). Each peer address therefore gets at most `per_address`
of the `total` slots; a trusted reverse proxy carries many clients on its connections,
so its addresses only count towards the total. An IPv6 client is counted by its /64 (or
`ipv6_prefix`), as the rate limits count it: a host picks any address in its network.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from vpsrelay.core.access import DEFAULT_IPV6_PREFIX, limit_key

if TYPE_CHECKING:
    from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Refusal reasons, as logged and counted.
TOTAL_CAP = "connection_cap"
ADDRESS_CAP = "address_connection_cap"


class ConnectionSlots:
    """Counts open connections; `take` grants a slot or names why not, `give_back` frees it."""

    def __init__(
        self,
        total: int,
        per_address: int,
        exempt: Sequence[Network] = (),
        ipv6_prefix: int = DEFAULT_IPV6_PREFIX,
    ) -> None:
        self.total = total
        self.per_address = per_address
        self.ipv6_prefix = ipv6_prefix
        self._exempt = tuple(exempt)
        self.open = 0
        self._by_address: dict[str, int] = {}

    def _is_exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._exempt)

    def take(self, address: str) -> str | None:
        """Count a new connection from `address`; None if it may stay, else the reason."""
        if self.open >= self.total:
            return TOTAL_CAP
        key = limit_key(address, self.ipv6_prefix)
        held = self._by_address.get(key, 0)
        if held >= self.per_address and not self._is_exempt(address):
            return ADDRESS_CAP
        self.open += 1
        self._by_address[key] = held + 1
        return None

    def give_back(self, address: str) -> None:
        """A connection `take` granted has ended."""
        self.open -= 1
        key = limit_key(address, self.ipv6_prefix)
        held = self._by_address[key] - 1
        if held:
            self._by_address[key] = held
        else:
            del self._by_address[key]  # the map holds only addresses with connections

    def held_by(self, address: str) -> int:
        return self._by_address.get(limit_key(address, self.ipv6_prefix), 0)

    def describe(self, reason: str, address: str) -> str:
        """One line for the log: which cap, and its figure."""
        if reason == TOTAL_CAP:
            return f"{self.total} connections already open"
        key = limit_key(address, self.ipv6_prefix)
        return f"{key} already has {self.per_address} connections open"
