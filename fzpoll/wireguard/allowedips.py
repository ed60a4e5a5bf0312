"""Cryptokey routing (whitepaper 2): the table of allowed IPs, longest prefix match.

One dict per (family, prefix length), keyed by the address shifted down to its prefix; a lookup
tries the prefix lengths in use from longest to shortest. That is at most 33 (v4) or 129 (v6) dict
probes whatever the number of peers, and usually one or two: it stays fast with thousands of
peers and prefixes.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Iterator, TypeVar

V = TypeVar("V")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MISS = object()
CACHE_SIZE = 4096  # addresses remembered per family; emptied when full and on every change


class _Family(Generic[V]):
    __slots__ = ("bits", "tables", "lengths")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, V]] = {}
        self.lengths: list[int] = []  # prefix lengths in use, longest first

    def insert(self, key: int, plen: int, value: V) -> None:
        table = self.tables.get(plen)
        if table is None:
            table = self.tables[plen] = {}
            self.lengths = sorted(self.tables, reverse=True)
        table[key >> (self.bits - plen)] = value

    def remove(self, key: int, plen: int) -> None:
        table = self.tables.get(plen)
        if table is not None:
            table.pop(key >> (self.bits - plen), None)
            if not table:
                del self.tables[plen]
                self.lengths = sorted(self.tables, reverse=True)

    def lookup(self, key: int) -> V | None:
        bits = self.bits
        tables = self.tables
        for plen in self.lengths:
            value = tables[plen].get(key >> (bits - plen))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[V]):
    """Maps IP prefixes to values (peers). Inserting a prefix again moves it to the new value."""

    def __init__(self) -> None:
        self._v4: _Family[V] = _Family(32)
        self._v6: _Family[V] = _Family(128)
        self._by_value: dict[V, set[Network]] = {}
        self._owner: dict[Network, V] = {}
        # Packed address -> its longest-prefix match (None included), so that the lookup of a
        # packet is one dict probe. Any change to the table empties it.
        self._cache4: dict[bytes, V | None] = {}
        self._cache6: dict[bytes, V | None] = {}

    def insert(self, network: Network | str, value: V) -> None:
        net = ipaddress.ip_network(network, strict=False)
        old = self._owner.get(net)
        if old is not None:
            self._by_value[old].discard(net)
        family = self._v4 if net.version == 4 else self._v6
        family.insert(int(net.network_address), net.prefixlen, value)
        self._forget()
        self._owner[net] = value
        self._by_value.setdefault(value, set()).add(net)

    def remove(self, network: Network | str) -> None:
        net = ipaddress.ip_network(network, strict=False)
        value = self._owner.pop(net, None)
        if value is None:
            return
        self._by_value[value].discard(net)
        family = self._v4 if net.version == 4 else self._v6
        family.remove(int(net.network_address), net.prefixlen)
        self._forget()

    def remove_value(self, value: V) -> None:
        """Remove every prefix of ``value`` (a peer being removed or replace_allowed_ips)."""
        for net in list(self._by_value.pop(value, ())):
            del self._owner[net]
            family = self._v4 if net.version == 4 else self._v6
            family.remove(int(net.network_address), net.prefixlen)
        self._forget()

    def _forget(self) -> None:
        self._cache4.clear()
        self._cache6.clear()

    def prefixes(self, value: V) -> list[Network]:
        """The prefixes of ``value`` in a stable order (v4 first, then by address)."""
        return sorted(self._by_value.get(value, ()), key=lambda n: (n.version, n.network_address, n.prefixlen))

    def lookup_v4(self, address: bytes) -> V | None:
        value = self._cache4.get(address, _MISS)
        if value is _MISS:
            value = _remember(self._cache4, self._v4, address)
        return value  # type: ignore[return-value]

    def lookup_v6(self, address: bytes) -> V | None:
        value = self._cache6.get(address, _MISS)
        if value is _MISS:
            value = _remember(self._cache6, self._v6, address)
        return value  # type: ignore[return-value]

    def lookup(self, address: bytes | str) -> V | None:
        """Longest-prefix match of a packed (4 or 16 bytes) or textual address."""
        if isinstance(address, str):
            address = ipaddress.ip_address(address).packed
        return self.lookup_v4(address) if len(address) == 4 else self.lookup_v6(address)

    def __iter__(self) -> Iterator[tuple[Network, V]]:
        return iter(list(self._owner.items()))

    def __len__(self) -> int:
        return len(self._owner)


def _remember(cache: dict[bytes, V | None], family: _Family[V], address: bytes) -> V | None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()  # bounded memory: a scan of many addresses just starts a fresh cache
    value = cache[bytes(address)] = family.lookup(int.from_bytes(address, "big"))
    return value
