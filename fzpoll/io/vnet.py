"""TUN offloads: the virtio-net header, splitting super-packets and coalescing segments.

A TUN device opened with ``IFF_VNET_HDR`` prefixes every read and write with a 10-byte
``struct virtio_net_hdr`` (linux/virtio_net.h). With ``TUNSETOFFLOAD`` (TSO4/TSO6/USO/CSUM) the
kernel hands us TCP and UDP *super-packets* of up to 64 KiB, one header and a ``gso_size``, and a
checksum left for us to finish (``NEEDS_CSUM``): :func:`split_frame` cuts one into wire-sized
segments, each a complete packet with its own correct IP, TCP/UDP headers and checksums, since
the peer may be a kernel or a wireguard-go without offloads. On the way back,
:func:`coalesce` merges consecutive in-order segments of one TCP flow from a batch into one
super-packet that the kernel takes in one write (as wireguard-go's tcpGRO and the kernel's own
GRO do); anything that cannot be merged goes alone.

Pure functions on bytes: no fd, no clock. Malformed input from the kernel gives None (a counted
drop for the caller), never an exception.
"""

from __future__ import annotations

import struct

from fzpoll.ippacket import ones_complement_sum

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3  # UFO, never asked for
GSO_TCPV6 = 4
GSO_UDP_L4 = 5  # USO
GSO_ECN = 0x80
NO_OFFLOAD = bytes(VNET_HDR_LEN)  # the header of a plain packet we write
# ... of a plain packet whose checksums need no checking: decrypted packets were authenticated
# end to end (Poly1305), so, as the kernel's WireGuard marks them CHECKSUM_UNNECESSARY, we tell
# the kernel their checksums were checked "by the hardware".
DATA_VALID = VNET_HDR.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)

PROTO_TCP = 6
PROTO_UDP = 17
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80
MAX_SUPER_PACKET = 65535  # the IPv4 total length / IPv6 payload length field
MAX_COALESCED_SEGMENTS = 64  # as the kernel's UDP_SEGMENT / wireguard-go's batch

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def _pseudo_sum(packet: bytes | bytearray, ip_version: int, proto: int, length: int) -> int:
    """The ones' complement sum of the pseudo header of ``packet`` for a transport ``length``."""
    if ip_version == 4:
        return _fold(ones_complement_sum(packet[12:20]) + proto + length)
    return _fold(ones_complement_sum(packet[8:40]) + proto + (length >> 16) + (length & 0xFFFF))


def _ipv4_header_checksum(header: bytearray) -> None:
    header[10:12] = b"\0\0"
    header[10:12] = _U16.pack(~ones_complement_sum(header) & 0xFFFF)


def _transport_checksum(packet: bytearray, ip_version: int, proto: int, offset: int) -> None:
    """Compute and store the TCP/UDP checksum of ``packet`` whose transport header is at
    ``offset`` (a UDP checksum of 0 is sent as 0xFFFF)."""
    at = offset + (16 if proto == PROTO_TCP else 6)
    packet[at:at + 2] = b"\0\0"
    length = len(packet) - offset
    total = _fold(ones_complement_sum(memoryview(packet)[offset:]) + _pseudo_sum(packet, ip_version, proto, length))
    checksum = ~total & 0xFFFF
    if checksum == 0 and proto == PROTO_UDP:
        checksum = 0xFFFF
    packet[at:at + 2] = _U16.pack(checksum)


def _finish_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes | None:
    """NEEDS_CSUM without GSO: the field holds the pseudo-header sum; sum from csum_start on."""
    at = csum_start + csum_offset
    if at + 2 > len(packet) or csum_start >= len(packet):
        return None
    out = bytearray(packet)
    checksum = ~ones_complement_sum(memoryview(out)[csum_start:]) & 0xFFFF
    out[at:at + 2] = _U16.pack(checksum)
    return bytes(out)


def split_frame(frame: bytes) -> list[bytes] | None:
    """A TUN read (virtio-net header + packet) as the IP packets to send, each with valid
    checksums; None if the header or the packet is malformed."""
    if len(frame) < VNET_HDR_LEN:
        return None
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
    packet = frame[VNET_HDR_LEN:]
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            finished = _finish_checksum(packet, csum_start, csum_offset)
            return None if finished is None else [finished]
        return [packet]
    if gso_type & GSO_ECN or gso_size == 0 or not packet:
        return None  # ECN-marked TSO is never enabled (no TUN_F_TSO_ECN)
    version = packet[0] >> 4
    if gso_type == GSO_TCPV4 and version == 4 or gso_type == GSO_TCPV6 and version == 6:
        return _split(packet, version, PROTO_TCP, csum_start, gso_size)
    if gso_type == GSO_UDP_L4 and version in (4, 6):
        return _split(packet, version, PROTO_UDP, csum_start, gso_size)
    return None


