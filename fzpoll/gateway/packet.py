"""Transport-layer view and rewriting of raw IP packets for the gateway's NAT, sans-IO.

:func:`parse_flow` reads what the NAT keys on: addresses, protocol, and the "port" of each side
(TCP/UDP ports; for ICMP echo request and reply the identifier, on both sides). :func:`rewrite`
changes addresses and ports and fixes every checksum they enter: the IPv4 header checksum, the
TCP and UDP checksums (pseudo-header included), the ICMPv6 checksum (pseudo-header included) and
the ICMPv4 checksum (identifier only). Checksums are *updated* (RFC 1624: HC' = ~(~HC + ~m + m'))
rather than recomputed, so a packet that arrived corrupt stays detectably corrupt, and the
truncated packet quoted inside an ICMP error can be fixed without its missing bytes.

:func:`icmp_error_quote` finds the packet quoted by an ICMP error (destination unreachable, time
exceeded, parameter problem, packet too big), and :func:`rewrite_icmp_error` translates both the
quote and the outer packet. :func:`destination_unreachable` builds our own ICMP error (RFC 792,
RFC 4443), never in answer to an ICMP error. Parsing never raises: what is not a whole,
unfragmented TCP, UDP or ICMP echo packet of a sane length parses to None.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from fzpoll.ippacket import (
    IPV4_HEADER_SIZE,
    IPV6_HEADER_SIZE,
    PROTO_UDP,
    internet_checksum,
    ip_header,
    ones_complement_sum,
)

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_ICMPV6 = 58

ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST = 0, 3, 8
ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM = 11, 12
ICMP_HOST_UNREACH, ICMP_PKT_FILTERED = 1, 13  # codes of ICMP_DEST_UNREACH (RFC 1812 5.2.7.1)
ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, ICMPV6_PARAM_PROB = 1, 2, 3, 4
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
ICMPV6_ADM_PROHIBITED, ICMPV6_ADDR_UNREACH = 1, 3  # codes of ICMPV6_DEST_UNREACH

ICMP_ERRORS = {PROTO_ICMP: frozenset({ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETER_PROBLEM}),
               PROTO_ICMPV6: frozenset({ICMPV6_DEST_UNREACH, ICMPV6_PACKET_TOO_BIG,
                                        ICMPV6_TIME_EXCEEDED, ICMPV6_PARAM_PROB})}
ICMP_ECHOES = {PROTO_ICMP: frozenset({ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY}),
               PROTO_ICMPV6: frozenset({ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY})}
ICMP_HEADER_SIZE = 8
# How much of the offending packet an ICMP error quotes: RFC 1812 4.3.2.3 (576 bytes in all)
# and RFC 4443 2.4 (c) (1280 bytes in all).
MAX_ICMP_ERROR = {4: 576, 6: 1280}
ERROR_TTL = 64

# Offset of each protocol's checksum, and whether it covers the IP pseudo-header.
_CHECKSUM_AT = {PROTO_TCP: 16, PROTO_UDP: 6, PROTO_ICMP: 2, PROTO_ICMPV6: 2}
_PSEUDO = {PROTO_TCP: True, PROTO_UDP: True, PROTO_ICMP: False, PROTO_ICMPV6: True}
_MIN_L4 = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8, PROTO_ICMPV6: 8}
_TCP_FIN, _TCP_SYN, _TCP_RST = 0x01, 0x02, 0x04
_PORTS = struct.Struct("!HH")


class Flow(NamedTuple):
    """What the NAT needs of one packet. ``src_port``/``dst_port`` are the TCP/UDP ports or,
    for ICMP echo, the identifier (on both sides). Addresses are packed (4 or 16 bytes)."""

    version: int
    src: bytes
    dst: bytes
    protocol: int
    src_port: int
    dst_port: int
    tcp_flags: int = 0

    @property
    def fin(self) -> bool:
        return bool(self.tcp_flags & _TCP_FIN)

    @property
    def rst(self) -> bool:
        return bool(self.tcp_flags & _TCP_RST)


def _l4_offset(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else IPV6_HEADER_SIZE


def _flow_of(version: int, src: bytes, dst: bytes, protocol: int, l4: memoryview | bytes,
             quoted: bool = False) -> Flow | None:
    """A quoted packet may be cut after 8 bytes of its transport header (RFC 792)."""
    if protocol in (PROTO_TCP, PROTO_UDP):
        if len(l4) < (ICMP_HEADER_SIZE if quoted else _MIN_L4[protocol]):
            return None
        sport, dport = _PORTS.unpack_from(l4)
        flags = l4[13] if protocol == PROTO_TCP and len(l4) > 13 else 0
        return Flow(version, src, dst, protocol, sport, dport, flags)
    if protocol == (PROTO_ICMP if version == 4 else PROTO_ICMPV6) and len(l4) >= ICMP_HEADER_SIZE:
        if l4[0] in ICMP_ECHOES[protocol]:
            ident = int.from_bytes(l4[4:6], "big")
            return Flow(version, src, dst, protocol, ident, ident)
    return None


def parse_flow(packet: bytes) -> Flow | None:
    """The flow of a whole TCP, UDP or ICMP echo packet; None for anything else."""
    header = ip_header(packet)
    if header is None:
        return None
    src, dst, protocol, l4 = header
    return _flow_of(packet[0] >> 4, src, dst, protocol, l4)


def icmp_error_quote(packet: bytes) -> tuple[Flow, int] | None:
    """For an ICMP error (of the packet's own family) quoting a TCP, UDP or ICMP echo packet:
    the quoted packet's flow and the offset of the quote in ``packet``. None otherwise."""
    header = ip_header(packet)
    if header is None:
        return None
    _, _, protocol, l4 = header
    version = packet[0] >> 4
    if protocol != (PROTO_ICMP if version == 4 else PROTO_ICMPV6) or len(l4) < ICMP_HEADER_SIZE:
        return None
    if l4[0] not in ICMP_ERRORS[protocol]:
        return None
    offset = _l4_offset(packet) + ICMP_HEADER_SIZE
    quote = bytes(l4[ICMP_HEADER_SIZE:])
    inner = _quoted_header(quote, version)
    if inner is None:
        return None
    flow = _flow_of(version, inner[0], inner[1], inner[2], quote[inner[3]:], quoted=True)
    return None if flow is None else (flow, offset)


def _quoted_header(quote: bytes, version: int) -> tuple[bytes, bytes, int, int] | None:
    """(src, dst, protocol, L4 offset) of a quoted, possibly truncated IP packet."""
    if not quote or quote[0] >> 4 != version:
        return None
    if version == 4:
        ihl = (quote[0] & 0x0F) * 4
        if ihl < IPV4_HEADER_SIZE or len(quote) < ihl + 8:
            return None
        return quote[12:16], quote[16:20], quote[9], ihl
    if len(quote) < IPV6_HEADER_SIZE + 8:
        return None
    return quote[8:24], quote[24:40], quote[6], IPV6_HEADER_SIZE


# ------------------------------------------------------------------------------- checksums


def _adjust(checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after the bytes ``old`` (16-bit aligned) became ``new``."""
    total = (~checksum & 0xFFFF) + (~ones_complement_sum(old) & 0xFFFF) + ones_complement_sum(new)
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _set_field(buf: bytearray, at: int, new: bytes, checksums: tuple[tuple[int, bool], ...]) -> None:
    """Write ``new`` at ``at`` and update each checksum ``(offset, is_udp)`` it enters, if the
    checksum lies within ``buf`` (a quoted packet may lack it). A UDP checksum of 0 means
    "none" and stays 0; a computed 0 is stored as 0xFFFF."""
    old = bytes(buf[at : at + len(new)])
    if old == new:
        return
    buf[at : at + len(new)] = new
    for checksum_at, udp in checksums:
        if checksum_at + 2 > len(buf):
            continue
        stored = int.from_bytes(buf[checksum_at : checksum_at + 2], "big")
        if udp and stored == 0:
            continue
        updated = _adjust(stored, old, new)
        buf[checksum_at : checksum_at + 2] = (updated or (0xFFFF if udp else 0)).to_bytes(2, "big")


def _rewrite_in(buf: bytearray, start: int, src: bytes | None, dst: bytes | None,
                src_port: int | None, dst_port: int | None) -> None:
    """Rewrite the IP packet that begins at ``buf[start]`` (possibly a truncated quote)."""
    if buf[start] >> 4 == 4:
        ihl, protocol, addr_at, size = (buf[start] & 0x0F) * 4, buf[start + 9], start + 12, 4
        ip_sums: tuple[tuple[int, bool], ...] = ((start + 10, False),)
    else:
        ihl, protocol, addr_at, size = IPV6_HEADER_SIZE, buf[start + 6], start + 8, 16
        ip_sums = ()
    l4 = start + ihl
    l4_sums = ((l4 + _CHECKSUM_AT[protocol], protocol == PROTO_UDP),) if protocol in _CHECKSUM_AT else ()
    address_sums = ip_sums + (l4_sums if _PSEUDO.get(protocol, False) else ())
    for address, at in ((src, addr_at), (dst, addr_at + size)):
        if address is not None:
            _set_field(buf, at, address, address_sums)
    if protocol in (PROTO_ICMP, PROTO_ICMPV6):
        ports = ((src_port if src_port is not None else dst_port, l4 + 4),)
    else:
        ports = ((src_port, l4), (dst_port, l4 + 2))
    for port, at in ports:
        if port is not None:
            _set_field(buf, at, port.to_bytes(2, "big"), l4_sums)


class Rewrite(NamedTuple):
    """One direction of one NAT session compiled once: the address to write (at ``addr_at``),
    the port to write (at ``port_at`` in the transport header, or None), and the ones'
    complement sums to add to the IPv4 header checksum and the transport checksum (RFC 1624:
    the sum of the old words negated and the new words). Applying it is a few slice writes."""

    addr_at: int
    addr: bytes
    port_at: int | None
    port: bytes
    ip_delta: int
    l4_delta: int
    l4_checksum_at: int
    udp: bool


def _delta(old: bytes, new: bytes) -> int:
    return (~ones_complement_sum(old) & 0xFFFF) + ones_complement_sum(new)


def compile_rewrite(flow: Flow, *, src: bytes | None = None, dst: bytes | None = None,
                    src_port: int | None = None, dst_port: int | None = None) -> Rewrite:
    """What :func:`rewrite` would do to every packet of ``flow`` (same addresses, same ports),
    compiled. Exactly one address is rewritten; ports as given (ICMP echo: the identifier)."""
    v4 = flow.version == 4
    if src is not None:
        addr_at, old, new = (12 if v4 else 8), flow.src, src
    else:
        assert dst is not None
        addr_at, old, new = (16 if v4 else 24), flow.dst, dst
    ip_delta = _delta(old, new) if v4 else 0
    l4_delta = _delta(old, new) if _PSEUDO[flow.protocol] else 0
    port_at, port = None, b""
    if flow.protocol in (PROTO_ICMP, PROTO_ICMPV6):
        new_port, old_port = (src_port if src_port is not None else dst_port), flow.src_port
        at = 4
    elif src_port is not None:
        new_port, old_port, at = src_port, flow.src_port, 0
    else:
        new_port, old_port, at = dst_port, flow.dst_port, 2
    if new_port is not None and new_port != old_port:
        port_at, port = at, new_port.to_bytes(2, "big")
        l4_delta += _delta(old_port.to_bytes(2, "big"), port)
    return Rewrite(addr_at, new, port_at, port, ip_delta, l4_delta, _CHECKSUM_AT[flow.protocol],
                   flow.protocol == PROTO_UDP)


def _add_delta(buf: bytearray, at: int, delta: int, udp: bool) -> None:
    stored = (buf[at] << 8) | buf[at + 1]
    if udp and stored == 0:
        return  # "no checksum" (IPv4 UDP) stays so
    total = (~stored & 0xFFFF) + delta
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    value = ~total & 0xFFFF
    if udp and value == 0:
        value = 0xFFFF
    buf[at] = value >> 8
    buf[at + 1] = value & 0xFF


def apply_rewrite(packet: bytes, rw: Rewrite) -> bytes:
    """``packet`` (of the flow ``rw`` was compiled for) rewritten, checksums updated."""
    buf = bytearray(packet)
    v4 = buf[0] >> 4 == 4
    l4 = (buf[0] & 0x0F) * 4 if v4 else IPV6_HEADER_SIZE
    buf[rw.addr_at : rw.addr_at + len(rw.addr)] = rw.addr
    if rw.port_at is not None:
        buf[l4 + rw.port_at : l4 + rw.port_at + 2] = rw.port
    if v4:
        _add_delta(buf, 10, rw.ip_delta, False)
    if rw.l4_delta:
        _add_delta(buf, l4 + rw.l4_checksum_at, rw.l4_delta, rw.udp)
    return bytes(buf)


def rewrite(packet: bytes, *, src: bytes | None = None, dst: bytes | None = None,
            src_port: int | None = None, dst_port: int | None = None) -> bytes:
    """A copy of ``packet`` (one :func:`parse_flow` accepted) with the given addresses (packed,
    of the packet's family) and ports (ICMP echo: the identifier) replaced, checksums updated."""
    buf = bytearray(packet)
    _rewrite_in(buf, 0, src, dst, src_port, dst_port)
    return bytes(buf)


def rewrite_icmp_error(packet: bytes, quote_at: int, *, outer_src: bytes, quote_dst: bytes,
                       quote_src_port: int) -> bytes:
    """Translate an ICMP error back through the NAT: the quoted packet gets destination
    ``quote_dst`` and source port ``quote_src_port`` (its checksums updated as far as it goes),
    the error itself comes from ``outer_src``; the ICMP checksum is recomputed over the whole
    message since the quote changed."""
    buf = bytearray(packet)
    _rewrite_in(buf, quote_at, None, quote_dst, quote_src_port, None)
    version = buf[0] >> 4
    icmp_at = quote_at - ICMP_HEADER_SIZE
    _set_field(buf, 12 if version == 4 else 8, outer_src, ((10, False),) if version == 4 else ())
    end = len(buf) if version == 6 else int.from_bytes(buf[2:4], "big")
    buf[icmp_at + 2 : icmp_at + 4] = b"\x00\x00"
    pseudo = 0 if version == 4 else _pseudo_sum(bytes(buf[8:24]), bytes(buf[24:40]), PROTO_ICMPV6, end - icmp_at)
    checksum = internet_checksum(memoryview(buf)[icmp_at:end], pseudo)
    buf[icmp_at + 2 : icmp_at + 4] = checksum.to_bytes(2, "big")
    return bytes(buf)


def _pseudo_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    if len(src) == 4:
        return ones_complement_sum(src + dst + struct.pack("!BBH", 0, protocol, length))
    return ones_complement_sum(src + dst + struct.pack("!II", length, protocol))


def checksums_ok(packet: bytes) -> bool:
    """Whether a whole TCP, UDP or ICMP packet's checksums verify (IPv4 header included; an
    IPv4 UDP checksum of 0 means "none"). For tests and diagnostics."""
    header = ip_header(packet)
    if header is None:
        return False
    src, dst, protocol, l4 = header
    if packet[0] >> 4 == 4 and internet_checksum(memoryview(packet)[: _l4_offset(packet)]) != 0:
        return False
    if protocol not in _CHECKSUM_AT or len(l4) < _MIN_L4[protocol]:
        return False
    if protocol == PROTO_UDP and len(src) == 4 and l4[6:8] == b"\x00\x00":
        return True
    pseudo = _pseudo_sum(src, dst, protocol, len(l4)) if _PSEUDO[protocol] else 0
    return internet_checksum(l4, pseudo) == 0


# ------------------------------------------------------------------------------- our own errors


def is_prohibited(packet: bytes) -> bool:
    """Whether ``packet`` is an ICMP destination unreachable "administratively prohibited"."""
    header = ip_header(packet)
    if header is None or len(header[3]) < ICMP_HEADER_SIZE:
        return False
    kind, code = header[3][0], header[3][1]
    if header[2] == PROTO_ICMP:
        return kind == ICMP_DEST_UNREACH and code == ICMP_PKT_FILTERED
    return header[2] == PROTO_ICMPV6 and kind == ICMPV6_DEST_UNREACH and code == ICMPV6_ADM_PROHIBITED


def destination_unreachable(packet: bytes, source: bytes, *, prohibited: bool = False) -> bytes | None:
    """An ICMP destination unreachable (host / address unreachable, or "administratively
    prohibited") from ``source`` to the sender of ``packet``, quoting it; None if ``packet`` is itself an ICMP error or not a whole
    IP packet of ``source``'s family (RFC 1122 3.2.2: never an error about an error)."""
    header = ip_header(packet)
    if header is None:
        return None
    src, _, protocol, l4 = header
    version = packet[0] >> 4
    if len(source) != len(src) or src == bytes(len(src)):
        return None
    if protocol in ICMP_ERRORS and (not l4 or l4[0] not in ICMP_ECHOES[protocol]):
        return None  # an ICMP error or informational message: no error about it
    limit = MAX_ICMP_ERROR[version] - (IPV4_HEADER_SIZE if version == 4 else IPV6_HEADER_SIZE) - ICMP_HEADER_SIZE
    quote = bytes(packet[:limit])
    if version == 4:
        code = ICMP_PKT_FILTERED if prohibited else ICMP_HOST_UNREACH
        icmp = bytearray(bytes((ICMP_DEST_UNREACH, code)) + bytes(6) + quote)
        icmp[2:4] = internet_checksum(icmp).to_bytes(2, "big")
        total = IPV4_HEADER_SIZE + len(icmp)
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, ERROR_TTL, PROTO_ICMP, 0, source, src))
        ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
        return bytes(ip) + bytes(icmp)
    code = ICMPV6_ADM_PROHIBITED if prohibited else ICMPV6_ADDR_UNREACH
    icmp = bytearray(bytes((ICMPV6_DEST_UNREACH, code)) + bytes(6) + quote)
    icmp[2:4] = internet_checksum(icmp, _pseudo_sum(source, src, PROTO_ICMPV6, len(icmp))).to_bytes(2, "big")
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(icmp), PROTO_ICMPV6, ERROR_TTL, source, src)
    return ip + bytes(icmp)
