"""The gateway's per-name state and its lookups (fzpoll.gateway.gateway, fzpoll.dns.lookup),
driven with a fake clock and a fake resolver."""

from __future__ import annotations

import copy
import random
from ipaddress import ip_address

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

import gwpackets as g
from fzpoll.dns.lookup import LOOKUP_TIMEOUT, Lookups
from fzpoll.errors import DropReason as D
from fzpoll.gateway import control
from fzpoll.gateway.control import AssignedIps, DomainStatus, Goodbye, NatStatus, resource_id
from fzpoll.gateway.gateway import Gateway
from fzpoll.gateway.packet import icmp_error_quote, is_prohibited

FUZZ = settings(max_examples=200, deadline=None, derandomize=True)
SERVER = ("10.97.1.10", 53)
PEER = "peerA"
RID = resource_id("*.corp.test")
C4, C6 = "100.64.0.2", "fd00:2021:1111::2"
P4, P6, P4B = "100.96.0.1", "fd00:2021:1111:8000::1", "100.96.0.2"


def make() -> Gateway:
    return Gateway(["*.corp.test", "db.internal.test"], Lookups(SERVER, rng=random.Random(7)))


def assigned(domain: str, *proxies: str) -> bytes:
    return control.encode(AssignedIps(RID, domain, tuple(ip_address(p) for p in proxies)))


def answer(query_data: bytes, *records: RR, rcode: int = RCODE.NOERROR, question: str | None = None) -> bytes:
    query = DNSRecord.parse(query_data)
    reply = query.reply()
    reply.header.rcode = rcode
    if question is not None:
        reply.questions[0].qname = question
    for rr in records:
        reply.add_answer(rr)
    return reply.pack()


def resolve(gw: Gateway, now: float, a: list[str], aaaa: list[str], *, cname: str | None = None) -> None:
    queries, gw.lookups.queries = gw.lookups.queries, []
    for query in queries:
        parsed = DNSRecord.parse(query.data)
        name, qtype = str(parsed.q.qname), parsed.q.qtype
        records = []
        owner = name
        if cname:
            records.append(RR(name, QTYPE.CNAME, rdata=CNAME(cname)))
            owner = cname
        for text in (a if qtype == QTYPE.A else aaaa):
            rdata = A(text) if qtype == QTYPE.A else AAAA(text)
            records.append(RR(owner, qtype, rdata=rdata))
        gw.handle_lookup_reply(answer(query.data, *records), SERVER, now)


def statuses(gw: Gateway) -> list[tuple[str, DomainStatus]]:
    out, gw.to_peers = gw.to_peers, []
    return [(peer, control.decode(packet)) for peer, packet in out]


def activate(gw: Gateway, domain: str = "app.corp.test", proxies=(P4, P6), a=("10.97.1.20",),
             aaaa=("fd97:1::20",)) -> None:
    gw.handle_control(PEER, assigned(domain, *proxies), 0.0)
    resolve(gw, 0.1, list(a), list(aaaa))
    assert statuses(gw) == [(PEER, DomainStatus(RID, domain, NatStatus.ACTIVE))]


def test_assigned_ips_resolve_then_active_and_traffic_flows_both_ways() -> None:
    gw = make()
    gw.handle_control(PEER, assigned("app.corp.test", P4, P6), 0.0)
    kinds = sorted(DNSRecord.parse(q.data).q.qtype for q in gw.lookups.queries)
    assert kinds == [QTYPE.A, QTYPE.AAAA] and all(q.server == SERVER for q in gw.lookups.queries)
    assert gw.to_peers == []  # no status before the lookup ends
    resolve(gw, 0.1, ["10.97.1.20"], ["fd97:1::20"])
    assert statuses(gw) == [(PEER, DomainStatus(RID, "app.corp.test", NatStatus.ACTIVE))]
    for client, proxy, real in ((C4, P4, "10.97.1.20"), (C6, P6, "fd97:1::20")):
        gw.handle_from_peer(PEER, g.tcp(client, proxy, 40000, 80, g.SYN), 1.0)
        sent = gw.to_tun.pop()
        assert g.addr(sent, "dst") == real and g.verify(sent)
        back = gw.handle_from_tun(g.tcp(real, client, 80, 40000, g.SYN | g.ACK), 1.1)
        assert g.addr(back, "src") == proxy and g.verify(back)


