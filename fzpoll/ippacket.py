"""Raw IPv4/IPv6 + UDP packets as they are read from and written to the TUN device.

Pure functions, no sockets: parse a packet's IP and UDP headers (validating every length field),
build a UDP packet with a correct IPv4 header checksum and UDP checksum (RFC 768; mandatory for
IPv6, RFC 8200 section 8.1), and compute the internet checksum (RFC 1071).

Parsing never raises on remote input: anything that is not one complete, unfragmented UDP
datagram parses to None. Building with inconsistent arguments (a v4 source with a v6 destination,
a payload too big for one IP packet) is local misuse and raises :class:`fzpoll.errors.LocalError`.

The checksum uses the fact that 2**16 == 1 (mod 0xFFFF): the ones' complement sum of a buffer's
16-bit words is the buffer read as one big integer, modulo 0xFFFF (with 0xFFFF standing for a
non-zero multiple). One ``int.from_bytes`` and one ``%`` run in C, so a 1400-byte packet costs
about a microsecond instead of a Python loop over 700 words.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from fzpoll.errors import LocalError

PROTO_UDP = 17
IPV4_HEADER_SIZE = 20
IPV6_HEADER_SIZE = 40
UDP_HEADER_SIZE = 8
DEFAULT_TTL = 64
MAX_UDP_PAYLOAD_V4 = 0xFFFF - IPV4_HEADER_SIZE - UDP_HEADER_SIZE  # 65507
MAX_UDP_PAYLOAD_V6 = 0xFFFF - UDP_HEADER_SIZE  # 65527 (no jumbograms)

_IPV4_FLAG_DF = 0x4000
_IPV4_FLAG_MF = 0x2000
_IPV4_FRAGMENT_OFFSET = 0x1FFF

_UDP_HEADER = struct.Struct("!HHHH")
_IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_IPV6_HEADER = struct.Struct("!IHBB16s16s")

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One parsed UDP datagram: addresses, ports and payload (a copy, trimmed to the UDP length)."""

    src: IPAddress
    dst: IPAddress
    src_port: int
    dst_port: int
    payload: bytes


