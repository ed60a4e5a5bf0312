"""The client's side of DNS resources, sans-IO: telling the gateway about proxy addresses.

Theory of operation (connlib's client ``dns_resource_nat``)
------------------------------------------------------------
Whenever the stub answers a query for a resource name (:meth:`ResourceClient.on_query`), the
client sends ``AssignedIps`` (resource, domain, the name's proxy addresses) to the resource's
peer, the gateway - on the first query and on every later one (at most one a second per name:
a query flood is no control-packet flood), so that a gateway that restarted or re-resolved
learns it again. Until the gateway answers ``DomainStatus`` Active the name is
*pending*: packets to its proxy addresses are held (at most 32 per name, the rest dropped and
counted) and ``AssignedIps`` is repeated every 2 s (while packets wait, or for 30 s after the
last query). Active releases the held packets into the tunnel (``to_tunnel``); Inactive answers
each with ICMP destination unreachable from the proxy address (``to_tun``), as it does for later
packets until the next query for the name.

A gateway that lost its state (restarted) answers packets to proxy addresses it cannot map with
ICMP unreachable "administratively prohibited" from the proxy address;
:meth:`ResourceClient.handle_incoming` takes such an error for an Active name as "tell me again":
the name goes back to pending, ``AssignedIps`` goes out at once, and the error is swallowed (the
application's retransmission is held and then released).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from fzpoll.errors import DropReason as D
from fzpoll.gateway import control
from fzpoll.gateway.control import AssignedIps, DomainStatus, NatStatus, resource_id
from fzpoll.gateway.packet import destination_unreachable, icmp_error_quote, is_prohibited

MAX_BUFFERED_PER_NAME = 32
RESEND_INTERVAL = 2.0
RESEND_AFTER_QUERY = 30.0  # keep repeating AssignedIps this long after a query, if nothing waits
MIN_QUERY_RESEND_GAP = 1.0  # a burst of queries for one name sends one AssignedIps a second

IPAddress = IPv4Address | IPv6Address


@dataclass(slots=True)
class _Name:
    domain: str
    resource: str  # the resource's ID (control.resource_id of its pattern)
    peer: str
    proxies: tuple[IPAddress, ...]
    status: NatStatus | None = None  # None: pending
    last_query_at: float = 0.0
    last_sent_at: float = float("-inf")
    resend_at: float | None = None
    held: list[bytes] = field(default_factory=list)


class ResourceClient:
    """Per-name NAT state of a client toward its gateways (see the module doc)."""

    def __init__(self, max_buffered: int = MAX_BUFFERED_PER_NAME) -> None:
        self.max_buffered = max_buffered
        self.to_peers: list[tuple[str, bytes]] = []  # (peer, control packet)
        self.to_tunnel: list[bytes] = []  # released packets: route them to their peer
        self.to_tun: list[bytes] = []  # our ICMP errors for local applications
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._names: dict[str, _Name] = {}
        self._by_proxy: dict[bytes, _Name] = {}

    def is_proxy(self, packed: bytes) -> bool:
        return packed in self._by_proxy

    def status(self, domain: str) -> NatStatus | None:
        name = self._names.get(domain)
        return name.status if name is not None else None

    # ---------------------------------------------------------------------------- inputs

    def on_query(self, domain: str, pattern: str, peer: str, proxies: tuple[IPAddress, ...],
                 now: float) -> None:
        """The stub answered a query for ``domain`` (matching resource ``pattern`` served by
        ``peer``) with ``proxies``."""
        name = self._names.get(domain)
        if name is None or name.peer != peer or name.proxies != proxies:
            if name is not None:
                self.forget(domain)
            name = _Name(domain, resource_id(pattern), peer, proxies)
            self._names[domain] = name
            for proxy in proxies:
                previous = self._by_proxy.get(proxy.packed)
                if previous is not None:
                    self.forget(previous.domain)  # the stub gave the address to this name
                self._by_proxy[proxy.packed] = name
        if name.status == NatStatus.INACTIVE:
            name.status = None  # ask again: the gateway may serve it now
        elif now - name.last_sent_at < MIN_QUERY_RESEND_GAP:
            name.last_query_at = now
            return  # told the gateway a moment ago: a query flood is no control-packet flood
        name.last_query_at = now
        self._send(name, now)

    def handle_outgoing(self, packet: bytes, dst: bytes, now: float) -> bytes | None:
        """A packet from TUN to ``dst``: returned if it may go into the tunnel now, else held,
        dropped or answered with an ICMP error (None). Addresses that are not proxies pass."""
        name = self._by_proxy.get(dst)
        if name is None or name.status == NatStatus.ACTIVE:
            return packet
        if name.status == NatStatus.INACTIVE:
            self._unreachable(packet, dst)
            return None
        if len(name.held) >= self.max_buffered:
            self.drops[D.RESOURCE_BUFFER_FULL] += 1
            return None
        name.held.append(packet)
        if name.resend_at is None:  # repeats had stopped: something waits again
            self._send(name, now)
        return None

    def handle_control(self, peer: str, packet: bytes, now: float) -> None:
        """A control packet from ``peer``: DomainStatus for a name that peer serves."""
        event = control.decode(packet)
        if isinstance(event, D):
            self.drops[event] += 1
            return
        name = self._names.get(event.domain) if isinstance(event, DomainStatus) else None
        if name is None or name.peer != peer or name.resource != event.resource:
            self.drops[D.CONTROL_UNEXPECTED] += 1
            return
        name.status = event.status
        name.resend_at = None
        held, name.held = name.held, []
        self.stats[f"domain_{event.status.lower()}"] += 1
        if event.status == NatStatus.ACTIVE:
            self.to_tunnel.extend(held)
        else:
            for waiting in held:
                self._unreachable(waiting, None)

    def handle_incoming(self, packet: bytes, now: float) -> bool:
        """A packet from the tunnel. True if it was the gateway's "I lost this mapping" error
        (consumed: the name is pending again); False to deliver it as usual."""
        if not _maybe_unreachable(packet) or not is_prohibited(packet):
            return False
        quoted = icmp_error_quote(packet)
        name = self._by_proxy.get(quoted[0].dst) if quoted is not None else None
        if name is None or name.status != NatStatus.ACTIVE:
            return False
        name.status = None
        self.stats["gateway_lost_mapping"] += 1
        self._send(name, now)
        return True

    def forget(self, domain: str) -> None:
        """The stub took the name's proxy addresses back."""
        name = self._names.pop(domain, None)
        if name is not None:
            for proxy in name.proxies:
                if self._by_proxy.get(proxy.packed) is name:
                    del self._by_proxy[proxy.packed]

    # ---------------------------------------------------------------------------- time

    def next_deadline(self) -> float | None:
        deadlines = [n.resend_at for n in self._names.values() if n.resend_at is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for name in self._names.values():
            if name.resend_at is None or name.resend_at > now:
                continue
            if name.held or now - name.last_query_at < RESEND_AFTER_QUERY:
                self.stats["assigned_ips_resent"] += 1
                self._send(name, now)
            else:
                name.resend_at = None

    # ---------------------------------------------------------------------------- outputs

    def _send(self, name: _Name, now: float) -> None:
        event = AssignedIps(name.resource, name.domain, name.proxies)
        self.to_peers.append((name.peer, control.encode(event)))
        name.last_sent_at = now
        name.resend_at = now + RESEND_INTERVAL if name.status is None else None

    def _unreachable(self, packet: bytes, dst: bytes | None) -> None:
        quoted_dst = dst if dst is not None else _destination(packet)
        error = destination_unreachable(packet, quoted_dst) if quoted_dst else None
        if error is not None:
            self.to_tun.append(error)
            self.stats["unreachable_sent"] += 1


def _maybe_unreachable(packet: bytes) -> bool:
    """A few byte tests that rule out almost every packet before a full parse."""
    if len(packet) >= 48 and packet[0] >> 4 == 6:
        return packet[6] == 58 and packet[40] == 1
    return len(packet) >= 28 and packet[0] >> 4 == 4 and packet[9] == 1 and packet[(packet[0] & 0xF) * 4] == 3


def _destination(packet: bytes) -> bytes | None:
    if not packet:
        return None
    if packet[0] >> 4 == 4 and len(packet) >= 20:
        return bytes(packet[16:20])
    if packet[0] >> 4 == 6 and len(packet) >= 40:
        return bytes(packet[24:40])
    return None
