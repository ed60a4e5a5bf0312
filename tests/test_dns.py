"""The sans-IO DNS stub resolver: local answers, recursion, bounds, drops, and a real dnsmasq.

Every test drives :class:`StubResolver` with raw IP packets built as the TUN device would hand
them over, a fake clock starting at 0.0, and a seeded RNG for the upstream query IDs.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import subprocess
import time
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fzpoll.dns.stub import (
    ANSWER_TTL,
    MAX_IN_FLIGHT,
    PROXY_V4,
    PROXY_V6,
    RECURSION_TIMEOUT,
    Resource,
    StubResolver,
    UpstreamQuery,
)
from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.ippacket import build_udp, checksum_ok, parse_udp
from helpers import skip_unless

CLIENT4 = ip_address("100.64.0.2")
CLIENT6 = ip_address("fd00:2021:1111::2")
UPSTREAM4 = ("192.0.2.53", 53)
UPSTREAM6 = ("2001:db8::53", 53)
SENTINEL4 = ip_address("100.100.111.1")
SENTINEL6 = ip_address("fd00:2021:1111:8000:100:100:111:1")
WEB = Resource("*.example.com", "peer-web")
APP = Resource("app.corp.test", "peer-app")
ONE = Resource("?.one.test", "peer-one")


def make(resources=(WEB, APP, ONE), upstreams=(UPSTREAM4, UPSTREAM6), **kwargs) -> StubResolver:
    return StubResolver(list(upstreams), list(resources), rng=random.Random(7), **kwargs)


def query_bytes(name: str, qtype: str = "A", qid: int = 4242) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    return q.pack()


def packet(payload: bytes, *, client=CLIENT4, port=40000, sentinel=None) -> bytes:
    if sentinel is None:
        sentinel = SENTINEL4 if client.version == 4 else SENTINEL6
    return build_udp(client, sentinel, port, 53, payload)


def drain(resolver: StubResolver) -> list[tuple]:
    """(datagram, parsed DNS) for every packet written to TUN, checksums verified."""
    out = []
    for raw in resolver.to_tun:
        assert checksum_ok(raw)
        datagram = parse_udp(raw)
        assert datagram is not None and datagram.src_port == 53
        out.append((datagram, DNSRecord.parse(datagram.payload)))
    resolver.to_tun.clear()
    return out


def ask(resolver: StubResolver, name: str, qtype: str = "A", *, now=0.0, **kwargs) -> DNSRecord:
    """A query answered locally: exactly one answer back to the client, nothing upstream."""
    assert resolver.handle_packet(packet(query_bytes(name, qtype), **kwargs), now)
    assert resolver.udp_queries == []
    (datagram, reply), = drain(resolver)
    assert reply.header.id == 4242 and reply.header.qr == 1
    assert datagram.dst_port == kwargs.get("port", 40000)
    return reply


def forward(resolver: StubResolver, name: str, qtype: str = "A", *, now=0.0, **kwargs):
    """A query that must go upstream; returns its UpstreamQuery."""
    assert resolver.handle_packet(packet(query_bytes(name, qtype, kwargs.pop("qid", 4242)),
                                         **kwargs), now)
    assert resolver.to_tun == []
    upstream = resolver.udp_queries.pop()
    assert resolver.udp_queries == []
    return upstream


def forward_raw(resolver: StubResolver, payload: bytes, now=0.0) -> UpstreamQuery:
    assert resolver.handle_packet(packet(payload), now)
    assert resolver.to_tun == []
    (upstream,) = resolver.udp_queries
    resolver.udp_queries.clear()
    return upstream


def answer_for(query: bytes, *, rcode=RCODE.NOERROR, tc=0, records=("192.0.2.1",)) -> bytes:
    q = DNSRecord.parse(query)
    reply = q.reply()
    reply.header.rcode = rcode
    reply.header.tc = tc
    for address in records:
        reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(address), ttl=300))
    return reply.pack()


def addresses(reply: DNSRecord) -> list:
    return [ip_address(str(rr.rdata)) for rr in reply.rr]


# -- sentinels ------------------------------------------------------------------------------

def test_sentinels_follow_upstream_families_in_order():
    r = make(upstreams=[("8.8.8.8", 53), ("2001:4860:4860::8888", 53), ("1.1.1.1", 5353)])
    assert r.sentinels == [
        IPv4Address("100.100.111.1"),
        IPv6Address("fd00:2021:1111:8000:100:100:111:1"),
        IPv4Address("100.100.111.2"),
    ]
    assert r.upstream_for(r.sentinels[2]) == ("1.1.1.1", 5353)
    assert r.upstream_for(r.sentinels[1]) == ("2001:4860:4860::8888", 53)
    # The query to the third sentinel goes to the third upstream.
    assert forward(r, "x.test", sentinel=r.sentinels[2]).server == ("1.1.1.1", 5353)


def test_sentinel_pool_limits_and_bad_upstreams():
    make(upstreams=[(f"10.0.0.{i}", 53) for i in range(1, 255)])  # 254 hosts in the /24
    with pytest.raises(LocalError):
        make(upstreams=[(f"10.0.{i // 250}.{i % 250 + 1}", 53) for i in range(255)])
    with pytest.raises(LocalError):
        make(upstreams=[("dns.google", 53)])
    with pytest.raises(LocalError):
        make(upstreams=[("8.8.8.8", 0)])


# -- local answers --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pattern,name,matches",
    [
        ("app.example.com", "app.example.com", True),
        ("app.example.com", "APP.Example.COM", True),
        ("app.example.com.", "app.example.com", True),
        ("app.example.com", "x.app.example.com", False),
        ("app.example.com", "example.com", False),
        ("*.example.com", "example.com", True),  # the apex
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.c.example.com", True),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.org", False),
        ("*.example.com", "com", False),
        ("?.example.com", "a.example.com", True),
        ("?.example.com", "Zz.EXAMPLE.com", True),
        ("?.example.com", "example.com", False),
        ("?.example.com", "a.b.example.com", False),
        ("*", "anything.at.all", True),
    ],
)
def test_pattern_matching(pattern, name, matches):
    r = make(resources=[Resource(pattern, "peer")])
    if matches:
        reply = ask(r, name)
        assert len(reply.rr) == 1 and ip_address(str(reply.rr[0].rdata)) in PROXY_V4
    else:
        assert forward(r, name).server == UPSTREAM4


@pytest.mark.parametrize("pattern", ["a.*.com", "**.example.com", "*x.example.com", "", ".",
                                     "a..b", "x.?.y"])
def test_bad_patterns_are_local_errors(pattern):
    with pytest.raises(LocalError):
        make(resources=[Resource(pattern, "peer")])


def test_most_specific_resource_wins():
    exact = Resource("app.example.com", "exact")
    star = Resource("*.example.com", "star")
    inner = Resource("*.app.example.com", "inner-star")
    question = Resource("?.example.com", "question")
    r = make(resources=[star, question, inner, exact])
    cases = {"app.example.com": exact, "x.app.example.com": inner, "b.example.com": question,
             "c.b.example.com": star, "example.com": star}
    for name, resource in cases.items():
        (proxy,) = addresses(ask(r, name))
        assert r.resource_for_address(proxy) == resource, name


def test_a_and_aaaa_get_stable_proxy_addresses_with_ttl_1():
    r = make()
    a1 = ask(r, "www.example.com", "A")
    aaaa1 = ask(r, "www.example.com", "AAAA")
    ask(r, "other.example.com", "A")
    a2 = ask(r, "WWW.example.com.", "A", now=100.0, port=5555)
    aaaa2 = ask(r, "www.example.com", "AAAA", client=CLIENT6)
    (v4,), (v6,) = addresses(a1), addresses(aaaa1)
    assert v4 in PROXY_V4 and v6 in PROXY_V6
    assert addresses(a2) == [v4] and addresses(aaaa2) == [v6]
    assert addresses(ask(r, "other.example.com")) != [v4]
    for reply in (a1, aaaa1):
        assert reply.header.rcode == RCODE.NOERROR and reply.header.aa == 1
        assert reply.rr[0].ttl == ANSWER_TTL
        assert str(reply.rr[0].rname) == "www.example.com."
    assert a1.rr[0].rtype == QTYPE.A and aaaa1.rr[0].rtype == QTYPE.AAAA


def test_proxy_addresses_are_per_name_and_resource():
    r = make(resources=[Resource("*.example.com", "p1")])
    (first,) = addresses(ask(r, "a.example.com"))
    r.set_resources([Resource("*.example.com", "p2")])
    (second,) = addresses(ask(r, "a.example.com"))
    assert first != second
    assert r.resource_for_address(first) == Resource("*.example.com", "p1")
    assert r.resource_for_address(second) == Resource("*.example.com", "p2")
    r.set_resources([Resource("*.example.com", "p1")])
    assert addresses(ask(r, "a.example.com")) == [first]


def test_resource_for_address():
    r = make()
    (v4,) = addresses(ask(r, "svc.example.com", "A"))
    (v6,) = addresses(ask(r, "app.corp.test", "AAAA"))
    assert r.resource_for_address(v4) == WEB
    assert r.resource_for_address(v4.packed) == WEB
    assert r.resource_for_address(v6) == APP
    assert r.name_for_address(v4) == "svc.example.com"
    assert r.resource_for_address(ip_address("100.96.99.99")) is None
    assert r.resource_for_address(ip_address("192.0.2.1")) is None


def test_ptr_for_proxy_addresses():
    r = make()
    (v4,) = addresses(ask(r, "Svc.Example.com", "A"))
    (v6,) = addresses(ask(r, "svc.example.com", "AAAA"))
    for address in (v4, v6):
        reply = ask(r, address.reverse_pointer, "PTR")
        assert reply.header.rcode == RCODE.NOERROR
        (rr,) = reply.rr
        assert rr.rtype == QTYPE.PTR and str(rr.rdata) == "svc.example.com." and rr.ttl == 1
    # Not handed out, or not a proxy address: the upstream answers.
    forward(r, ip_address("100.96.0.200").reverse_pointer, "PTR")
    forward(r, ip_address("192.0.2.1").reverse_pointer, "PTR")
    forward(r, "999.0.96.100.in-addr.arpa", "PTR")


@pytest.mark.parametrize("qtype", ["HTTPS", "MX", "TXT", "SRV", "CNAME"])
def test_other_qtypes_for_resources_are_empty_noerror(qtype):
    r = make()
    reply = ask(r, "svc.example.com", qtype)
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []
    assert reply.q.qtype == getattr(QTYPE, qtype)


def test_resource_names_in_other_classes_go_upstream():
    r = make()
    q = DNSRecord(DNSHeader(id=4242), q=DNSQuestion("svc.example.com", QTYPE.TXT, 3))  # CHAOS
    upstream = forward_raw(r, q.pack())
    assert upstream.data[2:] == q.pack()[2:]


def test_doh_canary_is_nxdomain():
    r = make(resources=[Resource("*", "everything")])
    for qtype in ("A", "AAAA", "HTTPS"):
        reply = ask(r, "Use-Application-DNS.net", qtype)
        assert reply.header.rcode == RCODE.NXDOMAIN and reply.rr == []
    forward(make(), "x.use-application-dns.net")


def test_ipv6_client_gets_ipv6_answer_from_sentinel():
    r = make()
    assert r.handle_packet(packet(query_bytes("svc.example.com", "AAAA"), client=CLIENT6), 0.0)
    ((datagram, reply),) = drain(r)
    assert (datagram.src, datagram.dst, datagram.dst_port) == (SENTINEL6, CLIENT6, 40000)
    assert addresses(reply)[0] in PROXY_V6


def test_proxy_names_are_bounded_least_recently_used_gives_way():
    r = make(max_proxy_names=2)
    a = addresses(ask(r, "a.example.com"))
    b = addresses(ask(r, "b.example.com"))
    assert addresses(ask(r, "a.example.com")) == a  # a is now the most recently used
    c = addresses(ask(r, "c.example.com"))
    assert c == b  # b gave its addresses to c
    assert r.stats["dns_proxy_evicted"] == 1
    assert len(r.expired_proxies) == 2 and r.expired_proxies[0] == b[0]  # v4 and v6 to unroute
    assert r.name_for_address(c[0]) == "c.example.com"
    assert addresses(ask(r, "a.example.com")) == a
    assert r.proxy_names == 2


def test_other_opcodes_and_multiple_questions():
    r = make()
    q = DNSRecord.question("svc.example.com")
    q.header.id, q.header.opcode = 4242, 2  # STATUS
    assert r.handle_packet(packet(q.pack()), 0.0)
    ((_, reply),) = drain(r)
    assert reply.header.rcode == RCODE.NOTIMP
    q = DNSRecord(DNSHeader(id=4242), questions=[DNSQuestion("a.test"), DNSQuestion("b.test")])
    assert r.handle_packet(packet(q.pack()), 0.0)
    ((_, reply),) = drain(r)
    assert reply.header.rcode == RCODE.FORMERR and r.udp_queries == []


# -- which packets are ours -----------------------------------------------------------------

def test_handle_packet_claims_only_udp_53_to_sentinels():
    r = make()
    q = query_bytes("x.test")
    assert not r.handle_packet(build_udp(CLIENT4, ip_address("8.8.8.8"), 4000, 53, q), 0.0)
    assert not r.handle_packet(build_udp(CLIENT4, SENTINEL4, 4000, 5353, q), 0.0)
    assert not r.handle_packet(build_udp(CLIENT4, ip_address("100.100.111.9"), 4000, 53, q), 0.0)
    tcp = bytearray(build_udp(CLIENT4, SENTINEL4, 4000, 53, q))
    tcp[9] = 6
    assert not r.handle_packet(bytes(tcp), 0.0)
    assert not r.handle_packet(b"", 0.0)
    assert not r.handle_packet(b"\x00" * 60, 0.0)
    assert r.to_tun == [] and r.udp_queries == [] and not r.drops
    # UDP to a sentinel with broken lengths: ours, dropped and counted.
    broken = build_udp(CLIENT4, SENTINEL4, 4000, 53, q)
    assert r.handle_packet(broken[:24] + b"\xff\xff" + broken[26:], 0.0)
    assert r.drops == {D.BAD_INNER_PACKET: 1}
    # A bytearray from a reusable read buffer works too.
    assert r.handle_packet(bytearray(packet(q)), 0.0) and len(r.udp_queries) == 1


def test_malformed_queries_are_dropped_and_counted():
    r = make()
    response = DNSRecord.parse(query_bytes("x.test")).reply().pack()
    no_question = DNSRecord(DNSHeader(id=1)).pack()
    # Five 63-byte labels: 321 bytes on the wire, over the 255 limit (dnslib still parses it).
    too_long = bytes(12) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01"
    too_long = b"\x12\x34\x01\x00\x00\x01" + too_long[6:]
    for payload in (b"", b"\x01", b"garbage that is no dns", response, no_question,
                    query_bytes("x.test")[:-3], too_long):
        assert r.handle_packet(packet(payload), 0.0)
    assert r.to_tun == [] and r.udp_queries == []
    assert r.drops == {D.DNS_MALFORMED: 7}
    assert r.stats["dns_not_a_query"] == 1 and r.stats["dns_no_question"] == 1
    assert r.stats["dns_unparsable"] == 4 and r.stats["dns_name_too_long"] == 1


# -- recursion ------------------------------------------------------------------------------

def test_recursive_query_is_remapped_and_answer_mapped_back():
    r = make()
    original = query_bytes("www.debian.org", qid=4242)
    assert r.handle_packet(packet(original, port=33333), 10.0)
    (upstream,) = r.udp_queries
    r.udp_queries.clear()
    assert isinstance(upstream, UpstreamQuery) and upstream.server == UPSTREAM4
    assert upstream.data[2:] == original[2:]
    assert int.from_bytes(upstream.data[:2], "big") == upstream.query_id
    assert r.is_pending(upstream.query_id) and r.in_flight == 1
    assert r.next_deadline() == 10.0 + RECURSION_TIMEOUT

    reply = answer_for(upstream.data, records=["192.0.2.80", "192.0.2.81"])
    r.handle_upstream_reply(reply, 10.1, source=UPSTREAM4)
    ((datagram, answer),) = drain(r)
    assert (datagram.src, datagram.dst, datagram.dst_port) == (SENTINEL4, CLIENT4, 33333)
    assert datagram.payload == original[:2] + reply[2:]
    assert answer.header.id == 4242 and len(answer.rr) == 2
    assert not r.is_pending(upstream.query_id) and r.next_deadline() is None
    # A duplicate answer is dropped.
    r.handle_upstream_reply(reply, 10.2)
    r.handle_upstream_reply(b"\x01", 10.2)
    assert r.to_tun == []
    assert r.drops == {"dns_reply_unknown_id": 1, "dns_reply_too_short": 1}


def test_upstream_error_answers_pass_through_unchanged():
    r = make()
    for rcode in (RCODE.NXDOMAIN, RCODE.REFUSED, RCODE.SERVFAIL):
        upstream = forward(r, "nope.test")
        reply = answer_for(upstream.data, rcode=rcode, records=())
        r.handle_upstream_reply(reply, 0.5)
        ((datagram, answer),) = drain(r)
        assert answer.header.rcode == rcode
        assert datagram.payload[2:] == reply[2:]


def test_1000_concurrent_queries_all_mapped_back_and_the_1001st_servfails():
    r = make()
    for i in range(MAX_IN_FLIGHT):  # every client picks the same query ID
        client = CLIENT4 if i % 2 else CLIENT6
        assert r.handle_packet(packet(query_bytes(f"n{i}.test", qid=7), client=client,
                                      port=20000 + i), i / 1000)
    upstreams = list(r.udp_queries)
    r.udp_queries.clear()
    ids = [u.query_id for u in upstreams]
    assert len(set(ids)) == MAX_IN_FLIGHT and r.in_flight == MAX_IN_FLIGHT
    assert {u.server for u in upstreams} == {UPSTREAM4, UPSTREAM6}

    assert r.handle_packet(packet(query_bytes("straw.test", qid=99), port=19999), 1.0)
    ((datagram, reply),) = drain(r)
    assert reply.header.rcode == RCODE.SERVFAIL and reply.header.id == 99
    assert datagram.dst_port == 19999 and r.udp_queries == []
    assert r.stats["dns_servfail_too_many_in_flight"] == 1

    random.Random(3).shuffle(upstreams)
    for n, upstream in enumerate(upstreams):
        name = str(DNSRecord.parse(upstream.data).q.qname)
        i = int(name[1:name.index(".")])
        r.handle_upstream_reply(answer_for(upstream.data, records=[f"10.0.{i // 256}.{i % 256}"]),
                                2.0)
        ((datagram, answer),) = drain(r)
        assert datagram.dst == (CLIENT4 if i % 2 else CLIENT6)
        assert datagram.dst_port == 20000 + i and answer.header.id == 7
        assert str(answer.q.qname) == name
        assert addresses(answer) == [ip_address(f"10.0.{i // 256}.{i % 256}")]
        if n == 0:  # room again: a new query is forwarded
            forward(r, "late.test", now=2.0)
    assert r.in_flight == 1 and not r.drops


def test_udp_timeout_gets_no_answer():
    r = make()
    upstream = forward(r, "slow.test", now=1.0)
    assert r.next_deadline() == 6.0
    r.handle_timer(5.999)
    assert r.is_pending(upstream.query_id)
    r.handle_timer(6.0)
    assert not r.is_pending(upstream.query_id) and r.to_tun == []
    assert r.next_deadline() is None and r.stats["dns_udp_timeout"] == 1
    r.handle_upstream_reply(answer_for(upstream.data), 6.5)  # too late
    assert r.to_tun == [] and r.drops == {"dns_reply_unknown_id": 1}


def test_truncated_answer_is_retried_over_tcp():
    r = make()
    upstream = forward(r, "big.test", now=0.0, port=41000)
    r.handle_upstream_reply(answer_for(upstream.data, tc=1), 1.0)
    assert r.to_tun == [] and r.udp_queries == []
    (tcp,) = r.tcp_queries
    assert tcp.query_id == upstream.query_id and tcp.server == UPSTREAM4
    assert tcp.data == len(upstream.data).to_bytes(2, "big") + upstream.data
    assert r.next_deadline() == 1.0 + RECURSION_TIMEOUT
    # A late UDP copy is not the TCP answer.
    r.handle_upstream_reply(answer_for(upstream.data), 1.1)
    assert r.to_tun == [] and r.drops == {"dns_reply_wrong_transport": 1}
    full = answer_for(upstream.data, records=[f"192.0.2.{i}" for i in range(1, 60)])
    r.handle_upstream_reply(full, 1.2, via_tcp=True)
    ((datagram, answer),) = drain(r)
    assert datagram.dst_port == 41000 and answer.header.id == 4242 and len(answer.rr) == 59
    assert datagram.payload[2:] == full[2:] and r.in_flight == 0


def test_tcp_retry_timeout_is_servfail_and_deadlines_stay_ordered():
    r = make()
    first = forward(r, "first.test", now=0.0, port=1111)
    forward(r, "second.test", now=2.0, port=2222)
    r.handle_upstream_reply(answer_for(first.data, tc=1), 3.0)
    assert r.next_deadline() == 7.0  # the second's UDP deadline now comes first
    r.handle_timer(7.0)
    assert r.to_tun == [] and r.next_deadline() == 8.0
    r.handle_timer(8.0)
    ((datagram, reply),) = drain(r)
    assert datagram.dst_port == 1111 and reply.header.rcode == RCODE.SERVFAIL
    assert str(reply.q.qname) == "first.test." and reply.header.id == 4242
    assert r.stats["dns_servfail_tcp_timeout"] == 1 and r.next_deadline() is None


def test_tc_in_a_tcp_answer_is_passed_through():
    r = make()
    upstream = forward(r, "big.test")
    r.handle_upstream_reply(answer_for(upstream.data, tc=1), 0.1)
    r.handle_upstream_reply(answer_for(upstream.data, tc=1), 0.2, via_tcp=True)
    ((_, reply),) = drain(r)
    assert reply.header.tc == 1 and len(r.tcp_queries) == 1


@pytest.mark.parametrize(
    "make_reply",
    [
        lambda data: data[:2] + b"\x81\x80 this is not dns",
        lambda data: data[:2],
        lambda data: data,  # the query itself: QR clear
        lambda data: DNSRecord(DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1)).pack(),
    ],
    ids=["garbage", "id-only", "not-a-response", "noerror-without-question"],
)
def test_unusable_upstream_answer_is_servfail(make_reply):
    r = make()
    upstream = forward(r, "broken.test", port=3333)
    r.handle_upstream_reply(make_reply(upstream.data), 0.5)
    ((datagram, reply),) = drain(r)
    assert reply.header.rcode == RCODE.SERVFAIL and datagram.dst_port == 3333
    assert str(reply.q.qname) == "broken.test." and r.in_flight == 0
    assert r.stats["dns_servfail_bad_reply"] == 1


def test_garbage_tcp_answer_is_servfail():
    r = make()
    upstream = forward(r, "broken.test")
    r.handle_upstream_reply(answer_for(upstream.data, tc=1), 0.1)
    r.handle_upstream_reply(upstream.data[:2] + b"\xff" * 30, 0.2, via_tcp=True)
    ((_, reply),) = drain(r)
    assert reply.header.rcode == RCODE.SERVFAIL


def test_failed_send_is_servfail():
    r = make()
    upstream = forward(r, "unreachable.test", port=4444)
    r.upstream_failed(upstream.query_id, 0.1)
    ((datagram, reply),) = drain(r)
    assert reply.header.rcode == RCODE.SERVFAIL and datagram.dst_port == 4444
    r.upstream_failed(upstream.query_id, 0.2)  # already answered: ignored
    r.upstream_failed(12345, 0.2)
    assert r.to_tun == [] and r.stats["dns_servfail_upstream_failed"] == 1


def test_answers_for_another_question_or_from_another_source_are_dropped():
    r = make()
    upstream = forward(r, "real.test")
    other = DNSRecord.question("spoofed.test")
    other.header.id = upstream.query_id
    r.handle_upstream_reply(answer_for(other.pack()), 0.1)
    r.handle_upstream_reply(answer_for(upstream.data), 0.1, source=("203.0.113.9", 53))
    r.handle_upstream_reply(answer_for(upstream.data), 0.1, source=("192.0.2.53", 5353))
    r.handle_upstream_reply(answer_for(upstream.data), 0.1, source="nonsense")
    assert r.to_tun == [] and r.is_pending(upstream.query_id)
    assert r.drops == {"dns_reply_question_mismatch": 1, "dns_reply_wrong_source": 3}
    # The real answer, 0x20-style case changes and an IPv4-mapped source are fine.
    reply = DNSRecord.parse(answer_for(upstream.data))
    reply.q.qname = "REAL.test"
    r.handle_upstream_reply(reply.pack(), 0.2, source=("::ffff:192.0.2.53", 53, 0, 0))
    ((_, answer),) = drain(r)
    assert answer.header.rcode == RCODE.NOERROR and answer.header.id == 4242


def test_answer_too_big_for_one_udp_packet_is_servfail():
    r = make()
    upstream = forward(r, "huge.test")
    r.handle_upstream_reply(answer_for(upstream.data, tc=1), 0.1)
    q = DNSRecord.parse(upstream.data)
    reply = q.reply()
    for _ in range(249):
        reply.add_answer(RR(q.q.qname, QTYPE.TXT, rdata=TXT(["x" * 250]), ttl=60))
    big = reply.pack()
    assert 65507 < len(big) <= 65535
    r.handle_upstream_reply(big, 0.2, via_tcp=True)
    ((_, answer),) = drain(r)
    assert answer.header.rcode == RCODE.SERVFAIL
    assert r.stats["dns_servfail_answer_too_big"] == 1


def test_an_unencodable_answer_is_dropped_not_raised(monkeypatch):
    from dnslib import DNSError

    def fail(self):
        raise DNSError("cannot encode")

    r = make()
    monkeypatch.setattr(DNSRecord, "pack", fail)
    assert r.handle_packet(packet(b"\x00\x07\x01\x00\x00\x01" + bytes(6)
                                  + b"\x03svc\x07example\x03com\x00\x00\x01\x00\x01"), 0.0)
    assert r.to_tun == [] and r.drops == {"dns_unencodable_reply": 1}


# -- fuzz -----------------------------------------------------------------------------------

@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from([CLIENT4, CLIENT6]))
def test_arbitrary_query_payloads_never_raise(payload, client):
    r = make()
    assert r.handle_packet(packet(payload, client=client), 0.0)
    for raw in r.to_tun:
        assert checksum_ok(raw)
    assert sum(r.drops.values()) + len(r.to_tun) + len(r.udp_queries) == 1


labels = st.lists(st.binary(min_size=1, max_size=63), min_size=0, max_size=6)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels, st.sampled_from([b"example", b"EXAMPLE", b"one", b"arpa", b"net"]),
       st.sampled_from([b"com", b"test", b"in-addr", b"use-application-dns"]),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_well_formed_queries_with_arbitrary_names_never_raise(head, mid, tail, qtype, qclass,
                                                               flags):
    """Any label bytes (dots, NULs, upper case), type, class and header flags."""
    name = b"".join(bytes([len(x)]) + x for x in [*head, tail, mid]) + b"\x00"
    header = (7).to_bytes(2, "big") + (flags & 0x7FFF).to_bytes(2, "big") + b"\x00\x01" + bytes(6)
    r = make()
    r.handle_packet(packet(header + name + qtype.to_bytes(2, "big") + qclass.to_bytes(2, "big")),
                    0.0)
    for raw in r.to_tun:
        assert checksum_ok(raw)
        assert DNSRecord.parse(parse_udp(raw).payload).header.id == 7
    assert sum(r.drops.values()) + len(r.to_tun) + len(r.udp_queries) == 1


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=3), st.booleans())
def test_mutated_upstream_answers_never_raise(position, insert, tc):
    r = make()
    upstream = forward(r, "www.debian.org", "AAAA")
    good = bytes(answer_for(upstream.data, tc=int(tc), records=["192.0.2.1", "192.0.2.2"]))
    position %= len(good)
    mutated = good[:max(position, 2)] + insert + good[max(position, 2) + len(insert):]
    r.handle_upstream_reply(mutated, 0.1)
    r.handle_upstream_reply(mutated, 0.2, via_tcp=True)
    r.handle_timer(100.0)
    for raw in r.to_tun:
        assert checksum_ok(raw)
        assert DNSRecord.parse(parse_udp(raw).payload).header.id == 4242
    assert r.in_flight == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_tun_packets_never_raise(data):
    r = make()
    for variant in (data, b"\x45" + data, b"\x60" + data):
        r.handle_packet(variant, 0.0)


names = st.sampled_from(["a.example.com", "example.com", "x.one.test", "app.corp.test",
                         "www.debian.org", "use-application-dns.net",
                         "1.0.96.100.in-addr.arpa"])
qtypes = st.sampled_from(["A", "AAAA", "HTTPS", "PTR", "MX", "TXT"])
actions = st.one_of(
    st.tuples(st.just("query"), names, qtypes, st.integers(0, 0xFFFF), st.integers(1, 0xFFFF)),
    st.tuples(st.just("reply"), st.integers(0, 20), st.binary(max_size=80), st.booleans()),
    st.tuples(st.just("answer"), st.integers(0, 20), st.booleans(), st.booleans()),
    st.tuples(st.just("fail"), st.integers(0, 20)),
    st.tuples(st.just("tick"), st.floats(0, 7, allow_nan=False)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, max_size=40))
def test_arbitrary_interleavings_never_raise(steps):
    """Queries, good/bad/truncated replies, failures and time in any order: no exception, every
    packet out is valid, every deadline is honoured."""
    r = make()
    now = 0.0
    sent: list[UpstreamQuery] = []
    for step in steps:
        kind = step[0]
        if kind == "query":
            _, name, qtype, qid, port = step
            client = CLIENT4 if port % 2 else CLIENT6
            r.handle_packet(packet(query_bytes(name, qtype, qid), client=client, port=port), now)
        elif kind in ("reply", "answer") and sent:
            upstream = sent[step[1] % len(sent)]
            if kind == "reply":
                data = upstream.data[:2] + step[2]
            else:
                data = answer_for(upstream.data, tc=int(step[2]))
            r.handle_upstream_reply(data, now, via_tcp=step[3])
        elif kind == "fail" and sent:
            r.upstream_failed(sent[step[1] % len(sent)].query_id, now)
        elif kind == "tick":
            now += step[1]
            r.handle_timer(now)
        sent.extend(r.udp_queries)
        sent.extend(UpstreamQuery(q.query_id, q.data[2:], q.server) for q in r.tcp_queries)
        r.udp_queries.clear()
        r.tcp_queries.clear()
        for raw in r.to_tun:
            assert checksum_ok(raw)
            assert DNSRecord.parse(parse_udp(raw).payload).header.qr == 1
        r.to_tun.clear()
        deadline = r.next_deadline()
        assert r.in_flight <= MAX_IN_FLIGHT
        assert deadline is None or deadline > now


# -- against a real dnsmasq -----------------------------------------------------------------

def free_port() -> int:
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port")


BIG_RECORDS = [f"10.9.{i // 200}.{i % 200 + 1}" for i in range(40)]  # 40 A: ~670 bytes


@pytest.fixture
def dnsmasq():
    skip_unless("root", "dnsmasq")
    port = free_port()
    args = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
        "--address=/test.example/192.0.2.7",
    ] + [f"--host-record=big.example,{ip}" for ip in BIG_RECORDS]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        probe = DNSRecord.question("test.example").pack()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            for _ in range(25):  # up to ~5 s for dnsmasq to come up
                if proc.poll() is not None:
                    pytest.fail(f"dnsmasq exited: {proc.stdout.read().decode()}")
                s.sendto(probe, ("127.0.0.1", port))
                try:
                    s.recvfrom(4096)
                    break
                except TimeoutError:
                    continue
            else:
                pytest.fail("dnsmasq did not answer within 5 s")
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()


def udp_exchange(query: UpstreamQuery) -> tuple[bytes, tuple]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.sendto(query.data, query.server)
        return s.recvfrom(65535)


def tcp_exchange(query: UpstreamQuery) -> bytes:
    with socket.create_connection(query.server, timeout=3.0) as s:
        s.sendall(query.data)
        buffer = b""
        while len(buffer) < 2 or len(buffer) < 2 + int.from_bytes(buffer[:2], "big"):
            chunk = s.recv(65535)
            assert chunk, "dnsmasq closed the TCP connection early"
            buffer += chunk
        return buffer[2:2 + int.from_bytes(buffer[:2], "big")]


def test_against_dnsmasq(dnsmasq):
    r = StubResolver([dnsmasq], [WEB], rng=random.Random(1))
    sentinel = r.sentinels[0]

    # A plain recursive query: the answer packet goes back to the client.
    q = DNSRecord.question("test.example")
    q.header.id = 0xBEEF
    assert r.handle_packet(build_udp(CLIENT4, sentinel, 40001, 53, q.pack()), time.monotonic())
    (upstream,) = r.udp_queries
    r.udp_queries.clear()
    data, source = udp_exchange(upstream)
    r.handle_upstream_reply(data, time.monotonic(), source=source)
    ((datagram, reply),) = drain(r)
    assert (datagram.src, datagram.dst, datagram.dst_port) == (sentinel, CLIENT4, 40001)
    assert reply.header.id == 0xBEEF and reply.header.rcode == RCODE.NOERROR
    assert addresses(reply) == [ip_address("192.0.2.7")]

    # dnsmasq refuses names it does not know (no upstream): passed through as is.
    q = DNSRecord.question("unknown.invalid")
    assert r.handle_packet(build_udp(CLIENT4, sentinel, 40002, 53, q.pack()), time.monotonic())
    data, source = udp_exchange(r.udp_queries.pop())
    r.handle_upstream_reply(data, time.monotonic(), source=source)
    ((_, reply),) = drain(r)
    assert reply.header.rcode == RCODE.REFUSED and reply.header.id == q.header.id

    # 40 A records do not fit in 512 bytes: dnsmasq truncates, we retry over TCP.
    q = DNSRecord.question("big.example")
    assert r.handle_packet(build_udp(CLIENT4, sentinel, 40003, 53, q.pack()), time.monotonic())
    data, source = udp_exchange(r.udp_queries.pop())
    truncated = DNSRecord.parse(data)
    assert truncated.header.tc == 1 and len(truncated.rr) < len(BIG_RECORDS)
    r.handle_upstream_reply(data, time.monotonic(), source=source)
    assert r.to_tun == []
    (tcp_query,) = r.tcp_queries
    r.tcp_queries.clear()
    r.handle_upstream_reply(tcp_exchange(tcp_query), time.monotonic(), via_tcp=True)
    ((datagram, reply),) = drain(r)
    assert datagram.dst_port == 40003 and reply.header.id == q.header.id
    assert reply.header.tc == 0 and len(datagram.payload) > 512
    assert sorted(addresses(reply)) == sorted(ip_address(a) for a in BIG_RECORDS)

    # Resources never reach dnsmasq.
    assert r.handle_packet(build_udp(CLIENT4, sentinel, 40004, 53,
                                     DNSRecord.question("x.example.com").pack()), 0.0)
    assert r.udp_queries == [] and len(r.to_tun) == 1
    assert r.in_flight == 0 and not r.drops


def test_resolv_conf_has_the_sentinels_and_the_search_domains(tmp_path):
    """What wg-quick gives resolvconf for ``DNS = 10.0.0.53, fd00::53, corp.example, lab.example``,
    with the stub's sentinels in place of the servers."""
    from fzpoll.dns.forwarder import make_stub, write_resolv_conf

    stub = make_stub(["10.0.0.53", "fd00::53"], [])
    path = tmp_path / "resolv.conf"
    write_resolv_conf(stub, str(path), ("corp.example", "lab.example"))
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["nameserver 100.100.111.1", "nameserver fd00:2021:1111:8000:100:100:111:1",
                     "search corp.example lab.example"]