def _fixed_sums(template: bytearray, version: int, proto: int, offset: int) -> tuple[int, int]:
    """Zero the fields of ``template`` that differ per segment and return the sums of what is
    left: the transport header with the pseudo header's addresses and protocol, and the IPv4
    header (0 for IPv6)."""
    if proto == PROTO_TCP:
        template[offset + 4:offset + 8] = b"\0\0\0\0"  # sequence number
        template[offset + 13] = 0  # flags
        template[offset + 16:offset + 18] = b"\0\0"  # checksum
    else:
        template[offset + 4:offset + 8] = b"\0\0\0\0"  # length and checksum
    fixed = ones_complement_sum(memoryview(template)[offset:]) + _pseudo_sum(template, version, proto, 0)
    if version != 4:
        return fixed, 0
    template[2:6] = b"\0\0\0\0"  # total length, identification
    template[10:12] = b"\0\0"  # header checksum
    return fixed, ones_complement_sum(memoryview(template)[:offset])


def _split(packet: bytes, version: int, proto: int, offset: int, gso_size: int) -> list[bytes] | None:
    """Cut a TCP or UDP super-packet into segments of ``gso_size`` payload bytes.

    The headers of every segment differ from the first only in a few fields (IP length and ID,
    TCP sequence and flags, UDP length), so their checksums are the sum of the unchanging header
    words, computed once, plus those fields: only the payload of each segment is summed anew."""
    ip_header_len = (packet[0] & 15) * 4 if version == 4 else 40
    if offset != ip_header_len or len(packet) < offset + (20 if proto == PROTO_TCP else 8):
        return None  # IPv4 options are fine (IHL); IPv6 extension headers are not offloaded to us
    if (packet[9] if version == 4 else packet[6]) != proto:
        return None
    transport_len = (packet[offset + 12] >> 4) * 4 if proto == PROTO_TCP else 8
    header_len = offset + transport_len
    if transport_len < (20 if proto == PROTO_TCP else 8) or header_len > len(packet):
        return None
    template = bytearray(packet[:header_len])
    tcp = proto == PROTO_TCP
    seq, flags = (_U32.unpack_from(packet, offset + 4)[0], packet[offset + 13]) if tcp else (0, 0)
    ip_id = _U16.unpack_from(packet, 4)[0] if version == 4 else 0
    fixed, ip_fixed = _fixed_sums(template, version, proto, offset)
    checksum_at = offset + (16 if tcp else 6)
    payload_len = len(packet) - header_len
    count = (payload_len + gso_size - 1) // gso_size or 1
    last = count - 1
    segments = []
    from_bytes, join, pack16, pack32 = int.from_bytes, b"".join, _U16.pack_into, _U32.pack_into
    for i in range(count):
        start = header_len + i * gso_size
        chunk = packet[start:start + gso_size]  # bytes: summed and joined without another copy
        size = header_len + len(chunk)
        length = size - offset  # of the TCP segment / UDP datagram
        # the chunk's ones' complement sum, mod 0xFFFF (an odd tail padded with a zero byte); the
        # total is never 0, as the pseudo header's protocol and length are in it
        total = fixed + length + ((from_bytes(chunk, "big") << 8 if len(chunk) & 1 else from_bytes(chunk, "big"))
                                  % 0xFFFF)
        if version == 4:
            ident = (ip_id + i) & 0xFFFF
            pack16(template, 2, size)
            pack16(template, 4, ident)
            pack16(template, 10, ~_fold(ip_fixed + size + ident) & 0xFFFF)
        else:
            pack16(template, 4, length)
        if tcp:
            this_seq = (seq + start - header_len) & 0xFFFFFFFF
            this_flags = flags if i == last else flags & ~(TCP_FIN | TCP_PSH)
            pack32(template, offset + 4, this_seq)
            template[offset + 13] = this_flags
            total += (this_seq >> 16) + (this_seq & 0xFFFF) + this_flags
            pack16(template, checksum_at, ~_fold(total) & 0xFFFF)
        else:
            pack16(template, offset + 4, length)
            total += length  # the UDP length field, besides the pseudo header's
            pack16(template, checksum_at, ~_fold(total) & 0xFFFF or 0xFFFF)
        segments.append(join((template, chunk)))
    return segments


# ---------------------------------------------------------------------------------------------
# Coalescing for the write side


