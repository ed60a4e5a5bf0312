"""DNS over TCP to the sentinel addresses (RFC 7766): a small TCP responder of our own, sans-IO.

No host address exists at a sentinel - its packets only pass through the TUN device - so no
kernel socket can accept these connections. This module terminates them itself, as a userspace
stack would, with only what a DNS server needs:

- passive open: SYN -> SYN-ACK (random ISS from the injected RNG, MSS option) -> ACK; the SYN-ACK
  is retransmitted on a timeout; a connection not established by then is forgotten;
- receive: in-order data only (an out-of-order segment is dropped and the expected sequence number
  re-acknowledged, so the client retransmits), every segment acknowledged at once; messages are
  2-byte-length framed and handed out as ``queries`` (connection ID, DNS message);
- send: :meth:`TcpDnsServer.send_answer` frames an answer and sends it in MSS-sized segments
  within the client's window; unacknowledged data is retransmitted after RTO (1 s, doubling),
  and after ``MAX_RETRANSMITS`` the connection is reset;
- close: the client's FIN is acknowledged; once every answer of the connection is sent and
  acknowledged we send our FIN and forget the connection when it is acknowledged. A RST from the
  client (in window) ends it at once; a segment for no connection gets a RST (RFC 9293 3.10.7.1).
  An idle connection (10 s) is closed with FIN, and forgotten 5 s later whatever happens.

Bounds: ``max_connections`` (a SYN beyond it gets a RST), queries waiting per connection, the
receive buffer (a frame cannot exceed 65535 bytes); bad input is a counted drop.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from dataclasses import dataclass, field

from fzpoll.errors import DropReason as D
from fzpoll.gateway.packet import PROTO_TCP, checksums_ok
from fzpoll.ippacket import internet_checksum, ip_header, ones_complement_sum

DNS_PORT = 53
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
MSS = 1220  # fits the IPv6 minimum MTU with headers: no path MTU trouble inside the tunnel
WINDOW = 65535
RTO = 1.0
MAX_RETRANSMITS = 5
IDLE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 256
MAX_QUERIES_PER_CONNECTION = 16
MAX_FRAME = 2 + 65535
TTL = 64

_TCP = struct.Struct("!HHIIBBHHH")
Key = tuple[bytes, int, bytes]  # (client address, client port, sentinel address)


@dataclass(slots=True)
class _Conn:
    ident: int
    key: Key
    iss: int
    rcv_nxt: int
    snd_una: int
    snd_nxt: int
    peer_window: int
    established: bool = False
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)  # bytes from snd_una on
    waiting: int = 0  # queries handed out, not answered yet
    fin_received: bool = False
    fin_sent: bool = False
    rto_at: float | None = None
    rto: float = RTO
    retransmits: int = 0
    idle_at: float = 0.0
    forget_at: float | None = None


def _seq(n: int) -> int:
    return n & 0xFFFFFFFF


def _after(a: int, b: int) -> bool:
    """a > b in sequence space (RFC 1982 style)."""
    return 0 < ((a - b) & 0xFFFFFFFF) < 0x80000000


class TcpDnsServer:
    """TCP port 53 of every sentinel (see the module doc). ``rng`` supplies ISS values."""

    def __init__(self, *, rng: random.Random | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.to_tun: list[bytes] = []
        self.queries: list[tuple[int, bytes, bytes, bytes]] = []  # (conn, message, client, sentinel)
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.max_connections = max_connections
        self._rng = rng if rng is not None else random.SystemRandom()
        self._conns: dict[Key, _Conn] = {}
        self._by_id: dict[int, _Conn] = {}
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------------------ input

    def handle_segment(self, packet: bytes, now: float) -> None:
        """A TCP packet from TUN to a sentinel."""
        header = ip_header(packet)
        if header is None or header[2] != PROTO_TCP or len(header[3]) < 20 or not checksums_ok(packet):
            self.drops[D.BAD_INNER_PACKET] += 1
            return
        src, dst, _, tcp = header
        sport, dport, seq, ack, offset, flags, window, _, _ = _TCP.unpack_from(tcp)
        data_at = (offset >> 4) * 4
        if dport != DNS_PORT or data_at < 20 or data_at > len(tcp):
            self.drops[D.BAD_INNER_PACKET] += 1
            return
        payload = bytes(tcp[data_at:])
        conn = self._conns.get((src, sport, dst))
        if conn is None:
            self._no_connection(src, sport, dst, seq, ack, flags, len(payload), window, now)
            return
        if flags & RST:
            if conn.rcv_nxt == seq or not conn.established:
                self._forget(conn)
                self.stats["tcp_reset_by_client"] += 1
            return
        if flags & SYN:  # a retransmitted SYN: our SYN-ACK was lost
            if not conn.established and seq + 1 == conn.rcv_nxt:
                self._emit(conn, conn.iss, SYN | ACK, mss=True)
            return
        conn.peer_window = window
        conn.idle_at = now + IDLE_TIMEOUT
        if flags & ACK:
            self._on_ack(conn, ack, now)
        if conn.key not in self._conns:
            return
        self._on_data(conn, seq, payload, bool(flags & FIN), now)

    def _no_connection(self, src: bytes, sport: int, dst: bytes, seq: int, ack: int, flags: int,
                       length: int, window: int, now: float) -> None:
        if flags & RST:
            return
        if flags & SYN and not flags & ACK:
            if len(self._conns) >= self.max_connections:
                self.drops[D.BUFFER_FULL] += 1
                self._reset(src, sport, dst, 0, _seq(seq + 1 + length), ACK | RST)
                return
            iss = self._rng.getrandbits(32)
            conn = _Conn(self._next_id, (src, sport, dst), iss, _seq(seq + 1), iss, _seq(iss + 1), window,
                         idle_at=now + IDLE_TIMEOUT)
            self._next_id += 1
            self._conns[conn.key] = conn
            self._by_id[conn.ident] = conn
            self._emit(conn, iss, SYN | ACK, mss=True)
            conn.rto_at = now + conn.rto
            self.stats["tcp_connections"] += 1
            return
        self.stats["tcp_no_connection"] += 1
        if flags & ACK:
            self._reset(src, sport, dst, ack, 0, RST)
        else:
            self._reset(src, sport, dst, 0, _seq(seq + length + (1 if flags & (SYN | FIN) else 0)), ACK | RST)

    def _on_ack(self, conn: _Conn, ack: int, now: float) -> None:
        if not conn.established:
            if ack != conn.snd_nxt:
                return
            conn.established = True
            conn.snd_una = ack
            conn.rto_at, conn.retransmits, conn.rto = None, 0, RTO
            return
        if not _after(ack, conn.snd_una) or _after(ack, conn.snd_nxt):
            return  # old or beyond what we sent
        acked = _seq(ack - conn.snd_una)
        data_acked = min(acked, len(conn.outbuf))
        del conn.outbuf[:data_acked]
        conn.snd_una = ack
        conn.retransmits, conn.rto = 0, RTO
        conn.rto_at = now + conn.rto if conn.snd_una != conn.snd_nxt else None
        if conn.fin_sent and ack == conn.snd_nxt:
            self._forget(conn)
            return
        self._push(conn, now)

    def _on_data(self, conn: _Conn, seq: int, payload: bytes, fin: bool, now: float) -> None:
        if not payload and not fin:
            return
        if seq != conn.rcv_nxt or conn.fin_received:
            self._emit(conn, conn.snd_nxt, ACK)  # out of order or a duplicate: say what we expect
            self.stats["tcp_out_of_order"] += 1
            return
        if len(conn.inbuf) + len(payload) > MAX_FRAME * 2:
            self.drops[D.BUFFER_FULL] += 1
            self._abort(conn)
            return
        conn.inbuf += payload
        conn.rcv_nxt = _seq(conn.rcv_nxt + len(payload) + (1 if fin else 0))
        conn.fin_received = conn.fin_received or fin
        self._take_messages(conn)
        if conn.key in self._conns:
            self._emit(conn, conn.snd_nxt, ACK)
            self._maybe_close(conn, now)

    def _take_messages(self, conn: _Conn) -> None:
        buf = conn.inbuf
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                return
            if conn.waiting >= MAX_QUERIES_PER_CONNECTION:
                self.drops[D.BUFFER_FULL] += 1
                self._abort(conn)
                return
            self.queries.append((conn.ident, bytes(buf[2 : 2 + size]), conn.key[0], conn.key[2]))
            conn.waiting += 1
            del buf[: 2 + size]

    # ------------------------------------------------------------------------------ output

    def client_port(self, ident: int) -> int | None:
        conn = self._by_id.get(ident)
        return conn.key[1] if conn is not None else None

    def send_answer(self, ident: int, message: bytes, now: float) -> None:
        """The stub's answer to a query of connection ``ident`` (dropped if it is gone)."""
        conn = self._by_id.get(ident)
        if conn is None or len(message) > 0xFFFF:
            self.stats["tcp_answer_for_closed"] += 1
            return
        conn.waiting = max(0, conn.waiting - 1)
        conn.outbuf += len(message).to_bytes(2, "big") + message
        self._push(conn, now)

    def _push(self, conn: _Conn, now: float) -> None:
        """Send new data within the client's window."""
        in_flight = _seq(conn.snd_nxt - conn.snd_una)
        while conn.established and in_flight < len(conn.outbuf):
            room = min(MSS, conn.peer_window - in_flight, len(conn.outbuf) - in_flight)
            if room <= 0:
                break
            chunk = bytes(conn.outbuf[in_flight : in_flight + room])
            self._emit(conn, conn.snd_nxt, ACK | PSH, chunk)
            conn.snd_nxt = _seq(conn.snd_nxt + room)
            in_flight += room
            if conn.rto_at is None:
                conn.rto_at = now + conn.rto
        self._maybe_close(conn, now)

    def _maybe_close(self, conn: _Conn, now: float) -> None:
        if conn.fin_received and not conn.fin_sent and not conn.waiting and not conn.outbuf:
            self._send_fin(conn, now)

    def _send_fin(self, conn: _Conn, now: float) -> None:
        self._emit(conn, conn.snd_nxt, FIN | ACK)
        conn.snd_nxt = _seq(conn.snd_nxt + 1)
        conn.fin_sent = True
        conn.rto_at = now + conn.rto
        conn.forget_at = now + CLOSE_TIMEOUT

    def _emit(self, conn: _Conn, seq: int, flags: int, payload: bytes = b"", *, mss: bool = False) -> None:
        client, port, sentinel = conn.key
        self.to_tun.append(_segment(sentinel, client, DNS_PORT, port, seq, conn.rcv_nxt, flags, payload, mss))

    def _reset(self, client: bytes, port: int, sentinel: bytes, seq: int, ack: int, flags: int) -> None:
        self.to_tun.append(_segment(sentinel, client, DNS_PORT, port, seq, ack, flags, b"", False))

    def _abort(self, conn: _Conn) -> None:
        self._emit(conn, conn.snd_nxt, RST | ACK)
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.key, None)
        self._by_id.pop(conn.ident, None)

    # ------------------------------------------------------------------------------ time

    def next_deadline(self) -> float | None:
        deadlines = []
        for conn in self._conns.values():  # while data is unacknowledged, retransmits time it out
            deadlines.append(conn.idle_at if conn.rto_at is None else conn.rto_at)
            if conn.forget_at is not None:
                deadlines.append(conn.forget_at)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.forget_at is not None and now >= conn.forget_at:
                self._forget(conn)
            elif conn.rto_at is not None and now >= conn.rto_at:
                self._retransmit(conn, now)
            elif now >= conn.idle_at and conn.rto_at is None:
                self.stats["tcp_idle_closed"] += 1
                if conn.fin_sent or conn.outbuf:
                    self._abort(conn)
                else:
                    conn.fin_received = True  # close our side as if asked
                    conn.waiting = 0
                    self._send_fin(conn, now)

    def _retransmit(self, conn: _Conn, now: float) -> None:
        if conn.retransmits >= MAX_RETRANSMITS:
            self.stats["tcp_retransmits_exhausted"] += 1
            self._abort(conn)
            return
        conn.retransmits += 1
        conn.rto *= 2
        conn.rto_at = now + conn.rto
        self.stats["tcp_retransmits"] += 1
        if not conn.established:
            self._emit(conn, conn.iss, SYN | ACK, mss=True)
            return
        unacked = _seq(conn.snd_nxt - conn.snd_una) - (1 if conn.fin_sent else 0)
        if unacked > 0:
            chunk = bytes(conn.outbuf[: min(MSS, unacked)])
            self._emit(conn, conn.snd_una, ACK | PSH, chunk)
        elif conn.fin_sent:
            self._emit(conn, _seq(conn.snd_nxt - 1), FIN | ACK)


def _segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
             payload: bytes, mss: bool) -> bytes:
    """An IP packet with one TCP segment from the sentinel, checksums filled in."""
    options = struct.pack("!BBH", 2, 4, MSS) if mss else b""
    offset = (20 + len(options)) // 4 << 4
    tcp = bytearray(_TCP.pack(sport, dport, seq, ack, offset, flags, WINDOW, 0, 0) + options + payload)
    length = len(tcp)
    if len(src) == 4:
        pseudo = ones_complement_sum(src + dst + struct.pack("!BBH", 0, PROTO_TCP, length))
        tcp[16:18] = internet_checksum(tcp, pseudo).to_bytes(2, "big")
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, TTL, PROTO_TCP, 0, src, dst))
        ip[10:12] = internet_checksum(ip).to_bytes(2, "big")
        return bytes(ip) + bytes(tcp)
    pseudo = ones_complement_sum(src + dst + struct.pack("!II", length, PROTO_TCP))
    tcp[16:18] = internet_checksum(tcp, pseudo).to_bytes(2, "big")
    return struct.pack("!IHBB16s16s", 6 << 28, length, PROTO_TCP, TTL, src, dst) + bytes(tcp)