def test_forwarder_sheds_queries_under_a_sustained_flood() -> None:
    """A burst is answered whole; a flood of more than DNS_OVERLOAD_QUERIES in a window costs the
    loop ~2 us per query beyond MAX_QUERIES_PER_PASS (counted), until a window brings fewer."""
    from fzpoll.dns.forwarder import DNS_OVERLOAD_QUERIES, DNS_OVERLOAD_WINDOW, MAX_QUERIES_PER_PASS, DnsForwarder
    from fzpoll.io.datapath import Datapath
    from fzpoll.io.loop import Loop
    from fzpoll.wireguard.engine import Engine

    engine = Engine(None, random_bytes=random.Random(1).randbytes, wall_time=lambda: 0.0)
    loop = Loop()
    datapath = Datapath(engine, loop, None)
    r = make()
    forwarder = DnsForwarder(r, loop, datapath)
    qid = iter(range(1 << 16))

    def one_pass(now: float, queries: int) -> int:
        """Queries answered in a pass of ``queries`` queries at ``now``."""
        for _ in range(queries):
            assert datapath.intercept(packet(query_bytes("app.corp.test", qid=next(qid))), now)
        answered = len(drain(r))
        forwarder.flush(now)
        return answered

    try:
        w = DNS_OVERLOAD_WINDOW
        # Packets to other addresses chained through the intercept (the DNS resources' proxy
        # addresses) are not the stub's: neither taken, nor counted as queries, nor shed.
        proxy = ipaddress.ip_address("100.96.0.5")
        for _ in range(2 * DNS_OVERLOAD_QUERIES):
            assert not datapath.intercept(build_udp(CLIENT4, proxy, 40000, 53, b"x"), 0.0)
        forwarder.flush(0.0)
        assert not forwarder.shedding and r.drops[D.DNS_SHED] == 0
        assert one_pass(0.0, 64) == 64
        assert one_pass(w / 2, 1000) == 1000  # a burst: answered whole
        assert one_pass(w, 20) == 20 and not forwarder.shedding  # 1084 in the first window
        assert one_pass(w + 0.1, DNS_OVERLOAD_QUERIES) == DNS_OVERLOAD_QUERIES
        assert one_pass(2 * w, 20) == 20 and forwarder.shedding  # 2020 in the next: a flood
        assert one_pass(2 * w + 0.1, 20) == MAX_QUERIES_PER_PASS
        assert r.drops[D.DNS_SHED] == 20 - MAX_QUERIES_PER_PASS
        assert one_pass(3 * w, 3) == 3 and not forwarder.shedding  # the flood stopped
        assert one_pass(3 * w + 0.1, 20) == 20
    finally:
        forwarder.close()
        loop.close()