class _Run:
    """Consecutive segments of one TCP flow being merged (the first one's headers lead).

    The segments are kept whole and joined once, when the run is framed (:func:`_frame`). ``mid``
    is what the next full-size segment must carry from ``mid_from`` to the end of the TCP window
    field (addresses, ports, the expected sequence number, ACK, flags, window); with the other
    unchanging bytes (``lead``, ``v4_mid``, ``options``, taken once) it lets :func:`coalesce` take
    such a segment in a few comparisons."""

    __slots__ = ("packets", "flags", "version", "offset", "header_len", "segment", "next_seq", "size", "closed",
                 "full", "head_to", "lead", "v4_mid", "mid_from", "mid_to", "mid", "seq_in_mid", "options_from",
                 "options", "max_size")

    def __init__(self, packet: bytes, version: int, offset: int, header_len: int, seq: int) -> None:
        self.packets = [packet]
        self.flags = packet[offset + 13]  # the TCP flags of the whole (PSH from the last segment)
        self.version = version
        self.offset = offset
        self.header_len = header_len
        self.segment = len(packet) - header_len  # gso_size: every segment but the last has it
        self.next_seq = (seq + self.segment) & 0xFFFFFFFF
        self.size = len(packet)  # of the merged packet
        self.closed = self.segment == 0 or bool(self.flags & TCP_PSH)
        self.full = len(packet)
        self.max_size = MAX_SUPER_PACKET + (40 if version == 6 else 0)  # of the merged packet: its length field
        # IPv4: version/IHL, TOS, total length (then 6:10 flags, TTL, protocol); IPv6: all but addresses
        self.head_to = 4 if version == 4 else 8
        self.lead = packet[:self.head_to]
        self.v4_mid = packet[6:10] if version == 4 else b""
        self.mid_from = 12 if version == 4 else 8
        self.mid_to = offset + 16
        self.mid = bytearray(packet[self.mid_from:self.mid_to])
        self.seq_in_mid = offset + 4 - self.mid_from
        _U32.pack_into(self.mid, self.seq_in_mid, self.next_seq)
        self.options_from = offset + 18  # urgent pointer and options
        self.options = packet[self.options_from:header_len]

    def follows(self, packet: bytes) -> bool:
        """Is ``packet`` the next full-size segment of this run, with equal headers but for the
        IP ID, the sequence number and the checksums? (Else :func:`_can_append` decides.)"""
        return len(packet) == self.full and not self.closed \
            and packet[self.mid_from:self.mid_to] == self.mid \
            and packet[:self.head_to] == self.lead \
            and packet[self.options_from:self.header_len] == self.options \
            and (self.version == 6 or packet[6:10] == self.v4_mid)

    def take(self, packet: bytes, size: int) -> None:
        """Append a segment of ``size`` payload bytes that :meth:`follows` or :func:`_can_append`
        allowed; a short or pushed one, or a full run, ends the run."""
        packets = self.packets
        packets.append(packet)
        self.size += size
        self.next_seq = (self.next_seq + size) & 0xFFFFFFFF
        _U32.pack_into(self.mid, self.seq_in_mid, self.next_seq)
        if size < self.segment or packet[self.offset + 13] & TCP_PSH:
            self.flags |= packet[self.offset + 13] & TCP_PSH
            self.closed = True
        elif len(packets) >= MAX_COALESCED_SEGMENTS or self.size + self.segment > self.max_size:
            self.closed = True  # a full segment more would not fit


def _tcp_candidate(packet: bytes) -> tuple[int, int, int] | None:
    """(version, transport offset, header length) of a plain TCP data segment that may be
    merged: no IPv4 options or fragments, no IPv6 extension headers, only ACK (and PSH) set."""
    n = len(packet)
    if n < 40:
        return None
    version = packet[0] >> 4
    if version == 4:
        if packet[0] != 0x45 or packet[9] != PROTO_TCP or _U16.unpack_from(packet, 6)[0] & 0x3FFF:
            return None  # options, another protocol, or a fragment (MF / offset)
        if _U16.unpack_from(packet, 2)[0] != n:
            return None
        offset = 20
    elif version == 6:
        if n < 60 or packet[6] != PROTO_TCP or _U16.unpack_from(packet, 4)[0] + 40 != n:
            return None
        offset = 40
    else:
        return None
    header_len = offset + (packet[offset + 12] >> 4) * 4
    if header_len > n or header_len < offset + 20:
        return None
    if packet[offset + 13] & ~(TCP_ACK | TCP_PSH) or not packet[offset + 13] & TCP_ACK:
        return None
    return version, offset, header_len


def _flow_key(packet: bytes, version: int, offset: int) -> bytes:
    """Addresses, ports and the ACK number: segments with another ACK are another flow (as
    wireguard-go), so no ACK information is lost by merging."""
    addresses = packet[12:20] if version == 4 else packet[8:40]
    return addresses + packet[offset:offset + 4] + packet[offset + 8:offset + 12]