def test_round_robin_over_the_answers() -> None:
    gw = make()
    activate(gw, proxies=(P4, P4B, "100.96.0.3"), a=("10.97.1.20", "10.97.1.21"), aaaa=())
    reals = []
    for proxy in (P4, P4B, "100.96.0.3"):
        gw.handle_from_peer(PEER, g.udp(C4, proxy, 5000, 53), 1.0)
        reals.append(g.addr(gw.to_tun.pop(), "dst"))
    assert reals == ["10.97.1.20", "10.97.1.21", "10.97.1.20"]


def test_name_not_served_is_inactive_at_once() -> None:
    gw = make()
    gw.handle_control(PEER, assigned("other.test", P4), 0.0)
    assert gw.lookups.queries == []
    assert statuses(gw) == [(PEER, DomainStatus(RID, "other.test", NatStatus.INACTIVE))]


@pytest.mark.parametrize("how", ["nxdomain", "empty", "timeout"])
def test_name_that_does_not_resolve_is_inactive(how: str) -> None:
    gw = make()
    gw.handle_control(PEER, assigned("gone.corp.test", P4, P6), 0.0)
    if how == "timeout":
        gw.lookups.queries.clear()
        gw.handle_timer(LOOKUP_TIMEOUT - 0.01)
        assert gw.to_peers == []
        gw.handle_timer(LOOKUP_TIMEOUT)
    elif how == "empty":
        resolve(gw, 0.1, [], [])
    else:
        for query in gw.lookups.queries:
            gw.handle_lookup_reply(answer(query.data, rcode=RCODE.NXDOMAIN), SERVER, 0.1)
    assert statuses(gw) == [(PEER, DomainStatus(RID, "gone.corp.test", NatStatus.INACTIVE))]
    gw.handle_from_peer(PEER, g.tcp(C4, P4, 40000, 80, g.SYN), 1.0)
    assert gw.to_tun == [] and gw.drops[D.NAT_NO_MAPPING] == 1


def test_unmapped_proxy_gets_prohibited_unreachable() -> None:
    gw = make()  # e.g. just restarted: knows nothing
    syn = g.tcp(C4, P4, 40000, 80, g.SYN)
    gw.handle_from_peer(PEER, syn, 1.0)
    error = gw.to_tunnel.pop()
    assert is_prohibited(error) and g.verify(error)
    assert g.addr(error, "src") == P4 and g.addr(error, "dst") == C4
    assert icmp_error_quote(error)[0].dst == ip_address(P4).packed


def test_family_the_name_lacks_is_unreachable() -> None:
    gw = make()
    activate(gw, a=("10.97.1.20",), aaaa=())
    gw.handle_from_peer(PEER, g.udp(C6, P6, 5000, 53), 1.0)
    assert gw.to_tun == [] and len(gw.to_tunnel) == 1


def test_another_peer_cannot_use_a_mapping() -> None:
    gw = make()
    activate(gw)
    gw.handle_from_peer("peerB", g.udp("100.64.0.3", P4, 5000, 53), 1.0)
    assert gw.to_tun == [] and gw.drops[D.NAT_NO_MAPPING] == 1


def test_cname_chain_is_followed_and_other_owners_ignored() -> None:
    gw = make()
    gw.handle_control(PEER, assigned("app.corp.test", P4), 0.0)
    queries, gw.lookups.queries = gw.lookups.queries, []
    for query in queries:
        parsed = DNSRecord.parse(query.data)
        records = [RR("unrelated.test", QTYPE.A, rdata=A("6.6.6.6"))]
        if parsed.q.qtype == QTYPE.A:
            records += [RR("app.corp.test", QTYPE.CNAME, rdata=CNAME("web.corp.test")),
                        RR("web.corp.test", QTYPE.A, rdata=A("10.97.1.30"))]
        gw.handle_lookup_reply(answer(query.data, *records), SERVER, 0.1)
    assert statuses(gw)[0][1].status == NatStatus.ACTIVE
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 1.0)
    assert g.addr(gw.to_tun.pop(), "dst") == "10.97.1.30"


