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


# A prefix as one int: address << 9 | length << 1 | (1 for IPv6). Plain ints, unlike tuples or
# ipaddress objects, are not tracked by the garbage collector: a table of 130,000 prefixes then
# costs no GC passes that grow with it (a tuple per prefix made the collector pause for 0.6 s).
Prefix = int


def make_prefix(version: int, address: int, length: int) -> Prefix:
    """The key of ``address/length`` (``address`` already masked to ``length``)."""
    return address << 9 | length << 1 | (version == 6)


def split_prefix(prefix: Prefix) -> tuple[int, int, int]:
    """``(version, address, length)`` of a key made by :func:`make_prefix`."""
    return (6 if prefix & 1 else 4), prefix >> 9, prefix >> 1 & 255


def prefix_of(network: Network | str) -> Prefix:
    """The table's key for a prefix given as an ipaddress network or text (host bits masked)."""
    net = ipaddress.ip_network(network, strict=False)
    return make_prefix(net.version, int(net.network_address), net.prefixlen)


def network_of(prefix: Prefix) -> Network:
    version, addr, plen = split_prefix(prefix)
    if version == 4:
        return ipaddress.IPv4Network((addr, plen))
    return ipaddress.IPv6Network((addr, plen))


class AllowedIPs(Generic[V]):
    """Maps IP prefixes to values (peers). Inserting a prefix again moves it to the new value.

    Prefixes are kept as plain ints (:func:`make_prefix`): a configuration of 130,000 prefixes
    costs no ipaddress objects and no GC work (:meth:`insert_prefix` is the fast path the UAPI
    uses); networks are built only when asked for (:meth:`prefixes`, iteration).
    """

    def __init__(self) -> None:
        self._v4: _Family[V] = _Family(32)
        self._v6: _Family[V] = _Family(128)
        self._by_value: dict[V, dict[Prefix, None]] = {}  # insertion order (wireguard-go's)
        self._owner: dict[Prefix, V] = {}
        # Packed address -> its longest-prefix match (None included), so that the lookup of a
        # packet is one dict probe. Any change to the table empties it.
        self._cache4: dict[bytes, V | None] = {}
        self._cache6: dict[bytes, V | None] = {}

    def insert(self, network: Network | str, value: V) -> None:
        self.insert_prefix(prefix_of(network), value)

    def insert_prefix(self, prefix: Prefix, value: V) -> None:
        """Insert a prefix key (see :func:`make_prefix`)."""
        old = self._owner.get(prefix)
        if old is not None:
            del self._by_value[old][prefix]
        family = self._v6 if prefix & 1 else self._v4
        family.insert(prefix >> 9, prefix >> 1 & 255, value)
        if self._cache4 or self._cache6:
            self._forget()
        self._owner[prefix] = value
        entries = self._by_value.get(value)
        if entries is None:
            entries = self._by_value[value] = {}
        entries[prefix] = None

    def insert_prefixes(self, prefixes: list[Prefix], value: V) -> None:
        """:meth:`insert_prefix` for many keys of one value (the UAPI's bulk path)."""
        owner, by_value = self._owner, self._by_value
        entries = by_value.get(value)
        if entries is None:
            entries = by_value[value] = {}
        v4, v6 = self._v4, self._v6
        for prefix in prefixes:
            old = owner.get(prefix)
            if old is not None and old is not value:
                del by_value[old][prefix]
            plen = prefix >> 1 & 255
            family = v6 if prefix & 1 else v4
            table = family.tables.get(plen)
            if table is None:
                family.insert(prefix >> 9, plen, value)
            else:
                table[prefix >> 9 >> (family.bits - plen)] = value
            owner[prefix] = value
            entries[prefix] = None
        self._forget()

    def remove(self, network: Network | str) -> None:
        prefix = prefix_of(network)
        value = self._owner.pop(prefix, None)
        if value is None:
            return
        del self._by_value[value][prefix]
        family = self._v6 if prefix & 1 else self._v4
        family.remove(prefix >> 9, prefix >> 1 & 255)
        self._forget()

    def remove_value(self, value: V) -> None:
        """Remove every prefix of ``value`` (a peer being removed or replace_allowed_ips)."""
        for prefix in self._by_value.pop(value, ()):
            del self._owner[prefix]
            family = self._v6 if prefix & 1 else self._v4
            family.remove(prefix >> 9, prefix >> 1 & 255)
        self._forget()

    def _forget(self) -> None:
        self._cache4.clear()
        self._cache6.clear()

    def entries(self, value: V) -> list[Prefix]:
        """The prefix keys of ``value`` in insertion order (what ``get=1`` lists)."""
        return list(self._by_value.get(value, ()))

    def count(self, value: V) -> int:
        return len(self._by_value.get(value, ()))

    def prefixes(self, value: V) -> list[Network]:
        """The prefixes of ``value`` in a stable order (v4 first, then by address)."""
        return [network_of(p) for p in sorted(self._by_value.get(value, ()), key=split_prefix)]

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
        return iter([(network_of(p), v) for p, v in self._owner.items()])

    def __len__(self) -> int:
        return len(self._owner)


def _remember(cache: dict[bytes, V | None], family: _Family[V], address: bytes) -> V | None:
    if len(cache) >= CACHE_SIZE:
        cache.clear()  # bounded memory: a scan of many addresses just starts a fresh cache
    value = cache[bytes(address)] = family.lookup(int.from_bytes(address, "big"))
    return value