def ones_complement_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of ``data`` (odd length padded with a zero byte).

    Returns 0 only if every word is zero, else a value in 1..0xFFFF.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    return value % 0xFFFF or 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum of ``data``; ``initial`` is a partial ones' complement sum to add in
    (a pseudo-header's :func:`ones_complement_sum`). A buffer that already holds a correct
    checksum sums to 0 here."""
    total = ones_complement_sum(data) + initial
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header_sum(src: bytes, dst: bytes, udp_length: int) -> int:
    """Sum of the pseudo header (RFC 768 for IPv4, RFC 8200 section 8.1 for IPv6)."""
    if len(src) == 4:
        tail = struct.pack("!BBH", 0, PROTO_UDP, udp_length)
    else:
        tail = struct.pack("!II", udp_length, PROTO_UDP)
    return ones_complement_sum(src + dst + tail)


def udp_checksum(src: bytes, dst: bytes, udp: bytes) -> int:
    """The UDP checksum field for segment ``udp`` (its checksum field zeroed) between packed
    addresses; a computed 0 is sent as 0xFFFF (0 means "no checksum" in IPv4)."""
    checksum = internet_checksum(udp, _pseudo_header_sum(src, dst, len(udp)))
    return checksum or 0xFFFF


def _parse_ipv4(packet: bytes) -> tuple[bytes, bytes, int, memoryview] | None:
    if len(packet) < IPV4_HEADER_SIZE:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total_length = int.from_bytes(packet[2:4], "big")
    if ihl < IPV4_HEADER_SIZE or total_length < ihl or total_length > len(packet):
        return None
    if int.from_bytes(packet[6:8], "big") & (_IPV4_FLAG_MF | _IPV4_FRAGMENT_OFFSET):
        return None  # a fragment: not a whole datagram
    view = memoryview(packet)[ihl:total_length]
    return bytes(packet[12:16]), bytes(packet[16:20]), packet[9], view


def _parse_ipv6(packet: bytes) -> tuple[bytes, bytes, int, memoryview] | None:
    if len(packet) < IPV6_HEADER_SIZE:
        return None
    end = IPV6_HEADER_SIZE + int.from_bytes(packet[4:6], "big")
    if end > len(packet):
        return None
    # Extension headers are not walked: their next header is never UDP here.
    view = memoryview(packet)[IPV6_HEADER_SIZE:end]
    return bytes(packet[8:24]), bytes(packet[24:40]), packet[6], view


def ip_header(packet: bytes) -> tuple[bytes, bytes, int, memoryview] | None:
    """(packed source, packed destination, protocol, IP payload view) of a whole, unfragmented
    IPv4 or IPv6 packet with consistent length fields; None otherwise. The payload is trimmed to
    the length the header gives (trailing bytes beyond it are ignored)."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        return _parse_ipv4(packet)
    if version == 6:
        return _parse_ipv6(packet)
    return None


def _udp_segment(packet: bytes) -> tuple[bytes, bytes, memoryview, int] | None:
    """(packed source, packed destination, UDP segment, UDP length field) of a whole IP packet
    carrying UDP whose length field fits; None otherwise."""
    header = ip_header(packet)
    if header is None:
        return None
    src, dst, protocol, segment = header
    if protocol != PROTO_UDP or len(segment) < UDP_HEADER_SIZE:
        return None
    udp_length = int.from_bytes(segment[4:6], "big")
    if udp_length < UDP_HEADER_SIZE or udp_length > len(segment):
        return None
    return src, dst, segment, udp_length


def parse_udp(packet: bytes) -> UdpDatagram | None:
    """The UDP datagram carried by raw IP ``packet``, or None if it is not one (another
    protocol, a fragment, or a length field that does not fit). Checksums are not verified
    (a packet from our own TUN device was built by the local kernel); see :func:`checksum_ok`."""
    found = _udp_segment(packet)
    if found is None:
        return None
    src, dst, segment, udp_length = found
    src_port, dst_port, _, _ = _UDP_HEADER.unpack_from(segment)
    make = IPv4Address if len(src) == 4 else IPv6Address
    return UdpDatagram(
        make(src), make(dst), src_port, dst_port, bytes(segment[UDP_HEADER_SIZE:udp_length])
    )


def build_udp(
    src: IPAddress,
    dst: IPAddress,
    src_port: int,
    dst_port: int,
    payload: bytes,
    *,
    ttl: int = DEFAULT_TTL,
) -> bytes:
    """A raw IPv4 or IPv6 packet carrying one UDP datagram, checksums filled in. IPv4 packets
    carry DF and identification 0 (RFC 6864 allows that for atomic datagrams)."""
    if src.version != dst.version:
        raise LocalError(f"UDP packet from {src} to {dst}: address families differ")
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise LocalError(f"UDP ports out of range: {src_port}, {dst_port}")
    limit = MAX_UDP_PAYLOAD_V4 if src.version == 4 else MAX_UDP_PAYLOAD_V6
    if len(payload) > limit:
        raise LocalError(f"UDP payload of {len(payload)} bytes exceeds {limit}")
    s, d = src.packed, dst.packed
    udp_length = UDP_HEADER_SIZE + len(payload)
    udp = _UDP_HEADER.pack(src_port, dst_port, udp_length, 0) + payload
    checksum = udp_checksum(s, d, udp)
    udp = udp[:6] + checksum.to_bytes(2, "big") + udp[8:]
    if src.version == 4:
        header = _IPV4_HEADER.pack(
            0x45, 0, IPV4_HEADER_SIZE + udp_length, 0, _IPV4_FLAG_DF, ttl, PROTO_UDP, 0, s, d
        )
        header = header[:10] + internet_checksum(header).to_bytes(2, "big") + header[12:]
        return header + udp
    return _IPV6_HEADER.pack(6 << 28, udp_length, PROTO_UDP, ttl, s, d) + udp


def checksum_ok(packet: bytes) -> bool:
    """Whether a UDP packet's checksums verify: the IPv4 header checksum, and the UDP checksum
    (an IPv4 UDP checksum of 0 means "none" and passes; in IPv6 it is mandatory)."""
    found = _udp_segment(packet)
    if found is None:
        return False
    src, dst, segment, udp_length = found
    if len(src) == 4 and internet_checksum(memoryview(packet)[:(packet[0] & 0x0F) * 4]) != 0:
        return False
    stored = int.from_bytes(segment[6:8], "big")
    if stored == 0:
        return len(src) == 4
    return internet_checksum(segment[:udp_length], _pseudo_header_sum(src, dst, udp_length)) == 0


# ------------------------------------------------------------------ peeks for the datapath
# What the datapath looks at in a packet it does not parse: no validation beyond what each answer
# needs, so a short or odd packet gives the safe answer rather than raising.

PROTO_ICMP = 1
PROTO_ICMPV6 = 58
# ICMP messages the kernel never answers: echo reply, destination unreachable, source quench,
# time exceeded, parameter problem (v4); destination unreachable, packet too big, time exceeded,
# parameter problem, echo reply (v6).
_ICMP4_FINAL = frozenset({0, 3, 4, 11, 12})
_ICMP6_FINAL = frozenset({1, 2, 3, 4, 129})


def may_be_answered(packets: list[bytes]) -> bool:
    """Could writing ``packets`` to TUN make the kernel answer at once, during the write? Only
    False when each is an ICMP message that is never answered (the echo reply a ping waits for):
    the read that would find nothing costs a syscall and an exception."""
    for p in packets:
        n = len(p)
        version = p[0] >> 4 if n else 0
        if version == 4:
            at = (p[0] & 15) << 2
            if n < IPV4_HEADER_SIZE or p[9] != PROTO_ICMP or n <= at or p[at] not in _ICMP4_FINAL:
                return True
        elif version == 6:
            if n <= IPV6_HEADER_SIZE or p[6] != PROTO_ICMPV6 or p[IPV6_HEADER_SIZE] not in _ICMP6_FINAL:
                return True
        else:
            return True
    return False


def destination_in(packet: bytes, v4: frozenset[bytes], v6: frozenset[bytes]) -> bool:
    """Whether the packet's destination address (packed) is one of ``v4`` / ``v6``."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return packet[16:20] in v4
    return version == 6 and packet[24:40] in v6