def test_forged_answers_are_dropped_and_counted() -> None:
    gw = make()
    gw.handle_control(PEER, assigned("app.corp.test", P4), 0.0)
    queries = list(gw.lookups.queries)
    gw.lookups.queries.clear()
    a_query = next(q for q in queries if DNSRecord.parse(q.data).q.qtype == QTYPE.A)
    evil = RR("app.corp.test", QTYPE.A, rdata=A("6.6.6.6"))
    gw.handle_lookup_reply(answer(a_query.data, evil), ("10.97.1.10", 5353), 0.1)  # wrong port
    gw.handle_lookup_reply(answer(a_query.data, evil), ("10.97.1.11", 53), 0.1)  # wrong address
    gw.handle_lookup_reply(answer(a_query.data, evil, question="evil.corp.test"), SERVER, 0.1)
    wrong_id = bytearray(answer(a_query.data, evil))
    wrong_id[0] ^= 0xFF
    gw.handle_lookup_reply(bytes(wrong_id), SERVER, 0.1)
    gw.handle_lookup_reply(b"\x00", SERVER, 0.1)
    assert gw.lookups.drops[D.DNS_UPSTREAM_MISMATCH] == 5
    assert gw.to_peers == [] and all(gw.lookups.is_pending(q.query_id) for q in queries)
    gw.lookups.queries = queries
    resolve(gw, 0.2, ["10.97.1.20"], [])
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 1.0)
    assert g.addr(gw.to_tun.pop(), "dst") == "10.97.1.20"


def test_lookups_are_joined_and_bounded() -> None:
    lookups = Lookups(SERVER, rng=random.Random(1), max_in_flight=2)
    lookups.lookup("a.test", 0.0)
    lookups.lookup("a.test", 0.0)
    assert len(lookups.queries) == 2 and lookups.in_flight == 1
    lookups.lookup("b.test", 0.0)
    lookups.lookup("c.test", 0.0)
    assert lookups.results == [("c.test", None)] and lookups.stats["lookup_too_many_in_flight"] == 1
    ids = [q.query_id for q in lookups.queries]
    assert len(set(ids)) == len(ids) == 4


def test_proxy_given_to_another_name_ends_its_sessions() -> None:
    gw = make()
    activate(gw)
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 1.0)
    assert len(gw.nat) == 1
    gw.handle_control(PEER, assigned("db.internal.test", P4), 2.0)
    assert len(gw.nat) == 0
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 2.0)
    assert gw.to_tunnel  # unmapped until db.internal.test resolves


def test_goodbye_forgets_the_peer() -> None:
    gw = make()
    activate(gw)
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 1.0)
    gw.to_tun.clear()
    gw.handle_control(PEER, control.encode(Goodbye()), 2.0)
    assert len(gw.nat) == 0
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 2.0)
    assert gw.to_tun == [] and gw.to_tunnel


def test_peers_removed_from_the_config_are_forgotten() -> None:
    gw = make()
    activate(gw)
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 1.0)
    gw.keep_only({PEER, "other"})
    assert len(gw.nat) == 1
    gw.keep_only({"other"})
    assert len(gw.nat) == 0
    gw.to_tun.clear()
    gw.handle_from_peer(PEER, g.udp(C4, P4, 5000, 53), 2.0)
    assert gw.to_tun == [] and gw.to_tunnel


