"""The client's per-name state toward gateways (fzpoll.gateway.client), with a fake clock."""

from __future__ import annotations

import copy
from ipaddress import ip_address

from hypothesis import given, settings
from hypothesis import strategies as st

import gwpackets as g
from fzpoll.errors import DropReason as D
from fzpoll.gateway import control
from fzpoll.gateway.client import MAX_BUFFERED_PER_NAME, RESEND_AFTER_QUERY, RESEND_INTERVAL, ResourceClient
from fzpoll.gateway.control import AssignedIps, DomainStatus, NatStatus, resource_id
from fzpoll.gateway.packet import destination_unreachable, icmp_error_quote, is_prohibited

FUZZ = settings(max_examples=200, deadline=None, derandomize=True)
PEER, PATTERN = "gw", "*.corp.test"
RID = resource_id(PATTERN)
C4, P4, P6 = "100.64.0.2", "100.96.0.1", "fd00:2021:1111:8000::1"
PROXIES = (ip_address(P4), ip_address(P6))


def started(now: float = 0.0) -> ResourceClient:
    client = ResourceClient()
    client.on_query("app.corp.test", PATTERN, PEER, PROXIES, now)
    return client


def sent(client: ResourceClient) -> list:
    out, client.to_peers = client.to_peers, []
    return [(peer, control.decode(packet)) for peer, packet in out]


def status(value: NatStatus, domain: str = "app.corp.test", rid: str = RID) -> bytes:
    return control.encode(DomainStatus(rid, domain, value))


def test_first_query_sends_assigned_ips_and_holds_packets_until_active() -> None:
    client = started()
    assert sent(client) == [(PEER, AssignedIps(RID, "app.corp.test", PROXIES))]
    packets = [g.tcp(C4, P4, 40000, 80, g.SYN, seq=i) for i in range(3)]
    for packet in packets:
        assert client.handle_outgoing(packet, ip_address(P4).packed, 0.1) is None
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.2)
    assert client.to_tunnel == packets and client.status("app.corp.test") == NatStatus.ACTIVE
    later = g.tcp(C4, P4, 40000, 80, g.ACK)
    assert client.handle_outgoing(later, ip_address(P4).packed, 0.3) == later


def test_resent_every_2_s_until_active_and_on_every_query() -> None:
    client = started()
    sent(client)
    assert client.next_deadline() == RESEND_INTERVAL
    client.handle_timer(RESEND_INTERVAL - 0.01)
    assert sent(client) == []
    client.handle_timer(RESEND_INTERVAL)
    assert len(sent(client)) == 1 and client.next_deadline() == 2 * RESEND_INTERVAL
    client.handle_control(PEER, status(NatStatus.ACTIVE), 4.1)
    assert client.next_deadline() is None
    client.on_query("app.corp.test", PATTERN, PEER, PROXIES, 10.0)
    assert len(sent(client)) == 1 and client.next_deadline() is None  # active: no repeats


def test_a_burst_of_queries_sends_one_assigned_ips_a_second() -> None:
    client = started()
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.1)
    sent(client)
    for i in range(90):
        client.on_query("app.corp.test", PATTERN, PEER, PROXIES, 0.1 + i * 0.01)
    assert sent(client) == []  # within a second of the first
    client.on_query("app.corp.test", PATTERN, PEER, PROXIES, 1.0)
    assert len(sent(client)) == 1


def test_repeats_stop_when_nothing_waits() -> None:
    client = started()
    for step in range(1, 40):
        client.handle_timer(step * RESEND_INTERVAL)
    assert client.next_deadline() is None
    assert client.stats["assigned_ips_resent"] == RESEND_AFTER_QUERY / RESEND_INTERVAL - 1
    sent(client)
    client.handle_outgoing(g.udp(C4, P4, 1, 2), ip_address(P4).packed, 100.0)  # something waits again
    assert len(sent(client)) == 1 and client.next_deadline() == 100.0 + RESEND_INTERVAL


def test_buffer_is_bounded() -> None:
    client = started()
    for i in range(MAX_BUFFERED_PER_NAME + 5):
        client.handle_outgoing(g.udp(C4, P4, i, 53), ip_address(P4).packed, 0.1)
    assert client.drops[D.RESOURCE_BUFFER_FULL] == 5
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.2)
    assert len(client.to_tunnel) == MAX_BUFFERED_PER_NAME


