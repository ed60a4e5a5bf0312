"""Sans-IO DNS stub resolver, modelled on Firezone connlib's.

Theory of operation
-------------------
Clients are configured to use *sentinel* addresses as their DNS servers: one per upstream
resolver, of the upstream's address family, allocated in order from 100.100.111.0/24 and
fd00:2021:1111:8000:100:100:111:0/120. Queries to a sentinel arrive from the TUN device as raw IP
packets; :meth:`StubResolver.handle_packet` claims those (UDP to a sentinel, port 53) and lets
every other packet through untouched, cheaply (a few byte comparisons).

A query is answered locally, or sent on to the sentinel's upstream:

- ``use-application-dns.net`` (Firefox's DoH canary) gets NXDOMAIN, so browsers keep using us.
- A name matching a DNS resource gets *proxy addresses* from 100.96.0.0/11 and
  fd00:2021:1111:8000::/107, one of each per (name, resource), stable for the life of the
  resolver; A/AAAA return them with TTL 1, every other type (HTTPS included) an empty NOERROR.
  :meth:`StubResolver.resource_for_address` lets the tunnel route a proxy address to the
  resource's peer. PTR queries for proxy addresses return the name.
- Everything else is *recursive*: the client's query bytes go to the upstream unchanged except
  the ID, remapped to a fresh random ID unique among the queries in flight (clients choose IDs
  independently, so theirs collide). The upstream's answer is mapped back and sent from the
  sentinel to the client. A truncated (TC) answer is retried once over TCP.

Inputs are the TUN packet (:meth:`~StubResolver.handle_packet`), the upstream's answer
(:meth:`~StubResolver.handle_upstream_reply`), a failed send or connect
(:meth:`~StubResolver.upstream_failed`) and the timer (:meth:`~StubResolver.handle_timer`, at
:meth:`~StubResolver.next_deadline`). Outputs accumulate in three lists the IO shell drains after
each call: ``to_tun`` (raw IP packets), ``udp_queries`` and ``tcp_queries``
(:class:`UpstreamQuery`; TCP ones already carry the 2-byte length prefix, and the IO shell hands
the TCP answer back without it).

Bounds and failures: at most 1000 recursive queries in flight (beyond that: SERVFAIL at once);
5 s each (a UDP query that times out gets no answer, as the client will retry; a TCP retry that
times out gets SERVFAIL). An upstream error answer is passed through as is; an unparsable
answer, a failed send, or an answer too big for one UDP packet gets SERVFAIL. Deadlines are
``now + 5 s`` with a monotonic ``now``, so the insertion order of the pending table is deadline
order: the next deadline is its first entry, and the timer pops from the front.

Remote input never raises: a malformed query (unparsable, a response, no question) is dropped
and counted in ``drops`` under ``DropReason.DNS_MALFORMED``; answers that match no query in
flight are dropped and counted under plain-string reasons. ``stats`` counts everything else
(local answers, forwards, timeouts, SERVFAILs by cause) for logs and tests.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
)
from typing import Callable, NamedTuple

from dnslib import (
    AAAA,
    PTR,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSError,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)
from dnslib.buffer import BufferError as DNSBufferError
from dnslib.label import DNSLabelError

from fzpoll.dns.upstream import check_reply, labels_of, parse_message, same_address
from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.ippacket import (
    MAX_UDP_PAYLOAD_V4,
    MAX_UDP_PAYLOAD_V6,
    PROTO_UDP,
    UdpDatagram,
    build_udp,
    parse_udp,
)

# Firezone connlib's address plan and limits.
SENTINELS_V4 = IPv4Network("100.100.111.0/24")
SENTINELS_V6 = IPv6Network("fd00:2021:1111:8000:100:100:111:0/120")
PROXY_V4 = IPv4Network("100.96.0.0/11")
PROXY_V6 = IPv6Network("fd00:2021:1111:8000::/107")
DNS_PORT = 53
ANSWER_TTL = 1
RECURSION_TIMEOUT = 5.0
MAX_IN_FLIGHT = 1000
MAX_TCP_MESSAGE = 0xFFFF  # RFC 1035 4.2.2: a 2-byte length prefix
# Proxy addresses are handed out by index 1 .. 2**21 - 2 in both pools (both are 2**21 wide).
MAX_PROXY_NAMES = min(PROXY_V4.num_addresses, PROXY_V6.num_addresses) - 2
# Names with proxy addresses kept at once. Beyond it the least recently queried name gives its
# addresses to the new one (its answers had a TTL of 1 s): memory stays bounded whatever a local
# process asks, and so does the garbage collector's work.
DEFAULT_PROXY_NAMES = 16384
MAX_NAME_TEXT = 253  # RFC 1035 2.3.4: 255 octets on the wire, 253 as dotted text

CANARY = (b"use-application-dns", b"net")  # Firefox's DoH canary domain
CLASS_IN = 1
CLASS_ANY = 255
OPCODE_QUERY = 0
_REVERSE_V4 = (b"in-addr", b"arpa")
_REVERSE_V6 = (b"ip6", b"arpa")
_HEX_NIBBLES = frozenset(b"0123456789abcdef")

Labels = tuple[bytes, ...]  # a name as lower-case labels, without the root
IPAddress = IPv4Address | IPv6Address
Server = tuple[str, int]


@dataclass(frozen=True)
class Resource:
    """A DNS resource: ``pattern`` is ``app.example.com`` (exact), ``*.example.com`` (the apex
    and any depth below it) or ``?.example.com`` (exactly one label below); ``peer_key`` names
    the peer that serves it."""

    pattern: str
    peer_key: str


class UpstreamQuery(NamedTuple):
    """A query for the IO shell to send to ``server``; ``query_id`` is the ID we chose (the
    first two bytes of the DNS message), for :meth:`StubResolver.upstream_failed`."""

    query_id: int
    data: bytes
    server: Server


@dataclass(slots=True)
class _Pending:
    """A recursive query in flight, keyed by the ID we sent it under."""

    query: DNSRecord  # the client's query, parsed (for SERVFAIL and the answer check)
    data: bytes  # the query as sent upstream (our ID)
    client: IPAddress
    client_port: int
    sentinel: IPAddress
    server: Server
    expires_at: float
    via_tcp: bool = False
    stream: int | None = None  # the client asked over TCP: its connection (fzpoll.dns.tcpserver)


def _compile_pattern(pattern: str) -> tuple[str, Labels]:
    """(kind, base labels) of a resource pattern; kind is "exact", "*" or "?"."""
    try:
        encoded = pattern.strip().rstrip(".").encode("idna").lower()
    except UnicodeError as exc:
        raise LocalError(f"bad DNS resource pattern {pattern!r}: {exc}") from None
    labels = tuple(encoded.split(b".")) if encoded else ()
    if not labels or any(not label for label in labels):
        raise LocalError(f"bad DNS resource pattern {pattern!r}: empty label")
    kind = "exact"
    if labels[0] in (b"*", b"?"):
        kind, labels = labels[0].decode(), labels[1:]
    if any(b"*" in label or b"?" in label for label in labels):
        raise LocalError(f"bad DNS resource pattern {pattern!r}: wildcard only as first label")
    return kind, labels


class ResourceTable:
    """Name -> resource. The longest matching base wins; at equal length exact beats ``*``."""

    def __init__(self, resources: list[Resource]) -> None:
        self._tables: dict[str, dict[Labels, Resource]] = {"exact": {}, "*": {}, "?": {}}
        for resource in resources:
            kind, base = _compile_pattern(resource.pattern)
            self._tables[kind].setdefault(base, resource)

    def match(self, labels: Labels) -> Resource | None:
        exact, star, question = self._tables["exact"], self._tables["*"], self._tables["?"]
        found = exact.get(labels) or star.get(labels)
        if found is None and labels:
            found = question.get(labels[1:])
        for i in range(1, len(labels) + 1):
            if found is not None:
                break
            found = star.get(labels[i:])
        return found


def _reverse_address(labels: Labels) -> bytes | None:
    """The packed address an ``in-addr.arpa``/``ip6.arpa`` name stands for, or None."""
    if len(labels) == 6 and labels[4:] == _REVERSE_V4:
        octets = labels[3::-1]
        if all(o.isdigit() and len(o) <= 3 and int(o) <= 255 for o in octets):
            return bytes(int(o) for o in octets)
    elif len(labels) == 34 and labels[32:] == _REVERSE_V6:
        nibbles = labels[31::-1]
        if all(len(n) == 1 and n[0] in _HEX_NIBBLES for n in nibbles):
            return bytes.fromhex(b"".join(nibbles).decode())
    return None


def _query_problem(query: DNSRecord | None) -> str | None:
    """Why a parsed client message is not a query we can handle (None if it is one)."""
    if query is None:
        return "dns_unparsable"
    if query.header.qr:
        return "dns_not_a_query"
    if not query.questions:
        return "dns_no_question"
    if any(len(b".".join(q.qname.label)) > MAX_NAME_TEXT for q in query.questions):
        return "dns_name_too_long"  # dnslib parses such names but cannot encode them again
    return None


def _response(query: DNSRecord, rcode: int, *, aa: int) -> DNSRecord:
    """An answer skeleton for ``query``: its ID, opcode, RD/CD bits and first question."""
    header = DNSHeader(id=query.header.id, bitmap=query.header.bitmap, qr=1, ra=1, aa=aa)
    header.tc = 0
    header.z = 0
    header.ad = 0
    header.rcode = rcode
    return DNSRecord(header, questions=query.questions[:1])


class StubResolver:
    """The DNS stub for a set of upstream resolvers and DNS resources (see the module doc).

    ``rng`` supplies the upstream query IDs (inject a seeded ``random.Random`` in tests).
    """

    def __init__(
        self,
        upstreams: list[tuple[str, int]],
        resources: list[Resource],
        *,
        rng: random.Random | None = None,
        max_proxy_names: int = DEFAULT_PROXY_NAMES,
    ) -> None:
        self.to_tun: list[bytes] = []
        self.udp_queries: list[UpstreamQuery] = []
        self.tcp_answers: list[tuple[int, bytes]] = []  # answers to clients that asked over TCP
        self.tcp_queries: list[UpstreamQuery] = []
        # Proxy addresses handed out since the IO shell last looked: it routes them to the peer.
        self.new_proxies: list[tuple[IPAddress, Resource]] = []
        # ... and proxy addresses taken back from evicted names: the IO shell unroutes them first.
        self.expired_proxies: list[IPAddress] = []
        # Every answer given for a resource name, (name, resource, its proxy addresses): the
        # client tells the resource's gateway each time (fzpoll.gateway.client).
        self.resource_answers: list[tuple[str, Resource, tuple[IPv4Address, IPv6Address]]] = []
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._rng = rng if rng is not None else random.SystemRandom()
        self._max_proxy_names = min(max_proxy_names, MAX_PROXY_NAMES)
        self._resources = ResourceTable(resources)
        # Insertion order is deadline order; OrderedDict keeps the front O(1) under deletions.
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._proxies: OrderedDict[tuple[Labels, Resource], tuple[IPv4Address, IPv6Address]] = OrderedDict()
        self._by_proxy: dict[bytes, tuple[Labels, Resource]] = {}
        self.sentinels: list[IPAddress] = []
        self._upstream_for: dict[bytes, Server] = {}  # packed sentinel -> upstream
        self._allocate_sentinels(upstreams)
        self._local: dict[int, Callable[[Labels, Resource], list]] = {
            QTYPE.A: self._answer_a,
            QTYPE.AAAA: self._answer_aaaa,
        }

    def _allocate_sentinels(self, upstreams: list[tuple[str, int]]) -> None:
        free = {4: SENTINELS_V4.hosts(), 6: SENTINELS_V6.hosts()}
        for host, port in upstreams:
            try:
                ip = ip_address(host)
            except ValueError:
                raise LocalError(f"upstream DNS server {host!r} is not an IP address") from None
            if not 0 < port <= 0xFFFF:
                raise LocalError(f"upstream DNS server port {port} out of range")
            sentinel = next(free[ip.version], None)
            if sentinel is None:
                raise LocalError(f"too many IPv{ip.version} upstream DNS servers")
            self.sentinels.append(sentinel)
            self._upstream_for[sentinel.packed] = (str(ip), port)

    def set_resources(self, resources: list[Resource]) -> None:
        """Replace the DNS resources; proxy addresses already handed out stay valid."""
        self._resources = ResourceTable(resources)

    # -- queries for the tunnel -------------------------------------------------------------

    def upstream_for(self, sentinel: IPAddress) -> Server | None:
        """The upstream resolver a sentinel stands for."""
        return self._upstream_for.get(sentinel.packed)

    def proxy_routes(self) -> list[tuple[IPAddress, Resource]]:
        """Every proxy address handed out, with its resource: what the IO shell routes to the
        resources' peers (again after a reload replaced the peers' allowed IPs)."""
        return [(address, resource) for (_, resource), addresses in self._proxies.items()
                for address in addresses]

    def resource_for_address(self, ip: IPAddress | bytes) -> Resource | None:
        """The resource a proxy address (an address object or packed bytes) was handed out for."""
        entry = self._by_proxy.get(ip if isinstance(ip, bytes) else ip.packed)
        return entry[1] if entry else None

    def name_for_address(self, ip: IPAddress | bytes) -> str | None:
        """The (lower-case) name a proxy address was handed out for."""
        entry = self._by_proxy.get(ip if isinstance(ip, bytes) else ip.packed)
        return b".".join(entry[0]).decode("ascii", "backslashreplace") if entry else None

    def is_pending(self, query_id: int) -> bool:
        """Whether an upstream query is still waited for (the IO shell may close its socket
        once not)."""
        return query_id in self._pending

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def proxy_names(self) -> int:
        """How many names hold proxy addresses now (at most ``max_proxy_names``)."""
        return len(self._proxies)

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (absolute, on the caller's clock)."""
        if not self._pending:
            return None
        return next(iter(self._pending.values())).expires_at

    # -- inputs -------------------------------------------------------------------------------

    def count_drop(self, reason: D, n: int = 1) -> None:
        """Count queries the IO side dropped before they reached the stub (e.g. shed)."""
        self.drops[reason] += n

    def handle_packet(self, packet: bytes, now: float) -> bool:
        """Consume a packet read from TUN if it is UDP to a sentinel's port 53 (True), else leave
        it to the caller (False)."""
        if not self._to_sentinel(packet):
            return False
        datagram = parse_udp(packet)
        if datagram is None:
            self.drops[D.BAD_INNER_PACKET] += 1
            return True
        if datagram.dst_port != DNS_PORT:
            return False
        self._on_query(datagram, now)
        return True

    def handle_tcp_query(self, stream: int, message: bytes, client: bytes, client_port: int,
                         sentinel: bytes, now: float) -> None:
        """A query that arrived over TCP connection ``stream`` to ``sentinel``; its answer
        appears in ``tcp_answers`` as ``(stream, message)``."""
        if sentinel not in self._upstream_for:
            self.drops[D.DNS_MALFORMED] += 1
            return
        make = IPv4Address if len(client) == 4 else IPv6Address
        datagram = UdpDatagram(make(client), make(sentinel), client_port, DNS_PORT, message)
        self._on_query(datagram, now, stream)

    def handle_upstream_reply(
        self, data: bytes, now: float, *, via_tcp: bool = False, source: object = None
    ) -> None:
        """An upstream's answer: a UDP payload, or (``via_tcp``) one TCP message without its
        length prefix. ``source``, the sender's socket address if known, must be the upstream
        the query went to (else the answer is dropped as spoofed)."""
        if len(data) < 2:
            self.drops[D.DNS_REPLY_TOO_SHORT] += 1
            return
        query_id = int.from_bytes(data[:2], "big")
        pending = self._pending.get(query_id)
        if pending is None:
            self.drops[D.DNS_REPLY_UNKNOWN_ID] += 1
            return
        if pending.via_tcp != via_tcp:
            self.drops[D.DNS_REPLY_WRONG_TRANSPORT] += 1
            return
        if source is not None and not same_address(source, pending.server):
            self.drops[D.DNS_REPLY_WRONG_SOURCE] += 1
            return
        reply = parse_message(data)
        verdict = check_reply(reply, pending.query.questions[0])
        if verdict == "mismatch":
            self.drops[D.DNS_REPLY_QUESTION_MISMATCH] += 1  # keep waiting for the real one
            return
        if verdict == "garbage":
            del self._pending[query_id]
            self._servfail(pending, "dns_servfail_bad_reply")
            return
        assert reply is not None
        if reply.header.tc and not via_tcp:
            self._retry_over_tcp(query_id, pending, now)
            return
        del self._pending[query_id]
        answer = pending.query.header.id.to_bytes(2, "big") + bytes(data[2:])
        if self._send(pending.sentinel, pending.client, pending.client_port, answer, pending.stream):
            self.stats["dns_forwarded_answer"] += 1
        else:
            self._servfail(pending, "dns_servfail_answer_too_big")

    def upstream_failed(self, query_id: int, now: float) -> None:
        """The IO shell could not send a query (or connect, or read the TCP answer): SERVFAIL."""
        pending = self._pending.pop(query_id, None)
        if pending is None:
            self.stats["dns_failure_for_unknown_id"] += 1
            return
        self._servfail(pending, "dns_servfail_upstream_failed")

    def handle_timer(self, now: float) -> None:
        """Expire recursive queries whose deadline passed."""
        while self._pending and next(iter(self._pending.values())).expires_at <= now:
            _, pending = self._pending.popitem(last=False)
            if pending.via_tcp:
                self._servfail(pending, "dns_servfail_tcp_timeout")
            else:
                self.stats["dns_udp_timeout"] += 1  # no answer: the client retries on its own

    # -- the query path -----------------------------------------------------------------------

    def _to_sentinel(self, packet: bytes) -> bool:
        if len(packet) < 28:
            return False
        version = packet[0] >> 4
        if version == 4:
            return packet[9] == PROTO_UDP and bytes(packet[16:20]) in self._upstream_for
        if version == 6:
            return packet[6] == PROTO_UDP and bytes(packet[24:40]) in self._upstream_for
        return False

    def _on_query(self, datagram: UdpDatagram, now: float, stream: int | None = None) -> None:
        query = parse_message(datagram.payload)
        problem = _query_problem(query)
        if problem is not None:
            self.drops[D.DNS_MALFORMED] += 1
            self.stats[problem] += 1
            return
        assert query is not None
        reply = self._local_reply(query)
        if reply is not None:
            self._reply(datagram, reply, stream)
        else:
            self._forward(datagram, query, now, stream)

    def _local_reply(self, query: DNSRecord) -> DNSRecord | None:
        """The answer we give ourselves, or None to ask the upstream."""
        if query.header.opcode != OPCODE_QUERY:
            self.stats["dns_notimp"] += 1
            return _response(query, RCODE.NOTIMP, aa=0)
        if len(query.questions) != 1:
            self.stats["dns_formerr"] += 1
            return _response(query, RCODE.FORMERR, aa=0)
        question = query.questions[0]
        labels = labels_of(question.qname)
        if labels == CANARY:
            self.stats["dns_canary"] += 1
            return _response(query, RCODE.NXDOMAIN, aa=1)
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            return None
        resource = self._resources.match(labels)
        if resource is not None:
            return self._resource_reply(query, question, labels, resource)
        if question.qtype == QTYPE.PTR:
            return self._ptr_reply(query, question, labels)
        return None

    def _resource_reply(
        self, query: DNSRecord, question: DNSQuestion, labels: Labels, resource: Resource
    ) -> DNSRecord:
        addresses = self._proxy_addresses(labels, resource)
        if addresses is None:
            self.stats["dns_servfail_proxy_pool_exhausted"] += 1
            return _response(query, RCODE.SERVFAIL, aa=0)
        name = b".".join(labels).decode("ascii", "backslashreplace")
        self.resource_answers.append((name, resource, addresses))
        reply = _response(query, RCODE.NOERROR, aa=1)
        answer = self._local.get(question.qtype)
        if answer is not None:  # A, AAAA; everything else (HTTPS too) is an empty NOERROR
            for rdata in answer(labels, resource):
                reply.add_answer(RR(question.qname, question.qtype, rdata=rdata, ttl=ANSWER_TTL))
        self.stats["dns_resource_answer"] += 1
        return reply

    def _answer_a(self, labels: Labels, resource: Resource) -> list:
        return [A(str(self._proxies[labels, resource][0]))]

    def _answer_aaaa(self, labels: Labels, resource: Resource) -> list:
        return [AAAA(str(self._proxies[labels, resource][1]))]

    def _proxy_addresses(
        self, labels: Labels, resource: Resource
    ) -> tuple[IPv4Address, IPv6Address] | None:
        key = (labels, resource)
        proxies = self._proxies
        addresses = proxies.get(key)
        if addresses is not None:
            proxies.move_to_end(key)  # recently used: evicted last
            return addresses
        if len(proxies) >= self._max_proxy_names:
            if not proxies:
                return None
            old_key, addresses = proxies.popitem(last=False)  # the least recently used name
            for address in addresses:
                del self._by_proxy[address.packed]
            self.expired_proxies.extend(addresses)
            self.stats["dns_proxy_evicted"] += 1
        else:
            index = len(proxies) + 1
            addresses = (PROXY_V4[index], PROXY_V6[index])
        proxies[key] = addresses
        self.new_proxies.extend((address, resource) for address in addresses)
        for address in addresses:
            self._by_proxy[address.packed] = key
        return addresses

    def _ptr_reply(
        self, query: DNSRecord, question: DNSQuestion, labels: Labels
    ) -> DNSRecord | None:
        packed = _reverse_address(labels)
        entry = self._by_proxy.get(packed) if packed is not None else None
        if entry is None:
            return None
        reply = _response(query, RCODE.NOERROR, aa=1)
        reply.add_answer(
            RR(question.qname, QTYPE.PTR, rdata=PTR(DNSLabel(entry[0])), ttl=ANSWER_TTL)
        )
        self.stats["dns_ptr_answer"] += 1
        return reply

    def _forward(self, datagram: UdpDatagram, query: DNSRecord, now: float, stream: int | None) -> None:
        if len(self._pending) >= MAX_IN_FLIGHT:
            self.stats["dns_servfail_too_many_in_flight"] += 1
            self._reply(datagram, _response(query, RCODE.SERVFAIL, aa=0), stream)
            return
        query_id = self._fresh_id()
        data = query_id.to_bytes(2, "big") + datagram.payload[2:]
        server = self._upstream_for[datagram.dst.packed]
        self._pending[query_id] = _Pending(
            query, data, datagram.src, datagram.src_port, datagram.dst, server,
            expires_at=now + RECURSION_TIMEOUT, stream=stream,
        )
        self.udp_queries.append(UpstreamQuery(query_id, data, server))
        self.stats["dns_forwarded"] += 1

    def _fresh_id(self) -> int:
        while True:  # at most 1000 of 65536 IDs are taken: ~1.02 draws on average
            query_id = self._rng.getrandbits(16)
            if query_id not in self._pending:
                return query_id

    # -- the answer path ----------------------------------------------------------------------

    def _retry_over_tcp(self, query_id: int, pending: _Pending, now: float) -> None:
        pending.via_tcp = True
        pending.expires_at = now + RECURSION_TIMEOUT
        self._pending.move_to_end(query_id)  # the latest deadline: order is kept
        framed = len(pending.data).to_bytes(2, "big") + pending.data
        self.tcp_queries.append(UpstreamQuery(query_id, framed, pending.server))
        self.stats["dns_tcp_retry"] += 1

    def _servfail(self, pending: _Pending, reason: str) -> None:
        self.stats[reason] += 1
        payload = self._pack(_response(pending.query, RCODE.SERVFAIL, aa=0))
        if payload is not None:
            self._send(pending.sentinel, pending.client, pending.client_port, payload, pending.stream)

    def _reply(self, datagram: UdpDatagram, reply: DNSRecord, stream: int | None = None) -> None:
        payload = self._pack(reply)
        if payload is not None:
            self._send(datagram.dst, datagram.src, datagram.src_port, payload, stream)

    def _pack(self, record: DNSRecord) -> bytes | None:
        try:
            return record.pack()
        except (DNSError, DNSLabelError, DNSBufferError):  # a bug of ours; dropped, not raised
            self.drops[D.DNS_UNENCODABLE_REPLY] += 1
            return None

    def _send(self, sentinel: IPAddress, client: IPAddress, port: int, payload: bytes,
              stream: int | None = None) -> bool:
        if stream is not None:
            if len(payload) > MAX_TCP_MESSAGE:
                return False
            self.tcp_answers.append((stream, payload))
            return True
        limit = MAX_UDP_PAYLOAD_V4 if sentinel.version == 4 else MAX_UDP_PAYLOAD_V6
        if len(payload) > limit:
            return False
        self.to_tun.append(build_udp(sentinel, client, DNS_PORT, port, payload))
        return True