def test_names_per_peer_are_bounded() -> None:
    gw = Gateway(["*.corp.test"], Lookups(SERVER, rng=random.Random(7)), max_names_per_peer=2)
    activate(gw, "a.corp.test", proxies=("100.96.0.1",), aaaa=())
    activate(gw, "b.corp.test", proxies=("100.96.0.2",), aaaa=())
    activate(gw, "c.corp.test", proxies=("100.96.0.3",), aaaa=())
    gw.handle_from_peer(PEER, g.udp(C4, "100.96.0.1", 5000, 53), 1.0)
    assert gw.to_tun == [] and gw.stats["names_evicted"] == 1
    gw.handle_from_peer(PEER, g.udp(C4, "100.96.0.3", 5000, 53), 1.0)
    assert len(gw.to_tun) == 1


@pytest.mark.parametrize("packet,reason", [
    (assigned("app.corp.test", "10.0.0.1"), D.CONTROL_MALFORMED),  # not a proxy address
    (control.encode(DomainStatus(RID, "app.corp.test", NatStatus.ACTIVE)), D.CONTROL_UNEXPECTED),
    (b"\x60" + bytes(50), D.CONTROL_MALFORMED),
])
def test_bad_control_packets_are_counted_drops(packet: bytes, reason: D) -> None:
    gw = make()
    gw.handle_control(PEER, packet, 0.0)
    assert gw.drops[reason] == 1 and gw.to_peers == [] and gw.lookups.queries == []


# ------------------------------------------------------------------------------- fuzzing


def snapshot(gw: Gateway) -> tuple:
    peers = {k: (list(v.names.items()), dict(v.domain_of), dict(v.real_of), set(v.clients))
             for k, v in gw._peers.items()}
    nat = sorted((s.inside, s.outside, s.last_incoming) for s in gw.nat.sessions())
    return copy.deepcopy(peers), nat, gw.lookups.in_flight, list(gw.to_tun), list(gw.to_peers)


@FUZZ
@given(st.integers(0, 300), st.integers(0, 255), st.binary(max_size=80))
def test_fuzz_control_packets_change_nothing_unless_valid(position: int, value: int, tail: bytes) -> None:
    gw = make()
    activate(gw)
    before = snapshot(gw)
    packet = bytearray(assigned("app.corp.test", P4, P6))
    packet[position % len(packet)] = value
    packet = bytes(packet) + (tail if value % 3 == 0 else b"")
    event = control.decode(packet)
    gw.handle_control(PEER, packet, 1.0)
    valid = isinstance(event, AssignedIps) and all(
        ip.packed[0] in (100, 0xFD) for ip in event.proxy_ips) and gw.drops.total() == 0
    if not valid:
        assert snapshot(gw) == before and gw.drops.total() == 1


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_packets_from_peer_and_tun_never_raise(data: bytes) -> None:
    gw = make()
    activate(gw)
    before = snapshot(gw)
    gw.handle_from_peer(PEER, data, 1.0)
    if not gw.to_tun:  # not a packet to a mapped proxy address: nothing changed
        assert snapshot(gw)[:3] == before[:3]
    before = snapshot(gw)
    if gw.handle_from_tun(data, 2.0) is None:  # no session's reply: nothing changed
        assert snapshot(gw) == before


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([SERVER, ("10.97.1.10", 5353), ("10.97.1.11", 53), None]),
       st.booleans())
def test_fuzz_lookup_answers_change_nothing_unless_genuine(data: bytes, source, with_live_id: bool) -> None:
    lookups = Lookups(SERVER, rng=random.Random(3))
    lookups.lookup("app.corp.test", 0.0)
    ids = sorted(q.query_id for q in lookups.queries)
    if with_live_id and len(data) >= 2:
        data = ids[0].to_bytes(2, "big") + data[2:]
    lookups.handle_reply(data, source, 1.0)
    if all(lookups.is_pending(i) for i in ids):
        assert lookups.results == [] and lookups.drops[D.DNS_UPSTREAM_MISMATCH] == 1
    else:  # only a well-formed answer to the question, from the server, ends a query
        assert source == SERVER
        reply = DNSRecord.parse(data)
        assert reply.header.qr and str(reply.q.qname).rstrip(".").lower() == "app.corp.test"