def _checksum_valid(packet: bytes, version: int, offset: int) -> bool:
    length = len(packet) - offset
    return _fold(ones_complement_sum(memoryview(packet)[offset:]) + _pseudo_sum(packet, version, PROTO_TCP, length)) \
        == 0xFFFF


def _can_append(run: _Run, packet: bytes, header_len: int, seq: int) -> bool:
    if run.closed or len(run.packets) >= MAX_COALESCED_SEGMENTS or header_len != run.header_len:
        return False
    size = len(packet) - header_len
    if size == 0 or size > run.segment or seq != run.next_seq:
        return False
    if run.size + size > run.max_size:
        return False
    head, first, offset = packet, run.packets[0], run.offset
    if run.version == 4:  # TOS, flags (DF), TTL, protocol must match; IDs and lengths differ
        if head[1] != first[1] or head[6] & 0xE0 != first[6] & 0xE0 or head[8] != first[8]:
            return False
    elif head[:4] != first[:4] or head[7] != first[7]:  # traffic class, flow label, hop limit
        return False
    # window, urgent pointer and options equal; flags checked by _tcp_candidate
    return head[offset + 14:offset + 16] == first[offset + 14:offset + 16] \
        and head[offset + 18:header_len] == first[offset + 18:header_len]


def _frame(run: _Run, plain: bytes) -> bytes:
    """A merged run as a GSO frame: IP lengths for the whole, the TCP checksum field holding
    the pseudo-header sum for the kernel to finish (NEEDS_CSUM)."""
    packets, version, offset, header_len = run.packets, run.version, run.offset, run.header_len
    if len(packets) == 1:
        return plain + packets[0]
    head = bytearray(packets[0][:header_len])
    size = run.size
    if version == 4:
        _U16.pack_into(head, 2, size)
        _ipv4_header_checksum(memoryview(head)[:offset])  # type: ignore[arg-type]
        gso_type = GSO_TCPV4
    else:
        _U16.pack_into(head, 4, size - 40)
        gso_type = GSO_TCPV6
    head[offset + 13] = run.flags
    _U16.pack_into(head, offset + 16, _pseudo_sum(head, version, PROTO_TCP, size - offset))
    header = VNET_HDR.pack(F_NEEDS_CSUM, gso_type, header_len, run.segment, offset, 16)
    view = memoryview
    return b"".join([header, head, view(packets[0])[header_len:], *[view(p)[header_len:] for p in packets[1:]]])


def coalesce(packets: list[bytes], authenticated: bool = False) -> list[bytes]:
    """The frames (virtio-net header + packet) to write for ``packets``, in order per flow:
    consecutive in-order TCP segments of one flow with valid checksums become one super-packet,
    every other packet goes alone with an empty header.

    ``authenticated`` packets (decrypted by the engine: Poly1305 vouches for every byte the peer
    sent) are not checked again: they are merged without summing their payloads, and a packet
    that goes alone says DATA_VALID, as kernel WireGuard marks them (CHECKSUM_UNNECESSARY).
    Summing 1.4 KB in Python costs more than the encryption; the kernel's GRO does not trust
    unauthenticated wires, we need not distrust an authenticated one."""
    plain = DATA_VALID if authenticated else NO_OFFLOAD
    if len(packets) == 1:  # what the loop below makes of a lone packet, without its machinery
        return [plain + packets[0]]
    frames: list[bytes | _Run] = []
    runs: dict[bytes, _Run] = {}
    last: _Run | None = None  # the run the previous packet joined: the next one likely follows it
    for packet in packets:
        if last is not None and last.follows(packet) and \
                (authenticated or _checksum_valid(packet, last.version, last.offset)):
            last.take(packet, last.segment)
            continue
        last = None
        candidate = _tcp_candidate(packet)
        if candidate is None:
            frames.append(plain + packet)
            continue
        version, offset, header_len = candidate
        if header_len == len(packet):  # a pure ACK goes alone, and ends its flow's run
            frames.append(plain + packet)
            if runs:
                runs.pop(_flow_key(packet, version, offset), None)
            continue
        if not authenticated and not _checksum_valid(packet, version, offset):
            frames.append(NO_OFFLOAD + packet)  # the kernel checks it and drops it, as it should
            continue
        key = _flow_key(packet, version, offset)
        seq = _U32.unpack_from(packet, offset + 4)[0]
        run = runs.get(key)
        if run is not None and _can_append(run, packet, header_len, seq):
            run.take(packet, len(packet) - header_len)
            last = run
            continue
        run = runs[key] = _Run(packet, version, offset, header_len, seq)
        frames.append(run)
        last = run
    return [f if isinstance(f, bytes) else _frame(f, plain) for f in frames]
