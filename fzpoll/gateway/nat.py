"""The gateway's NAT table between clients' proxy addresses and the real addresses, sans-IO.

Theory of operation (connlib's ``gateway/nat_table.rs``, symmetric NAT on layer 4)
----------------------------------------------------------------------------------
A client sends to a *proxy address* P that it made up for a name; the gateway resolved the name
and chose a real address R for P. Outgoing, a packet ``C:p -> P:q`` becomes ``C:p' -> R:q``: the
session is keyed *inside* by (client C, protocol, source port p or ICMP echo identifier, P) and
*outside* by (C, protocol, p', R). p' is p unless another session of C already uses (p, R) - two
proxy addresses (two names) can resolve to the same R, and without p' their replies could not be
told apart - then the next free port above it, wrapping. The kernel forwards the packet and
masquerades C behind the gateway's own address; the reply ``R:q -> C:p'`` comes back through
the TUN device and is translated to ``P:q -> C:p``. ICMP errors about a session's packets (port
unreachable from R, time exceeded from a router on the way) are translated back too, the quoted
packet included, and appear to come from P.

Lifetimes (connlib's): a session lives 2 h after its last packet for TCP, 2 min for UDP and ICMP;
60 s if no reply ever came (unconfirmed); 5 s after the last packet once both sides sent a FIN;
at once after a RST (the RST itself is still translated). Deadlines sit in a heap that is
corrected lazily: ordinary packets only move a session's expiry later, so a popped entry whose
session has since been used is pushed again at its new time; a FIN or RST pushes an earlier one.

Bounds: at most ``max_sessions`` sessions (a new session beyond that is dropped,
``NAT_TABLE_FULL``); bad input is a counted drop in ``drops`` and changes nothing.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

from fzpoll.errors import DropReason as D
from fzpoll.gateway.packet import (
    PROTO_TCP,
    Flow,
    Rewrite,
    apply_rewrite,
    compile_rewrite,
    icmp_error_quote,
    parse_flow,
    rewrite_icmp_error,
)

TCP_TTL = 2 * 60 * 60.0
UDP_TTL = 2 * 60.0
ICMP_TTL = 2 * 60.0
UNCONFIRMED_TTL = 60.0
FIN_LINGER = 5.0
DEFAULT_MAX_SESSIONS = 65536
PORT_SPACE = 0x10000
_FIN_OR_RST = 0x01 | 0x04  # TCP flags that shorten a session's life (tcp_flags is 0 for UDP/ICMP)

Key = tuple[bytes, int, int, bytes]  # (client address, protocol, port or ICMP id, far address)


@dataclass(slots=True, eq=False)
class Session:
    """One translated flow: its inside and outside keys and what it has seen."""

    inside: Key
    outside: Key
    last_outgoing: float
    to_real: Rewrite  # the outgoing translation, compiled once
    to_proxy: Rewrite | None = None  # the incoming one, compiled on the first reply
    last_incoming: float | None = None
    fin_out: bool = False
    fin_in: bool = False
    rst: bool = False
    scheduled_at: float = field(default=0.0)

    def last_packet(self) -> float:
        if self.last_incoming is None:
            return self.last_outgoing
        return max(self.last_outgoing, self.last_incoming)

    def remove_at(self) -> float:
        """When the session expires, the earliest of connlib's four rules."""
        ttl = TCP_TTL if self.inside[1] == PROTO_TCP else UDP_TTL  # UDP_TTL == ICMP_TTL
        at = self.last_packet() + ttl
        if self.last_incoming is None:
            at = min(at, self.last_outgoing + UNCONFIRMED_TTL)
        if self.fin_out and self.fin_in:
            at = min(at, self.last_packet() + FIN_LINGER)
        if self.rst:
            at = min(at, self.last_packet())
        return at


