"""A/AAAA lookups of the gateway through its resolver, sans-IO.

:meth:`Lookups.lookup` asks for a name's A and AAAA records: two queries with fresh random IDs
appear in ``queries`` (the IO shell sends each from its own socket, i.e. a fresh random source
port); :meth:`Lookups.handle_reply` takes an answer with the address it came from. An answer
counts only from the resolver's address and port, with a pending ID and the query's question
(:mod:`fzpoll.dns.upstream`); anything else is dropped and counted under
``DNS_UPSTREAM_MISMATCH`` and the lookup keeps waiting. When both queries are done (answered,
failed or timed out after 10 s) the name's addresses appear in ``results``: the A and AAAA
records that belong to the name (following CNAMEs within the answer), or None if neither query
got an answer. Lookups of a name already in flight are joined; at most ``max_in_flight`` names
are looked up at once (beyond: an immediate failure, counted).
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from ipaddress import ip_address

from dnslib import QTYPE, RCODE, DNSQuestion, DNSRecord

from fzpoll.dns.upstream import Server, check_reply, labels_of, parse_message, same_address
from fzpoll.errors import DropReason as D

LOOKUP_TIMEOUT = 10.0
DEFAULT_MAX_IN_FLIGHT = 256
MAX_ADDRESSES = 64  # per name and family: round robin needs no more


@dataclass(frozen=True, slots=True)
class LookupQuery:
    """One query for the IO shell to send to ``server`` from a fresh socket."""

    query_id: int
    data: bytes
    server: Server


@dataclass(slots=True)
class _Name:
    domain: str
    expires_at: float
    waiting: set[int] = field(default_factory=set)  # query IDs not answered yet
    addresses: list[bytes] = field(default_factory=list)
    answered: bool = False


class Lookups:
    """The gateway's lookups in flight (see the module doc). ``rng`` supplies query IDs."""

    def __init__(self, server: Server, *, rng: random.Random | None = None,
                 timeout: float = LOOKUP_TIMEOUT, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self.server = server
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.queries: list[LookupQuery] = []
        self.results: list[tuple[str, tuple[bytes, ...] | None]] = []
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._rng = rng if rng is not None else random.SystemRandom()
        self._names: OrderedDict[str, _Name] = OrderedDict()  # insertion order = deadline order
        self._by_id: dict[int, tuple[_Name, DNSQuestion]] = {}

    def lookup(self, domain: str, now: float) -> None:
        """Start looking ``domain`` up (lower-case, no root dot), unless it already is."""
        if domain in self._names:
            return
        if len(self._names) >= self.max_in_flight:
            self.stats["lookup_too_many_in_flight"] += 1
            self.results.append((domain, None))
            return
        name = _Name(domain, now + self.timeout)
        self._names[domain] = name
        for qtype in (QTYPE.A, QTYPE.AAAA):
            query_id = self._fresh_id()
            record = DNSRecord.question(domain, QTYPE.get(qtype))
            record.header.id = query_id
            name.waiting.add(query_id)
            self._by_id[query_id] = (name, record.questions[0])
            self.queries.append(LookupQuery(query_id, record.pack(), self.server))
        self.stats["lookup_started"] += 1

    def _fresh_id(self) -> int:
        while True:
            query_id = self._rng.getrandbits(16)
            if query_id not in self._by_id:
                return query_id

    def is_pending(self, query_id: int) -> bool:
        """Whether a query is still waited for (the IO shell closes its socket once not)."""
        return query_id in self._by_id

    @property
    def in_flight(self) -> int:
        return len(self._names)

    def next_deadline(self) -> float | None:
        return next(iter(self._names.values())).expires_at if self._names else None

    # ---------------------------------------------------------------------------------- answers

    def handle_reply(self, data: bytes, source: object, now: float) -> None:
        """An answer that arrived from ``source`` (a socket address)."""
        entry = self._by_id.get(int.from_bytes(data[:2], "big")) if len(data) >= 2 else None
        if entry is None or not same_address(source, self.server):
            self.drops[D.DNS_UPSTREAM_MISMATCH] += 1
            return
        name, question = entry
        reply = parse_message(data)
        if reply is None or check_reply(reply, question) != "ok":
            self.drops[D.DNS_UPSTREAM_MISMATCH] += 1  # not this query's answer: keep waiting
            return
        self._query_done(name, int.from_bytes(data[:2], "big"))
        name.answered = True
        if reply.header.rcode == RCODE.NOERROR:
            self._collect(name, reply, question)
        self._maybe_finish(name)

    def query_failed(self, query_id: int) -> None:
        """The IO shell could not send a query: it counts as unanswered."""
        entry = self._by_id.get(query_id)
        if entry is not None:
            self._query_done(entry[0], query_id)
            self._maybe_finish(entry[0])

    def handle_timer(self, now: float) -> None:
        while self._names and next(iter(self._names.values())).expires_at <= now:
            _, name = self._names.popitem(last=False)
            for query_id in name.waiting:
                self._by_id.pop(query_id, None)
            self.stats["lookup_timeout"] += 1
            self._finish(name)

    def _query_done(self, name: _Name, query_id: int) -> None:
        name.waiting.discard(query_id)
        self._by_id.pop(query_id, None)

    def _maybe_finish(self, name: _Name) -> None:
        if not name.waiting and self._names.get(name.domain) is name:
            del self._names[name.domain]
            self._finish(name)

    def _finish(self, name: _Name) -> None:
        self.results.append((name.domain, tuple(name.addresses) if name.answered else None))

    @staticmethod
    def _collect(name: _Name, reply: DNSRecord, question: DNSQuestion) -> None:
        """The A/AAAA records of the name, following CNAMEs inside the answer section."""
        owners = {labels_of(question.qname)}
        wanted = question.qtype
        found = 0
        for rr in reply.rr:
            owner = labels_of(rr.rname)
            if owner not in owners:
                continue
            if rr.rtype == QTYPE.CNAME:
                owners.add(labels_of(rr.rdata.label))
            elif rr.rtype == wanted and found < MAX_ADDRESSES:
                try:
                    name.addresses.append(ip_address(str(rr.rdata)).packed)
                    found += 1
                except ValueError:
                    continue
