"""Builders of TCP, UDP and ICMP packets for the gateway tests, with checksums computed by a
naive word loop (independent of fzpoll's own checksum code), and a naive verifier."""

from __future__ import annotations

import struct
from ipaddress import ip_address

PROTO = {"icmp": 1, "tcp": 6, "udp": 17, "icmp6": 58}
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def naive_checksum(data: bytes, initial: int = 0) -> int:
    total = naive_sum(data) + initial
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        return naive_sum(src + dst + struct.pack("!BBH", 0, proto, length))
    return naive_sum(src + dst + struct.pack("!II", length, proto))


def ip(src: str, dst: str, proto: int, l4: bytes, ttl: int = 64) -> bytes:
    s, d = ip_address(src).packed, ip_address(dst).packed
    if len(s) == 4:
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 7, 0x4000, ttl, proto, 0, s, d))
        header[10:12] = naive_checksum(bytes(header)).to_bytes(2, "big")
        return bytes(header) + l4
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, ttl, s, d) + l4


def _with_checksum(src: str, dst: str, proto: int, l4: bytearray, at: int, use_pseudo: bool = True) -> bytes:
    s, d = ip_address(src).packed, ip_address(dst).packed
    initial = pseudo(s, d, proto, len(l4)) if use_pseudo else 0
    value = naive_checksum(bytes(l4), initial)
    if proto == 17 and value == 0:
        value = 0xFFFF
    l4[at : at + 2] = value.to_bytes(2, "big")
    return ip(src, dst, proto, bytes(l4))


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello") -> bytes:
    l4 = bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)
    return _with_checksum(src, dst, 17, l4, 6)


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = ACK, payload: bytes = b"",
        seq: int = 1000, ack: int = 0) -> bytes:
    l4 = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload)
    return _with_checksum(src, dst, 6, l4, 16)


def echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False, payload: bytes = b"ping") -> bytes:
    v6 = ":" in src
    kind = (129 if reply else 128) if v6 else (0 if reply else 8)
    l4 = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload)
    return _with_checksum(src, dst, 58 if v6 else 1, l4, 2, use_pseudo=v6)


def icmp_error(src: str, dst: str, kind: int, code: int, quoted: bytes) -> bytes:
    v6 = ":" in src
    l4 = bytearray(struct.pack("!BBHI", kind, code, 0, 0) + quoted)
    return _with_checksum(src, dst, 58 if v6 else 1, l4, 2, use_pseudo=v6)


def verify(packet: bytes) -> bool:
    """Every checksum of a whole packet verifies (naively)."""
    v4 = packet[0] >> 4 == 4
    ihl = (packet[0] & 0x0F) * 4 if v4 else 40
    if v4 and naive_checksum(packet[:ihl]) != 0:
        return False
    proto = packet[9] if v4 else packet[6]
    s, d = (packet[12:16], packet[16:20]) if v4 else (packet[8:24], packet[24:40])
    l4 = packet[ihl:]
    if proto == 17 and v4 and l4[6:8] == b"\x00\x00":
        return True
    initial = 0 if proto == 1 else pseudo(s, d, proto, len(l4))
    return naive_checksum(l4, initial) == 0


def addr(packet: bytes, which: str) -> str:
    v4 = packet[0] >> 4 == 4
    if v4:
        raw = packet[12:16] if which == "src" else packet[16:20]
    else:
        raw = packet[8:24] if which == "src" else packet[24:40]
    return str(ip_address(raw))


def ports(packet: bytes) -> tuple[int, int]:
    ihl = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    return struct.unpack_from("!HH", packet, ihl)
