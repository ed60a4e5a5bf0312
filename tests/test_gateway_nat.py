"""The gateway's packet rewriting and NAT table (fzpoll.gateway.packet, fzpoll.gateway.nat),
with a fake clock: translation both ways for TCP/UDP/ICMP over IPv4 and IPv6 with checksums
verified by an independent implementation, ICMP errors, lifetimes, bounds, and fuzzing."""

from __future__ import annotations

import random
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gwpackets as g
from fzpoll.errors import DropReason as D
from fzpoll.gateway.nat import FIN_LINGER, TCP_TTL, UDP_TTL, UNCONFIRMED_TTL, NatTable
from fzpoll.gateway.packet import (
    apply_rewrite,
    checksums_ok,
    compile_rewrite,
    destination_unreachable,
    icmp_error_quote,
    parse_flow,
    rewrite,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
C4, P4, R4, P4B = "100.64.0.2", "100.96.0.1", "10.97.1.20", "100.96.0.2"
C6, P6, R6 = "fd00:2021:1111::2", "fd00:2021:1111:8000::1", "fd97:1::20"


def packed(text: str) -> bytes:
    return ip_address(text).packed


def out(nat: NatTable, packet: bytes, real: str, now: float = 0.0) -> bytes | None:
    flow = parse_flow(packet)
    assert flow is not None
    return nat.outgoing(packet, flow, packed(real), now)


CASES = [
    ("udp4", lambda s, d, sp, dp: g.udp(s, d, sp, dp, b"query"), C4, P4, R4),
    ("tcp4", lambda s, d, sp, dp: g.tcp(s, d, sp, dp, g.SYN), C4, P4, R4),
    ("udp6", lambda s, d, sp, dp: g.udp(s, d, sp, dp, b"query"), C6, P6, R6),
    ("tcp6", lambda s, d, sp, dp: g.tcp(s, d, sp, dp, g.ACK, b"data"), C6, P6, R6),
]


@pytest.mark.parametrize("name,make,client,proxy,real", CASES, ids=[c[0] for c in CASES])
def test_translation_both_ways(name, make, client, proxy, real) -> None:
    nat = NatTable()
    sent = out(nat, make(client, proxy, 40000, 80), real)
    assert sent is not None and g.verify(sent) and checksums_ok(sent)
    assert (g.addr(sent, "src"), g.addr(sent, "dst"), g.ports(sent)) == (client, real, (40000, 80))
    back = nat.incoming(make(real, client, 80, 40000), 1.0)
    assert back is not None and g.verify(back)
    assert (g.addr(back, "src"), g.addr(back, "dst"), g.ports(back)) == (proxy, client, (80, 40000))


@pytest.mark.parametrize("client,proxy,real", [(C4, P4, R4), (C6, P6, R6)])
def test_icmp_echo_keyed_by_identifier(client, proxy, real) -> None:
    nat = NatTable()
    sent = out(nat, g.echo(client, proxy, ident=0x1234, seq=7), real)
    assert sent is not None and g.verify(sent) and g.addr(sent, "dst") == real
    back = nat.incoming(g.echo(real, client, ident=0x1234, seq=7, reply=True), 0.5)
    assert back is not None and g.verify(back)
    assert g.addr(back, "src") == proxy and back[-6:] == g.echo(real, client, 0x1234, 7, True)[-6:]
    assert nat.incoming(g.echo(real, client, ident=0x9999, seq=7, reply=True), 0.5) is None


def test_two_names_on_one_address_get_distinct_ports() -> None:
    nat = NatTable()
    a = out(nat, g.udp(C4, P4, 5000, 53), R4)
    b = out(nat, g.udp(C4, P4B, 5000, 53), R4)
    assert g.ports(a) == (5000, 53) and g.ports(b) == (5001, 53)
    assert g.addr(nat.incoming(g.udp(R4, C4, 53, 5000), 1), "src") == P4
    back_b = nat.incoming(g.udp(R4, C4, 53, 5001), 1)
    assert g.addr(back_b, "src") == P4B and g.ports(back_b) == (53, 5000) and g.verify(back_b)


def test_port_wraps_around() -> None:
    nat = NatTable()
    out(nat, g.udp(C4, P4, 65535, 53), R4)
    assert g.ports(out(nat, g.udp(C4, P4B, 65535, 53), R4)) == (0, 53)


def test_zero_udp_checksum_stays_none() -> None:
    packet = bytearray(g.udp(C4, P4, 1000, 53))
    packet[26:28] = b"\x00\x00"
    sent = out(NatTable(), bytes(packet), R4)
    assert sent[26:28] == b"\x00\x00" and g.verify(sent)


def test_corrupt_packet_stays_corrupt() -> None:
    packet = bytearray(g.udp(C4, P4, 1000, 53, b"abcd"))
    packet[-1] ^= 0xFF
    assert not g.verify(out(NatTable(), bytes(packet), R4))


def test_unrelated_reply_passes_untouched() -> None:
    nat = NatTable()
    out(nat, g.udp(C4, P4, 1000, 53), R4)
    assert nat.incoming(g.udp(R4, C4, 53, 1001), 1) is None
    assert nat.incoming(g.udp("10.97.1.21", C4, 53, 1000), 1) is None
    assert nat.incoming(g.tcp(R4, C4, 53, 1000), 1) is None


def test_cross_family_is_no_mapping() -> None:
    nat = NatTable()
    assert out(nat, g.udp(C4, P4, 1000, 53), R6) is None
    assert nat.drops[D.NAT_NO_MAPPING] == 1 and len(nat) == 0


# ------------------------------------------------------------------------------- ICMP errors


@pytest.mark.parametrize("client,proxy,real,kind,code", [(C4, P4, R4, 3, 3), (C6, P6, R6, 1, 4)])
def test_icmp_error_from_far_side_is_translated_back(client, proxy, real, kind, code) -> None:
    nat = NatTable()
    sent = out(nat, g.udp(client, P4 if ":" not in client else proxy, 40000, 9), real)
    error = g.icmp_error(real, client, kind, code, sent)
    back = nat.incoming(error, 1.0)
    assert back is not None and g.verify(back)
    assert g.addr(back, "src") == proxy and g.addr(back, "dst") == client
    quote_at = icmp_error_quote(back)[1]
    quote = back[quote_at:]
    assert g.addr(quote, "dst") == proxy and g.ports(quote) == (40000, 9)
    assert g.verify(quote)  # the quote was complete: its checksums are right again


def test_icmp_error_from_a_router_quoting_a_truncated_tcp_packet() -> None:
    nat = NatTable()
    out(nat, g.tcp(C4, P4, 40000, 80, g.SYN), R4)
    translated = out(nat, g.tcp(C4, P4, 40000, 80, g.ACK, b"x" * 100), R4)
    error = g.icmp_error("10.97.0.1", C4, 11, 0, translated[:28])  # time exceeded, 8 bytes of TCP
    back = nat.incoming(error, 1.0)
    assert back is not None and g.verify(back) and g.addr(back, "src") == P4
    quote = back[28:]
    assert g.addr(quote, "dst") == P4 and g.naive_checksum(quote[:20]) == 0


def test_icmp_error_about_unknown_flow_or_for_someone_else_passes() -> None:
    nat = NatTable()
    sent = out(nat, g.udp(C4, P4, 40000, 9), R4)
    assert nat.incoming(g.icmp_error(R4, "100.64.0.9", 3, 3, sent), 1) is None
    assert nat.incoming(g.icmp_error(R4, C4, 3, 3, g.udp(C4, R4, 1, 9)), 1) is None


@pytest.mark.parametrize("client,proxy", [(C4, P4), (C6, P6)])
def test_destination_unreachable_built_by_us(client, proxy) -> None:
    packet = g.tcp(client, proxy, 40000, 80, g.SYN)
    error = destination_unreachable(packet, packed(proxy))
    assert error is not None and g.verify(error)
    assert g.addr(error, "src") == proxy and g.addr(error, "dst") == client
    assert icmp_error_quote(error)[0] == parse_flow(packet)
    assert destination_unreachable(error, packed(proxy)) is None  # never an error about an error
    assert destination_unreachable(packet, packed(P6 if client == C4 else P4)) is None
    assert destination_unreachable(g.echo(client, proxy, 1), packed(proxy)) is not None


def test_destination_unreachable_quote_is_bounded() -> None:
    error = destination_unreachable(g.udp(C4, P4, 1, 2, b"x" * 1400), packed(P4))
    assert len(error) == 576 and g.verify(error)
    error6 = destination_unreachable(g.udp(C6, P6, 1, 2, b"x" * 1400), packed(P6))
    assert len(error6) == 1280 and g.verify(error6)


# ------------------------------------------------------------------------------- lifetimes


def alive(nat: NatTable, now: float, reply: bytes) -> bool:
    nat.handle_timer(now)
    return nat.incoming(reply, now) is not None


def test_unconfirmed_udp_lives_60_s() -> None:
    nat = NatTable()
    out(nat, g.udp(C4, P4, 1000, 53), R4, now=0.0)
    assert nat.next_deadline() == UNCONFIRMED_TTL
    nat.handle_timer(UNCONFIRMED_TTL - 0.001)
    assert len(nat) == 1
    nat.handle_timer(UNCONFIRMED_TTL)
    assert len(nat) == 0 and nat.next_deadline() is None


def test_confirmed_udp_lives_2_min_after_its_last_packet() -> None:
    nat = NatTable()
    reply = g.udp(R4, C4, 53, 1000)
    out(nat, g.udp(C4, P4, 1000, 53), R4, now=0.0)
    assert alive(nat, 10.0, reply)
    nat.handle_timer(UNCONFIRMED_TTL + 1)
    assert len(nat) == 1
    nat.handle_timer(10.0 + UDP_TTL - 0.001)
    assert len(nat) == 1
    assert not alive(nat, 10.0 + UDP_TTL, reply)


def test_tcp_lives_2_hours_and_activity_extends_it() -> None:
    nat = NatTable()
    reply = g.tcp(R4, C4, 80, 1000)
    out(nat, g.tcp(C4, P4, 1000, 80, g.SYN), R4, now=0.0)
    assert alive(nat, 1.0, reply)
    out(nat, g.tcp(C4, P4, 1000, 80), R4, now=3600.0)
    nat.handle_timer(1.0 + TCP_TTL)
    assert len(nat) == 1
    assert not alive(nat, 3600.0 + TCP_TTL, reply)


def test_fin_both_ways_linger_5_s() -> None:
    nat = NatTable()
    out(nat, g.tcp(C4, P4, 1000, 80, g.SYN), R4, now=0.0)
    assert nat.incoming(g.tcp(R4, C4, 80, 1000, g.SYN | g.ACK), 1.0)
    out(nat, g.tcp(C4, P4, 1000, 80, g.FIN | g.ACK), R4, now=2.0)
    nat.handle_timer(100.0)
    assert len(nat) == 1  # one FIN only: still open
    assert nat.incoming(g.tcp(R4, C4, 80, 1000, g.FIN | g.ACK), 101.0)
    assert nat.next_deadline() == 101.0 + FIN_LINGER
    assert out(nat, g.tcp(C4, P4, 1000, 80, g.ACK), R4, now=101.5) is not None
    nat.handle_timer(101.5 + FIN_LINGER)
    assert len(nat) == 0


@pytest.mark.parametrize("from_far_side", [False, True])
def test_rst_closes_at_once(from_far_side) -> None:
    nat = NatTable()
    out(nat, g.tcp(C4, P4, 1000, 80, g.SYN), R4, now=0.0)
    if from_far_side:
        assert nat.incoming(g.tcp(R4, C4, 80, 1000, g.RST), 1.0) is not None
    else:
        assert out(nat, g.tcp(C4, P4, 1000, 80, g.RST), R4, now=1.0) is not None
    nat.handle_timer(1.0)
    assert len(nat) == 0


def test_table_is_bounded() -> None:
    nat = NatTable(max_sessions=3)
    for port in range(3):
        assert out(nat, g.udp(C4, P4, port, 53), R4) is not None
    assert out(nat, g.udp(C4, P4, 99, 53), R4) is None
    assert nat.drops[D.NAT_TABLE_FULL] == 1 and len(nat) == 3
    assert out(nat, g.udp(C4, P4, 1, 53), R4) is not None  # existing sessions still flow


def test_open_session_keeps_its_address_and_forget_ends_it() -> None:
    nat = NatTable()
    out(nat, g.udp(C4, P4, 1000, 53), R4)
    assert g.addr(out(nat, g.udp(C4, P4, 1000, 53), "10.97.1.21"), "dst") == R4
    assert nat.forget({packed(C4)}, packed(P4B)) == 0
    assert nat.forget({packed(C4)}, packed(P4)) == 1
    assert g.addr(out(nat, g.udp(C4, P4, 1000, 53), "10.97.1.21"), "dst") == "10.97.1.21"


def test_many_sessions_expire_in_order() -> None:
    nat = NatTable()
    rng = random.Random(3)
    starts = {}
    for port in range(200):
        t = rng.uniform(0, 50)
        out(nat, g.udp(C4, P4, port, 53), R4, now=t)
        starts[port] = t
    for now in range(0, 120, 5):
        nat.handle_timer(float(now))
        assert len(nat) == sum(1 for t in starts.values() if t + UNCONFIRMED_TTL > now)


# ------------------------------------------------------------------------------- fuzzing


def snapshot(nat: NatTable) -> tuple:
    state = sorted((s.inside, s.outside, s.last_outgoing, s.last_incoming, s.fin_out, s.fin_in, s.rst)
                   for s in nat.sessions())
    return state, dict(nat.drops), nat.next_deadline()


def populated() -> NatTable:
    nat = NatTable()
    out(nat, g.udp(C4, P4, 1000, 53), R4)
    out(nat, g.tcp(C6, P6, 2000, 80, g.SYN), R6)
    out(nat, g.echo(C4, P4, 7), R4)
    return nat


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_change_nothing(data: bytes) -> None:
    nat = populated()
    before = snapshot(nat)
    result = nat.incoming(data, 5.0)
    assert result is None or isinstance(result, bytes)
    if result is None:
        assert snapshot(nat) == before
    assert parse_flow(data) is None or isinstance(parse_flow(data).src, bytes)


REPLIES = [g.udp(R4, C4, 53, 1000), g.tcp(R6, C6, 80, 2000, g.ACK, b"hi"), g.echo(R4, C4, 7, reply=True),
           g.icmp_error(R4, C4, 3, 3, g.udp(C4, R4, 1000, 53))]


@FUZZ
@given(st.sampled_from(range(len(REPLIES))), st.integers(0, 120), st.integers(0, 255), st.integers(0, 60))
def test_fuzz_mutated_replies(which: int, position: int, value: int, cut: int) -> None:
    nat = populated()
    before = snapshot(nat)
    packet = bytearray(REPLIES[which])
    packet[position % len(packet)] = value
    packet = bytes(packet[: len(packet) - cut % len(packet)])
    result = nat.incoming(packet, 5.0)
    if result is None:
        assert snapshot(nat) == before
    else:
        assert len(result) == len(packet)


@FUZZ
@given(st.binary(max_size=120), st.binary(min_size=4, max_size=4))
def test_fuzz_rewrite_of_whatever_parses_keeps_checksums(data: bytes, new: bytes) -> None:
    flow = parse_flow(data)
    if flow is None or flow.version != 4 or not checksums_ok(data):
        return
    assert checksums_ok(rewrite(data, dst=new, src_port=flow.src_port ^ 0x5A5A))


@FUZZ
@given(st.sampled_from(["tcp", "udp", "echo"]), st.booleans(), st.integers(0, 65535), st.integers(0, 65535),
       st.binary(max_size=64), st.binary(min_size=16, max_size=16))
def test_fuzz_rewrite_keeps_checksums(kind: str, v6: bool, sport: int, dport: int, payload: bytes,
                                      new: bytes) -> None:
    src, dst = (C6, P6) if v6 else (C4, P4)
    packet = {"tcp": lambda: g.tcp(src, dst, sport, dport, g.ACK, payload),
              "udp": lambda: g.udp(src, dst, sport, dport, payload),
              "echo": lambda: g.echo(src, dst, sport, payload=payload)}[kind]()
    new = new if v6 else new[:4]
    translated = rewrite(packet, src=new, dst=new[::-1], src_port=dport, dst_port=sport)
    assert g.verify(translated)


@FUZZ
@given(st.sampled_from(["tcp", "udp", "echo"]), st.booleans(), st.integers(0, 65535), st.integers(0, 65535),
       st.binary(max_size=64), st.binary(min_size=16, max_size=16), st.integers(0, 65535), st.booleans())
def test_fuzz_compiled_rewrite_equals_rewrite(kind: str, v6: bool, sport: int, dport: int, payload: bytes,
                                              new: bytes, port: int, outgoing: bool) -> None:
    """The NAT's per-session compiled rewrite gives exactly the bytes of the general one."""
    src, dst = (C6, P6) if v6 else (C4, P4)
    packet = {"tcp": lambda: g.tcp(src, dst, sport, dport, g.ACK, payload),
              "udp": lambda: g.udp(src, dst, sport, dport, payload),
              "echo": lambda: g.echo(src, dst, sport, payload=payload)}[kind]()
    new = new if v6 else new[:4]
    flow = parse_flow(packet)
    if outgoing:
        compiled = compile_rewrite(flow, dst=new, src_port=port)
        expected = rewrite(packet, dst=new, src_port=port)
    else:
        compiled = compile_rewrite(flow, src=new, dst_port=port)
        expected = rewrite(packet, src=new, dst_port=port)
    assert apply_rewrite(packet, compiled) == expected and g.verify(expected)
