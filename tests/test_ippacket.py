"""Raw IPv4/IPv6 UDP packets: parsing, building, checksums (checked against a naive reference)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fzpoll.errors import LocalError
from fzpoll.ippacket import (
    MAX_UDP_PAYLOAD_V4,
    MAX_UDP_PAYLOAD_V6,
    UdpDatagram,
    build_udp,
    checksum_ok,
    internet_checksum,
    ip_header,
    ones_complement_sum,
    parse_udp,
    udp_checksum,
)

A4, B4 = ip_address("100.64.0.2"), ip_address("100.100.111.1")
A6, B6 = ip_address("fd00:2021:1111::2"), ip_address("fd00:2021:1111:8000:100:100:111:1")


def naive_checksum(data: bytes) -> int:
    """RFC 1071 section 4.1, word by word, with end-around carry."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def naive_udp_checksum(packet: bytes) -> int:
    """The UDP checksum recomputed from scratch (checksum field zeroed), 0 sent as 0xFFFF."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        src, dst, udp = packet[12:16], packet[16:20], packet[ihl:]
        pseudo = src + dst + bytes([0, 17]) + struct.pack("!H", len(udp))
    else:
        src, dst, udp = packet[8:24], packet[24:40], packet[40:]
        pseudo = src + dst + struct.pack("!I", len(udp)) + b"\x00\x00\x00\x11"
    zeroed = udp[:6] + b"\x00\x00" + udp[8:]
    return naive_checksum(pseudo + zeroed) or 0xFFFF


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2, checksum 220d.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D
    assert internet_checksum(data + b"\x22\x0d") == 0


def test_ipv4_header_known_answer():
    # A textbook IPv4 header (192.168.0.1 -> 192.168.0.199, UDP) whose checksum is b861.
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert internet_checksum(header) == 0xB861


def test_checksum_edge_values():
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\x00" * 7) == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0
    assert internet_checksum(b"\x01") == naive_checksum(b"\x01") == 0xFEFF
    assert ones_complement_sum(b"\xff\xff\xff\xff") == 0xFFFF  # a non-zero multiple of 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_matches_naive(data):
    assert internet_checksum(data) == naive_checksum(data)
    assert internet_checksum(bytearray(data)) == naive_checksum(data)


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)])
def test_build_then_parse_round_trip(src, dst):
    packet = build_udp(src, dst, 40000, 53, b"hello dns")
    assert parse_udp(packet) == UdpDatagram(src, dst, 40000, 53, b"hello dns")
    assert checksum_ok(packet)
    header_checksum = packet[10:12] if src.version == 4 else None
    udp_offset = 20 if src.version == 4 else 40
    assert packet[udp_offset + 6:udp_offset + 8] == naive_udp_checksum(packet).to_bytes(2, "big")
    if header_checksum is not None:
        zeroed = packet[:10] + b"\x00\x00" + packet[12:20]
        assert header_checksum == naive_checksum(zeroed).to_bytes(2, "big")


def test_ipv4_header_fields():
    packet = build_udp(A4, B4, 1, 2, b"x" * 11, ttl=7)
    version_ihl, _, total, ident, flags, ttl, proto, _, src, dst = struct.unpack(
        "!BBHHHBBH4s4s", packet[:20]
    )
    assert (version_ihl, total, ident, flags, ttl, proto) == (0x45, 20 + 8 + 11, 0, 0x4000, 7, 17)
    assert (src, dst) == (A4.packed, B4.packed)
    assert struct.unpack("!HHH", packet[20:26]) == (1, 2, 19)


def test_ipv6_header_fields():
    packet = build_udp(A6, B6, 1, 2, b"y" * 5)
    first, plen, nh, hops = struct.unpack("!IHBB", packet[:8])
    assert (first >> 28, plen, nh, hops) == (6, 13, 17, 64)
    assert packet[8:24] == A6.packed and packet[24:40] == B6.packed


@pytest.mark.parametrize("src,dst", [(A4, B4), (A6, B6)])
def test_computed_zero_udp_checksum_is_sent_as_ffff(src, dst):
    # Choose the last payload word so the sum is all ones: the checksum computes to 0.
    base = build_udp(src, dst, 7, 9, b"ab\x00\x00")
    offset = 20 if src.version == 4 else 40
    needed = int.from_bytes(base[offset + 6:offset + 8], "big")
    packet = build_udp(src, dst, 7, 9, b"ab" + needed.to_bytes(2, "big"))
    assert packet[offset + 6:offset + 8] == b"\xff\xff"
    assert checksum_ok(packet)
    segment = packet[offset:offset + 6] + b"\0\0" + packet[offset + 8:]
    assert udp_checksum(src.packed, dst.packed, segment) == 0xFFFF


def test_checksum_ok_detects_corruption():
    for packet in (build_udp(A4, B4, 5, 6, b"payload"), build_udp(A6, B6, 5, 6, b"payload")):
        assert checksum_ok(packet)
        bad = packet[:-1] + bytes([packet[-1] ^ 1])
        assert not checksum_ok(bad)
    v4 = build_udp(A4, B4, 5, 6, b"payload")
    assert not checksum_ok(v4[:8] + bytes([v4[8] ^ 1]) + v4[9:])  # TTL flipped: header sum off


def test_zero_udp_checksum_means_none_in_ipv4_only():
    v4 = build_udp(A4, B4, 5, 6, b"payload")
    v6 = build_udp(A6, B6, 5, 6, b"payload")
    assert checksum_ok(v4[:26] + b"\x00\x00" + v4[28:])
    assert not checksum_ok(v6[:46] + b"\x00\x00" + v6[48:])


def test_build_rejects_local_misuse():
    with pytest.raises(LocalError):
        build_udp(A4, B6, 1, 2, b"")
    with pytest.raises(LocalError):
        build_udp(A4, B4, 1, 70000, b"")
    with pytest.raises(LocalError):
        build_udp(A4, B4, 1, 2, bytes(MAX_UDP_PAYLOAD_V4 + 1))
    with pytest.raises(LocalError):
        build_udp(A6, B6, 1, 2, bytes(MAX_UDP_PAYLOAD_V6 + 1))
    assert len(build_udp(A4, B4, 1, 2, bytes(MAX_UDP_PAYLOAD_V4))) == 0xFFFF
    assert len(build_udp(A6, B6, 1, 2, bytes(MAX_UDP_PAYLOAD_V6))) == 0xFFFF + 40


def test_parse_handles_options_trailing_bytes_and_bytearray():
    packet = build_udp(A4, B4, 10, 53, b"q")
    # Same datagram with a 4-byte IPv4 option (IHL 6).
    with_options = bytes([0x46]) + packet[1:2] + (len(packet) + 4).to_bytes(2, "big") + packet[4:20]
    with_options += b"\x01\x01\x01\x00" + packet[20:]
    assert parse_udp(with_options) == UdpDatagram(A4, B4, 10, 53, b"q")
    assert parse_udp(packet + b"trailing junk") == UdpDatagram(A4, B4, 10, 53, b"q")
    assert parse_udp(bytearray(packet)) == UdpDatagram(A4, B4, 10, 53, b"q")
    assert ip_header(bytearray(packet))[1] == B4.packed


def corrupt_cases():
    v4 = build_udp(A4, B4, 10, 53, b"query")
    v6 = build_udp(A6, B6, 10, 53, b"query")
    return {
        "empty": b"",
        "version 5": bytes([0x55]) + v4[1:],
        "v4 truncated header": v4[:19],
        "v4 ihl 4": bytes([0x44]) + v4[1:],
        "v4 total length beyond data": v4[:2] + (len(v4) + 1).to_bytes(2, "big") + v4[4:],
        "v4 total length below ihl": v4[:2] + (19).to_bytes(2, "big") + v4[4:],
        "v4 more fragments": v4[:6] + b"\x20\x00" + v4[8:],
        "v4 fragment offset": v4[:6] + b"\x00\x10" + v4[8:],
        "v4 tcp": v4[:9] + b"\x06" + v4[10:],
        "v4 no room for udp header": v4[:2] + (27).to_bytes(2, "big") + v4[4:27],
        "v4 udp length 7": v4[:24] + (7).to_bytes(2, "big") + v4[26:],
        "v4 udp length beyond": v4[:24] + (len(v4) - 19).to_bytes(2, "big") + v4[26:],
        "v6 truncated header": v6[:39],
        "v6 payload length beyond data": v6[:4] + (len(v6) - 39).to_bytes(2, "big") + v6[6:],
        "v6 hop-by-hop header": v6[:6] + b"\x00" + v6[7:],
        "v6 udp length beyond": v6[:44] + (len(v6) - 39).to_bytes(2, "big") + v6[46:],
    }


@pytest.mark.parametrize("name", sorted(corrupt_cases()))
def test_parse_rejects_corrupt_packets(name):
    packet = corrupt_cases()[name]
    assert parse_udp(packet) is None
    assert not checksum_ok(packet)


addresses4 = st.integers(0, 2**32 - 1).map(IPv4Address)
addresses6 = st.integers(0, 2**128 - 1).map(IPv6Address)
ports = st.integers(0, 0xFFFF)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.tuples(addresses4, addresses4), st.tuples(addresses6, addresses6)),
    ports, ports, st.binary(max_size=2000),
)
def test_round_trip_property(pair, sport, dport, payload):
    src, dst = pair
    packet = build_udp(src, dst, sport, dport, payload)
    assert parse_udp(packet) == UdpDatagram(src, dst, sport, dport, payload)
    assert checksum_ok(packet)
    offset = 20 if src.version == 4 else 40
    assert int.from_bytes(packet[offset + 6:offset + 8], "big") == naive_udp_checksum(packet)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(data):
    for variant in (data, b"\x45" + data, b"\x60" + data, bytearray(data)):
        ip_header(variant)
        parse_udp(variant)
        checksum_ok(variant)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 80), st.binary(min_size=1, max_size=1))
def test_mutated_packets_never_raise(payload, position, byte):
    for packet in (build_udp(A4, B4, 1, 53, payload), build_udp(A6, B6, 1, 53, payload)):
        position %= len(packet)
        mutated = packet[:position] + byte + packet[position + 1:]
        parsed = parse_udp(mutated)
        checksum_ok(mutated)
        if parsed is not None:
            assert len(parsed.payload) <= len(payload) + 80