class NatTable:
    """Proxy address <-> real address sessions of every client of one gateway.

    An open session keeps the real address it started with even if the proxy address is later
    mapped to another one (a re-resolution must not break a TCP connection); :meth:`forget`
    ends the sessions of a proxy address that now stands for another name."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self._inside: dict[Key, Session] = {}
        self._outside: dict[Key, Session] = {}
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = 0  # heap tie-breaker: sessions do not compare
        self.drops: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._inside)

    # -------------------------------------------------------------------------- outgoing

    def outgoing(self, packet: bytes, flow: Flow, real: bytes, now: float) -> bytes | None:
        """Translate ``packet`` (flow ``flow``, to a proxy address) to the real address
        ``real``, of the same family. None if it was dropped (counted)."""
        if len(real) != len(flow.dst):
            self.drops[D.NAT_NO_MAPPING] += 1
            return None
        inside = (flow.src, flow.protocol, flow.src_port, flow.dst)
        session = self._inside.get(inside)  # an open session keeps its address (as connlib)
        if session is None:
            session = self._open(inside, flow, real, now)
            if session is None:
                return None
        session.last_outgoing = now
        if flow.tcp_flags & _FIN_OR_RST:
            self._note_flags(session, flow, outgoing=True, now=now)
        return apply_rewrite(packet, session.to_real)

    def _open(self, inside: Key, flow: Flow, real: bytes, now: float) -> Session | None:
        if len(self._inside) >= self.max_sessions:
            self.drops[D.NAT_TABLE_FULL] += 1
            return None
        client, protocol, port, _ = inside
        for step in range(PORT_SPACE):
            candidate = (port + step) % PORT_SPACE
            outside = (client, protocol, candidate, real)
            if outside not in self._outside:
                break
        else:  # every port of this client toward this address is taken
            self.drops[D.NAT_TABLE_FULL] += 1
            return None
        session = Session(inside, outside, now, compile_rewrite(flow, dst=real, src_port=outside[2]))
        self._inside[inside] = session
        self._outside[outside] = session
        self._schedule(session, session.remove_at())
        return session

    # -------------------------------------------------------------------------- incoming

    def incoming(self, packet: bytes, now: float) -> bytes | None:
        """Translate a packet from the far side (read from the TUN device) back to the proxy
        address, or an ICMP error about a translated packet. None if it belongs to no session
        (not NAT traffic: the caller passes it on unchanged)."""
        flow = parse_flow(packet)
        if flow is not None:
            return self._incoming_flow(packet, flow, now)
        quoted = icmp_error_quote(packet)
        if quoted is None:
            return None
        quote, quote_at = quoted
        dst = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
        if quote.src != dst:
            return None  # an error about a packet the destination did not send
        session = self._outside.get((quote.src, quote.protocol, quote.src_port, quote.dst))
        if session is None:
            return None
        session.last_incoming = now
        _, _, port, proxy = session.inside
        return rewrite_icmp_error(packet, quote_at, outer_src=proxy, quote_dst=proxy, quote_src_port=port)

    def _incoming_flow(self, packet: bytes, flow: Flow, now: float) -> bytes | None:
        session = self._outside.get((flow.dst, flow.protocol, flow.dst_port, flow.src))
        if session is None:
            return None
        session.last_incoming = now
        if flow.tcp_flags & _FIN_OR_RST:
            self._note_flags(session, flow, outgoing=False, now=now)
        to_proxy = session.to_proxy
        if to_proxy is None:  # the reply's flow is the same for every reply of the session
            _, _, port, proxy = session.inside
            to_proxy = session.to_proxy = compile_rewrite(flow, src=proxy, dst_port=port)
        return apply_rewrite(packet, to_proxy)

    def _note_flags(self, session: Session, flow: Flow, *, outgoing: bool, now: float) -> None:
        before = session.remove_at()
        if flow.rst:
            session.rst = True
        if flow.fin:
            if outgoing:
                session.fin_out = True
            else:
                session.fin_in = True
        after = session.remove_at()
        if after < before:
            self._schedule(session, after)

    # -------------------------------------------------------------------------- time

    def _schedule(self, session: Session, at: float) -> None:
        session.scheduled_at = at
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, session))

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`handle_timer` may have work (possibly early: lazy heap)."""
        return self._heap[0][0] if self._heap else None

    def handle_timer(self, now: float) -> None:
        """Remove every session whose lifetime is over."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, session = heapq.heappop(heap)
            if self._inside.get(session.inside) is not session or at != session.scheduled_at:
                continue  # removed already, or superseded by an earlier entry
            remove_at = session.remove_at()
            if remove_at <= now:
                self._remove(session)
            else:
                self._schedule(session, remove_at)

    def _remove(self, session: Session) -> None:
        self._inside.pop(session.inside, None)
        self._outside.pop(session.outside, None)

    def forget(self, clients: frozenset[bytes] | set[bytes], proxy: bytes | None = None) -> int:
        """Remove every session of the client addresses ``clients`` (their peer said Goodbye or
        was removed), or only those to ``proxy`` (it was assigned to another name)."""
        gone = [s for s in self._inside.values()
                if s.inside[0] in clients and (proxy is None or s.inside[3] == proxy)]
        for session in gone:
            self._remove(session)
        return len(gone)

    def sessions(self) -> list[Session]:
        """A snapshot of the sessions (tests, ``fzpoll show``)."""
        return list(self._inside.values())
