"""The gateway's side of DNS resources, sans-IO: which proxy address stands for which real one.

Theory of operation
-------------------
A client resolves a resource name through its own stub, which hands out proxy addresses, and
tells the gateway with an ``AssignedIps`` control event (resource, domain, proxy addresses). For
a domain that matches one of the gateway's ``Resources`` patterns the gateway looks the name up
(A and AAAA, :class:`fzpoll.dns.lookup.Lookups`) and maps each proxy address to a real address of
the same family, round robin over the answers; then it answers ``DomainStatus`` Active. A domain
it does not serve, or one that resolves to nothing (or not at all), gets ``DomainStatus``
Inactive and no mapping. The client repeats ``AssignedIps`` on every query for the name, so the
mapping follows the name's addresses; open NAT sessions keep theirs. A proxy address only ever
maps to an address its domain resolved to.

Packets from a client to a proxy address (:meth:`Gateway.handle_from_peer`) are translated by the
:class:`~fzpoll.gateway.nat.NatTable` and written to the TUN device (``to_tun``); the kernel
forwards and masquerades them. Replies read from the TUN device (:meth:`Gateway.handle_from_tun`)
are translated back and sent into the tunnel. A packet to a proxy address with no mapping (the
gateway restarted, the domain is Inactive, a family the name lacks) is answered with ICMP
destination unreachable, code "administratively prohibited", from the proxy address
(``to_tunnel``): the client takes that code as "tell me again" and repeats ``AssignedIps``.

State is per peer (the public key the control packet arrived from); the client addresses a peer
sent from are remembered so that its NAT sessions can be ended with it. Bounds: names per peer
(the oldest is forgotten), lookups in flight, NAT sessions; bad input is a counted drop.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from fzpoll.dns.lookup import Lookups
from fzpoll.dns.stub import PROXY_V4, PROXY_V6, Resource, ResourceTable
from fzpoll.errors import DropReason as D
from fzpoll.gateway import control
from fzpoll.gateway.control import AssignedIps, DomainStatus, Goodbye, NatStatus
from fzpoll.gateway.nat import NatTable
from fzpoll.gateway.packet import destination_unreachable, parse_flow

MAX_NAMES_PER_PEER = 4096


_PROXY_V4_HEAD = PROXY_V4.network_address.packed[:2]  # /11: 1 byte and the top 3 bits of the next
_PROXY_V6_HEAD = PROXY_V6.network_address.packed[:14]  # /107: 13 bytes and the top 3 bits of the next


def is_proxy_address(packed: bytes) -> bool:
    """Whether a packed address lies in the proxy ranges (100.96.0.0/11, fd00:2021:1111:8000::/107)."""
    if len(packed) == 4:
        return packed[0] == _PROXY_V4_HEAD[0] and packed[1] & 0xE0 == _PROXY_V4_HEAD[1]
    return len(packed) == 16 and packed[:13] == _PROXY_V6_HEAD[:13] and packed[13] & 0xE0 == _PROXY_V6_HEAD[13]


@dataclass(slots=True)
class _Assignment:
    resource: str
    proxies: tuple[bytes, ...]


@dataclass(slots=True)
class _PeerState:
    names: OrderedDict[str, _Assignment] = field(default_factory=OrderedDict)
    domain_of: dict[bytes, str] = field(default_factory=dict)  # proxy -> domain
    real_of: dict[bytes, bytes] = field(default_factory=dict)  # proxy -> real address
    clients: set[bytes] = field(default_factory=set)  # tunnel addresses the peer sent from


class Gateway:
    """DNS resources served by this gateway: ``patterns`` as in ``[Resource] Name``."""

    def __init__(self, patterns: list[str], lookups: Lookups, *, nat: NatTable | None = None,
                 max_names_per_peer: int = MAX_NAMES_PER_PEER) -> None:
        self._served = ResourceTable([Resource(p, "") for p in patterns])
        self.lookups = lookups
        self.nat = nat if nat is not None else NatTable()
        self.max_names_per_peer = max_names_per_peer
        self.to_peers: list[tuple[str, bytes]] = []  # (peer, control packet)
        self.to_tun: list[bytes] = []  # translated packets for the TUN device
        self.to_tunnel: list[bytes] = []  # our ICMP errors for clients (routed by destination)
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._peers: dict[str, _PeerState] = {}
        self._waiting: dict[str, set[str]] = {}  # domain being looked up -> peers to answer

    def set_patterns(self, patterns: list[str]) -> None:
        """Serve these patterns from now on (a reload); existing mappings stay until re-asked."""
        self._served = ResourceTable([Resource(p, "") for p in patterns])

    def serves(self, domain: str) -> bool:
        return self._served.match(tuple(label.encode() for label in domain.split("."))) is not None

    # ------------------------------------------------------------------------- control events

    def handle_control(self, peer: str, packet: bytes, now: float) -> None:
        """A control packet that arrived in the tunnel from ``peer``."""
        event = control.decode(packet)
        if isinstance(event, D):
            self.drops[event] += 1
        elif isinstance(event, AssignedIps):
            self._on_assigned_ips(peer, event, now)
        elif isinstance(event, Goodbye):
            self.forget_peer(peer)
        else:
            self.drops[D.CONTROL_UNEXPECTED] += 1  # DomainStatus goes the other way

    def _on_assigned_ips(self, peer: str, event: AssignedIps, now: float) -> None:
        proxies = tuple(ip.packed for ip in event.proxy_ips)
        if not all(is_proxy_address(p) for p in proxies):
            self.drops[D.CONTROL_MALFORMED] += 1  # a client may only name its proxy addresses
            return
        self.stats["assigned_ips"] += 1
        if not self.serves(event.domain):
            self._status(peer, event.resource, event.domain, NatStatus.INACTIVE)
            return
        state = self._peers.setdefault(peer, _PeerState())
        self._assign(state, event.domain, _Assignment(event.resource, proxies))
        self._waiting.setdefault(event.domain, set()).add(peer)
        self.lookups.lookup(event.domain, now)
        self._take_results()

    def _assign(self, state: _PeerState, domain: str, assignment: _Assignment) -> None:
        old = state.names.pop(domain, None)
        if old is None and len(state.names) >= self.max_names_per_peer:
            _, evicted = state.names.popitem(last=False)
            old_proxies: tuple[bytes, ...] = evicted.proxies
            self.stats["names_evicted"] += 1
        else:
            old_proxies = old.proxies if old is not None else ()
        for proxy in old_proxies:
            if proxy not in assignment.proxies:
                self._unmap(state, proxy)
        for proxy in assignment.proxies:
            previous = state.domain_of.get(proxy)
            if previous is not None and previous != domain:
                state.names.pop(previous, None)
                self._unmap(state, proxy)
            state.domain_of[proxy] = domain
        state.names[domain] = assignment

    def _unmap(self, state: _PeerState, proxy: bytes) -> None:
        state.domain_of.pop(proxy, None)
        if state.real_of.pop(proxy, None) is not None:
            self.nat.forget(state.clients, proxy)

    def _take_results(self) -> None:
        results, self.lookups.results = self.lookups.results, []
        for domain, addresses in results:
            for peer in self._waiting.pop(domain, ()):
                self._apply(peer, domain, addresses)

    def _apply(self, peer: str, domain: str, addresses: tuple[bytes, ...] | None) -> None:
        state = self._peers.get(peer)
        assignment = state.names.get(domain) if state is not None else None
        if state is None or assignment is None:
            return  # forgotten meanwhile
        by_family = {4: [a for a in addresses or () if len(a) == 4],
                     16: [a for a in addresses or () if len(a) == 16]}
        used = Counter[int]()
        for proxy in assignment.proxies:
            reals = by_family[len(proxy)]
            if reals:
                state.real_of[proxy] = reals[used[len(proxy)] % len(reals)]
                used[len(proxy)] += 1
            elif state.real_of.pop(proxy, None) is not None:
                self.nat.forget(state.clients, proxy)
        status = NatStatus.ACTIVE if used else NatStatus.INACTIVE
        self.stats["domain_active" if used else "domain_inactive"] += 1
        self._status(peer, assignment.resource, domain, status)

    def _status(self, peer: str, resource: str, domain: str, status: NatStatus) -> None:
        self.to_peers.append((peer, control.encode(DomainStatus(resource, domain, status))))

    def keep_only(self, peers: set[str]) -> None:
        """Forget every peer not in ``peers`` (the configuration removed them)."""
        for peer in [p for p in self._peers if p not in peers]:
            self.forget_peer(peer)

    def forget_peer(self, peer: str) -> None:
        """Drop everything kept for ``peer`` (Goodbye, or the peer was removed)."""
        state = self._peers.pop(peer, None)
        if state is not None:
            self.nat.forget(state.clients)

    # ------------------------------------------------------------------------------- packets

    def handle_from_peer(self, peer: str, packet: bytes, now: float) -> None:
        """A decrypted packet from ``peer`` to a proxy address (see :func:`is_proxy_address`)."""
        flow = parse_flow(packet)
        if flow is None:
            self.drops[D.NAT_UNSUPPORTED] += 1
            return
        state = self._peers.get(peer)
        real = state.real_of.get(flow.dst) if state is not None else None
        if state is None or real is None:
            self.drops[D.NAT_NO_MAPPING] += 1
            error = destination_unreachable(packet, flow.dst, prohibited=True)
            if error is not None:
                self.to_tunnel.append(error)
            return
        state.clients.add(flow.src)
        translated = self.nat.outgoing(packet, flow, real, now)
        if translated is not None:
            self.to_tun.append(translated)

    def handle_from_tun(self, packet: bytes, now: float) -> bytes | None:
        """A packet read from the TUN device: translated back if it belongs to a NAT session,
        else None (the caller routes it unchanged)."""
        return self.nat.incoming(packet, now)

    # ---------------------------------------------------------------------------------- time

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.nat.next_deadline(), self.lookups.next_deadline()) if d is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        self.nat.handle_timer(now)
        self.lookups.handle_timer(now)
        self._take_results()

    def handle_lookup_reply(self, data: bytes, source: object, now: float) -> None:
        """An answer from the resolver, from socket address ``source``."""
        self.lookups.handle_reply(data, source, now)
        self._take_results()

    def lookup_failed(self, query_id: int) -> None:
        self.lookups.query_failed(query_id)
        self._take_results()