def test_inactive_answers_held_and_later_packets_with_unreachable() -> None:
    client = started()
    held = g.tcp(C4, P4, 40000, 80, g.SYN)
    client.handle_outgoing(held, ip_address(P4).packed, 0.1)
    client.handle_control(PEER, status(NatStatus.INACTIVE), 0.2)
    assert client.to_tunnel == []
    error = client.to_tun.pop()
    assert g.verify(error) and g.addr(error, "src") == P4 and g.addr(error, "dst") == C4
    assert not is_prohibited(error) and icmp_error_quote(error)[0].src_port == 40000
    client.handle_outgoing(g.udp(C4, P4, 5, 53), ip_address(P4).packed, 0.3)
    assert len(client.to_tun) == 1
    client.on_query("app.corp.test", PATTERN, PEER, PROXIES, 1.0)  # asks again: pending
    assert client.status("app.corp.test") is None and len(sent(client)) == 2


def test_gateway_that_lost_the_mapping_is_told_again() -> None:
    client = started()
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.2)
    sent(client)
    syn = g.tcp(C4, P4, 40000, 80, g.SYN)
    error = destination_unreachable(syn, ip_address(P4).packed, prohibited=True)
    assert client.handle_incoming(error, 5.0) is True
    assert sent(client) == [(PEER, AssignedIps(RID, "app.corp.test", PROXIES))]
    assert client.handle_outgoing(syn, ip_address(P4).packed, 5.5) is None  # held again
    client.handle_control(PEER, status(NatStatus.ACTIVE), 5.6)
    assert client.to_tunnel == [syn]


def test_other_errors_and_packets_are_delivered() -> None:
    client = started()
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.2)
    syn = g.tcp(C4, P4, 40000, 80, g.SYN)
    assert client.handle_incoming(destination_unreachable(syn, ip_address(P4).packed), 1.0) is False
    other = destination_unreachable(g.tcp(C4, "100.96.9.9", 1, 80, g.SYN), ip_address("100.96.9.9").packed,
                                    prohibited=True)
    assert client.handle_incoming(other, 1.0) is False
    assert client.handle_incoming(g.udp(P4, C4, 80, 40000), 1.0) is False


def test_unexpected_status_is_a_counted_drop() -> None:
    client = started()
    client.handle_control("someone-else", status(NatStatus.ACTIVE), 0.1)
    client.handle_control(PEER, status(NatStatus.ACTIVE, domain="other.corp.test"), 0.1)
    client.handle_control(PEER, status(NatStatus.ACTIVE, rid=resource_id("*.x.test")), 0.1)
    client.handle_control(PEER, control.encode(AssignedIps(RID, "app.corp.test", PROXIES)), 0.1)
    assert client.drops[D.CONTROL_UNEXPECTED] == 4 and client.status("app.corp.test") is None


def test_non_proxy_addresses_pass() -> None:
    client = started()
    packet = g.udp(C4, "100.64.0.1", 1, 2)
    assert client.handle_outgoing(packet, bytes([100, 64, 0, 1]), 0.1) == packet


def snapshot(client: ResourceClient) -> tuple:
    return copy.deepcopy(({k: (v.status, v.resend_at, list(v.held)) for k, v in client._names.items()},
                          client.to_tunnel, client.to_tun, client.to_peers))


@FUZZ
@given(st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_status_changes_nothing_unless_valid(position: int, value: int) -> None:
    client = started()
    client.handle_outgoing(g.udp(C4, P4, 1, 53), ip_address(P4).packed, 0.1)
    before = snapshot(client)
    packet = bytearray(status(NatStatus.ACTIVE))
    packet[position % len(packet)] = value
    event = control.decode(bytes(packet))
    client.handle_control(PEER, bytes(packet), 0.2)
    if not (isinstance(event, DomainStatus) and event.domain == "app.corp.test" and event.resource == RID):
        assert snapshot(client) == before and client.drops.total() == 1


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_incoming_bytes(data: bytes) -> None:
    client = started()
    client.handle_control(PEER, status(NatStatus.ACTIVE), 0.2)
    sent(client)
    before = snapshot(client)
    if client.handle_incoming(data, 1.0) is False:
        assert snapshot(client) == before
