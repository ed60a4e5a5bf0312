"""TUN offloads without a kernel: splitting super-packets and coalescing segments (fzpoll/io/vnet.py).

Every segment is checked on its own as a receiving stack would: IPv4 header checksum, lengths,
TCP/UDP checksum over the pseudo header, sequence numbers, IDs, flags on the last segment only.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from fzpoll.io import vnet
from fzpoll.ippacket import ones_complement_sum

SRC4, DST4 = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
SRC6, DST6 = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed
TS_OPTION = bytes([1, 1, 8, 10]) + bytes(range(8))  # NOP NOP timestamps: a 32-byte TCP header


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo(version: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    if version == 4:
        return ones_complement_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return ones_complement_sum(src + dst + struct.pack("!IxxxB", length, proto))


def ip_packet(version: int, proto: int, transport: bytes, ident: int = 0x1234, ttl: int = 64) -> bytes:
    if version == 4:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(transport), ident, 0x4000, ttl, proto,
                                       0, SRC4, DST4))
        header[10:12] = struct.pack("!H", ~ones_complement_sum(header) & 0xFFFF)
        return bytes(header) + transport
    return struct.pack("!IHBB16s16s", 0x60000000, len(transport), proto, ttl, SRC6, DST6) + transport


def tcp_segment(version: int, payload: bytes, seq: int = 1000, flags: int = vnet.TCP_ACK, ack: int = 77,
                options: bytes = TS_OPTION, ident: int = 0x1234, checksum: str = "full") -> bytes:
    offset = (20 + len(options)) // 4
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, offset << 4, flags, 512, 0, 0) + options
                    + payload)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    partial = fold(pseudo(version, src, dst, 6, len(tcp)))
    if checksum == "full":
        tcp[16:18] = struct.pack("!H", ~fold(ones_complement_sum(tcp) + partial) & 0xFFFF)
    elif checksum == "partial":  # what the kernel leaves with NEEDS_CSUM: the pseudo-header sum
        tcp[16:18] = struct.pack("!H", partial)
    return ip_packet(version, 6, bytes(tcp), ident)


def udp_datagram(version: int, payload: bytes, checksum: str = "partial") -> bytes:
    udp = bytearray(struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload)
    src, dst = (SRC4, DST4) if version == 4 else (SRC6, DST6)
    partial = fold(pseudo(version, src, dst, 17, len(udp)))
    udp[6:8] = struct.pack("!H", partial if checksum == "partial" else ~fold(ones_complement_sum(udp) + partial) & 0xFFFF)
    return ip_packet(version, 17, bytes(udp))


def offset_of(packet: bytes) -> int:
    return (packet[0] & 15) * 4 if packet[0] >> 4 == 4 else 40


def assert_valid(packet: bytes) -> None:
    """What a receiving kernel checks: lengths and checksums of IP and transport."""
    version = packet[0] >> 4
    offset = offset_of(packet)
    if version == 4:
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
        assert ones_complement_sum(packet[:offset]) == 0xFFFF, "bad IPv4 header checksum"
        proto, src, dst = packet[9], packet[12:16], packet[16:20]
    else:
        assert struct.unpack_from("!H", packet, 4)[0] + 40 == len(packet)
        proto, src, dst = packet[6], packet[8:24], packet[24:40]
    transport = packet[offset:]
    if proto == 17:
        assert struct.unpack_from("!H", transport, 4)[0] == len(transport)
    assert fold(ones_complement_sum(transport) + pseudo(version, src, dst, proto, len(transport))) == 0xFFFF, \
        "bad transport checksum"


def frame(packet: bytes, gso_type: int, gso_size: int, flags: int = vnet.F_NEEDS_CSUM, csum_offset: int = 16) -> bytes:
    offset = offset_of(packet)
    hdr_len = offset + ((packet[offset + 12] >> 4) * 4 if gso_type in (vnet.GSO_TCPV4, vnet.GSO_TCPV6) else 8)
    return vnet.VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, offset, csum_offset) + packet


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("size", [1, 1447, 1448, 1449, 5000, 63000])
def test_tcp_super_packet_splits_into_valid_segments(version: int, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    flags = vnet.TCP_ACK | vnet.TCP_PSH | vnet.TCP_FIN
    seq = 0xFFFFF000  # wraps around 2**32 within the larger packets
    big = tcp_segment(version, payload, seq=seq, flags=flags, checksum="partial")
    segments = vnet.split_frame(frame(big, vnet.GSO_TCPV4 if version == 4 else vnet.GSO_TCPV6, 1448))
    assert segments is not None and len(segments) == -(-size // 1448)
    offset = 20 if version == 4 else 40
    got = b""
    for i, seg in enumerate(segments):
        assert_valid(seg)
        header_len = offset + 32
        assert seg[offset:offset + 4] == big[offset:offset + 4]  # ports
        assert struct.unpack_from("!I", seg, offset + 4)[0] == (seq + i * 1448) & 0xFFFFFFFF
        assert seg[offset + 20:header_len] == TS_OPTION
        last = i == len(segments) - 1
        assert seg[offset + 13] == (flags if last else vnet.TCP_ACK)  # FIN and PSH on the last only
        if version == 4:
            assert struct.unpack_from("!H", seg, 4)[0] == 0x1234 + i
        assert len(seg) - header_len == (1448 if not last else size - 1448 * i)
        got += seg[header_len:]
    assert got == payload


@pytest.mark.parametrize("version", [4, 6])
def test_udp_super_packet_splits_into_valid_datagrams(version: int) -> None:
    payload = random.Random(3).randbytes(3001)
    big = udp_datagram(version, payload)
    segments = vnet.split_frame(frame(big, vnet.GSO_UDP_L4, 1200, csum_offset=6))
    assert segments is not None and [len(s) - offset_of(s) - 8 for s in segments] == [1200, 1200, 601]
    for seg in segments:
        assert_valid(seg)
    assert b"".join(s[offset_of(s) + 8:] for s in segments) == payload


@pytest.mark.parametrize("version", [4, 6])
def test_a_lone_packet_gets_its_checksum_finished(version: int) -> None:
    packet = tcp_segment(version, b"hello, odd length", checksum="partial")
    (out,) = vnet.split_frame(vnet.VNET_HDR.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, offset_of(packet), 16) + packet)
    assert_valid(out)
    udp = udp_datagram(version, b"x" * 33)
    (out,) = vnet.split_frame(vnet.VNET_HDR.pack(vnet.F_NEEDS_CSUM, 0, 0, 0, offset_of(udp), 6) + udp)
    assert_valid(out)
    plain = tcp_segment(version, b"already valid")
    assert vnet.split_frame(vnet.NO_OFFLOAD + plain) == [plain]


@pytest.mark.parametrize("bad", [
    b"", b"\x00" * 9,
    vnet.VNET_HDR.pack(1, 1, 52, 0, 20, 16) + tcp_segment(4, b"x" * 100),  # gso_size 0
    vnet.VNET_HDR.pack(1, 1 | 0x80, 52, 10, 20, 16) + tcp_segment(4, b"x" * 100),  # ECN
    vnet.VNET_HDR.pack(1, 4, 52, 10, 20, 16) + tcp_segment(4, b"x" * 100),  # TCPV6 on an IPv4 packet
    vnet.VNET_HDR.pack(1, 1, 52, 10, 24, 16) + tcp_segment(4, b"x" * 100),  # csum_start not the TCP header
    vnet.VNET_HDR.pack(1, 1, 52, 10, 20, 16) + tcp_segment(4, b"")[:30],  # truncated TCP header
    vnet.VNET_HDR.pack(1, 0, 0, 0, 20, 4000) + tcp_segment(4, b"x"),  # checksum field beyond the end
    vnet.VNET_HDR.pack(1, 9, 52, 10, 20, 16) + tcp_segment(4, b"x" * 100),  # unknown GSO type
])
def test_malformed_frames_are_refused_not_raised(bad: bytes) -> None:
    assert vnet.split_frame(bad) is None


def test_fuzzed_frames_never_raise() -> None:
    rng = random.Random(7)
    good = frame(tcp_segment(4, rng.randbytes(4000), checksum="partial"), vnet.GSO_TCPV4, 1000)
    for _ in range(3000):
        data = bytearray(good[:rng.randrange(len(good) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        result = vnet.split_frame(bytes(data))
        assert result is None or all(isinstance(s, bytes) for s in result)


@pytest.mark.parametrize("version", [4, 6])
def test_split_then_coalesce_gives_back_one_super_packet(version: int) -> None:
    payload = random.Random(9).randbytes(20000)
    gso = vnet.GSO_TCPV4 if version == 4 else vnet.GSO_TCPV6
    big = tcp_segment(version, payload, flags=vnet.TCP_ACK | vnet.TCP_PSH, checksum="partial")
    segments = vnet.split_frame(frame(big, gso, 1448))
    (merged,) = vnet.coalesce(segments)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.VNET_HDR.unpack_from(merged)
    offset = 20 if version == 4 else 40
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == \
        (vnet.F_NEEDS_CSUM, gso, offset + 32, 1448, offset, 16)
    packet = merged[vnet.VNET_HDR_LEN:]
    assert packet[offset + 32:] == payload and packet[offset + 13] == vnet.TCP_ACK | vnet.TCP_PSH
    if version == 4:
        assert ones_complement_sum(packet[:20]) == 0xFFFF and struct.unpack_from("!H", packet, 2)[0] == len(packet)
    # what the kernel does with it: the same segments again
    assert vnet.split_frame(merged) == segments


def test_coalesce_keeps_flows_apart_and_leaves_what_cannot_merge_alone() -> None:
    a = [tcp_segment(4, b"a" * 100, seq=1000 + 100 * i) for i in range(3)]
    other_flow = [tcp_segment(4, b"b" * 100, seq=1000 + 100 * i, ack=99) for i in range(2)]
    udp = udp_datagram(4, b"u" * 10, checksum="full")
    frames = vnet.coalesce([a[0], other_flow[0], a[1], udp, other_flow[1], a[2]])
    assert len(frames) == 3  # flow a, flow b (another ACK number), the UDP datagram
    assert frames[0][vnet.VNET_HDR_LEN:].endswith(b"a" * 300) and frames[1].endswith(b"b" * 200)
    assert frames[2] == vnet.NO_OFFLOAD + udp


@pytest.mark.parametrize("second", [
    tcp_segment(4, b"x" * 100, seq=1200),  # a gap in the sequence
    tcp_segment(4, b"x" * 101, seq=1100),  # bigger than the first: a new run
    tcp_segment(4, b"x" * 100, seq=1100, flags=vnet.TCP_ACK | vnet.TCP_FIN),  # FIN
    tcp_segment(4, b"x" * 100, seq=1100, flags=vnet.TCP_SYN | vnet.TCP_ACK),
    tcp_segment(4, b"x" * 100, seq=1100, options=bytes([1, 1, 8, 10]) + bytes(8 * [9])),  # other options
    tcp_segment(4, b"x" * 100, seq=1100, checksum="partial"),  # a bad checksum: the kernel drops it
])
def test_segments_that_must_not_merge_go_alone(second: bytes) -> None:
    first = tcp_segment(4, b"x" * 100, seq=1000)
    frames = vnet.coalesce([first, second])
    assert frames == [vnet.NO_OFFLOAD + first, vnet.NO_OFFLOAD + second]


def test_a_push_or_short_segment_closes_the_run() -> None:
    pushed = [tcp_segment(6, b"p" * 100, seq=0, flags=vnet.TCP_ACK | vnet.TCP_PSH),
              tcp_segment(6, b"p" * 100, seq=100)]
    assert len(vnet.coalesce(pushed)) == 2
    short = [tcp_segment(6, b"s" * 100, seq=0), tcp_segment(6, b"s" * 50, seq=100), tcp_segment(6, b"s" * 50, seq=150)]
    frames = vnet.coalesce(short)
    assert len(frames) == 2 and vnet.VNET_HDR.unpack_from(frames[0])[3] == 100


def test_authenticated_packets_are_merged_without_summing_and_alone_say_data_valid() -> None:
    """Decrypted packets (Poly1305-authenticated) are not summed again: a segment whose checksum
    the peer got wrong is merged like any other (the kernel's WireGuard trusts them the same way),
    and a packet that goes alone carries DATA_VALID instead of an empty header."""
    first = tcp_segment(4, b"x" * 100, seq=1000)
    unsummed = tcp_segment(4, b"x" * 100, seq=1100, checksum="partial")
    (merged,) = vnet.coalesce([first, unsummed], authenticated=True)
    assert vnet.VNET_HDR.unpack_from(merged)[:2] == (vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4)
    assert merged.endswith(b"x" * 200)
    udp = udp_datagram(6, b"u" * 10, checksum="full")
    assert vnet.coalesce([udp], authenticated=True) == [vnet.DATA_VALID + udp]
    assert vnet.VNET_HDR.unpack(vnet.DATA_VALID) == (vnet.F_DATA_VALID, vnet.GSO_NONE, 0, 0, 0, 0)
    assert vnet.coalesce([first, unsummed]) == [vnet.NO_OFFLOAD + first, vnet.NO_OFFLOAD + unsummed]


@pytest.mark.parametrize("version", [4, 6])
def test_a_pure_ack_goes_alone_and_ends_its_flows_run(version: int) -> None:
    """A segment without payload (an ACK, a window update) is never merged, and the segments of
    its flow after it are not merged into the run before it: the flow stays in order."""
    data = [tcp_segment(version, bytes([65 + i]) * 100, seq=1000 + 100 * i) for i in range(4)]
    ack = tcp_segment(version, b"", seq=1200)
    frames = vnet.coalesce([data[0], data[1], ack, data[2], data[3]], authenticated=True)
    assert len(frames) == 3
    assert frames[1] == vnet.DATA_VALID + ack
    assert frames[0].endswith(b"A" * 100 + b"B" * 100) and frames[2].endswith(b"C" * 100 + b"D" * 100)
    for frame in (frames[0], frames[2]):
        assert [len(p) for p in vnet.split_frame(frame)] == [len(data[0])] * 2


@pytest.mark.parametrize("authenticated", [False, True])
def test_a_lone_packet_gets_the_frame_it_would_get_in_a_batch(authenticated: bool) -> None:
    """coalesce's shortcut for a single packet (the latency path) frames it as the general path
    does when the packet cannot merge: a TCP segment, one with a wrong checksum, UDP, IPv6."""
    other = udp_datagram(4, b"o" * 20, checksum="full")
    for packet in (tcp_segment(4, b"t" * 50), tcp_segment(6, b"t" * 50),
                   tcp_segment(4, b"t" * 50, checksum="partial"), udp_datagram(6, b"u" * 9, checksum="full")):
        (alone,) = vnet.coalesce([packet], authenticated=authenticated)
        assert alone == vnet.coalesce([packet, other], authenticated=authenticated)[0]
        assert alone == (vnet.DATA_VALID if authenticated else vnet.NO_OFFLOAD) + packet
