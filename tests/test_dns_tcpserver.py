"""DNS over TCP to the sentinels (fzpoll.dns.tcpserver), driven with a fake clock."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import gwpackets as g
from fzpoll.dns.tcpserver import (
    CLOSE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    IDLE_TIMEOUT,
    MAX_RETRANSMITS,
    MSS,
    RTO,
    TcpDnsServer,
)

FUZZ = settings(max_examples=200, deadline=None, derandomize=True)
CLIENT, SENTINEL = "100.64.0.2", "100.100.111.1"
SYN, FIN, RST, PSH, ACK = g.SYN, g.FIN, g.RST, 0x08, g.ACK


def seg(packet: bytes) -> tuple[int, int, int, bytes]:
    """(seq, ack, flags, payload) of a segment we sent."""
    ihl = (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40
    _, _, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", packet, ihl)
    return seq, ack, flags, packet[ihl + (offset >> 4) * 4 :]


class Client:
    def __init__(self, server: TcpDnsServer, port: int = 40000, client: str = CLIENT, sentinel: str = SENTINEL):
        self.server, self.port, self.client, self.sentinel = server, port, client, sentinel
        self.seq = 1000
        self.ack = 0

    def send(self, flags: int, payload: bytes = b"", now: float = 0.0, seq: int | None = None):
        packet = g.tcp(self.client, self.sentinel, self.port, 53, flags, payload,
                       seq=self.seq if seq is None else seq, ack=self.ack)
        self.server.handle_segment(packet, now)
        if seq is None:
            self.seq += len(payload) + (1 if flags & (SYN | FIN) else 0)

    def take(self) -> list[tuple[int, int, int, bytes]]:
        out, self.server.to_tun = self.server.to_tun, []
        assert all(g.verify(p) for p in out)
        return [seg(p) for p in out]

    def connect(self, now: float = 0.0) -> None:
        self.send(SYN, now=now)
        (seq, ack, flags, _), = self.take()
        assert flags == SYN | ACK and ack == self.seq
        self.ack = seq + 1
        self.send(ACK, now=now)


def frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def test_handshake_query_answer_and_graceful_close() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(ACK | PSH, frame(b"query-1"), now=0.1)
    assert [s[2] for s in c.take()] == [ACK]
    (ident, message, client, sentinel), = server.queries
    server.queries.clear()
    assert message == b"query-1" and client == bytes([100, 64, 0, 2])
    server.send_answer(ident, b"answer-1", 0.2)
    (seq, ack, flags, payload), = c.take()
    assert payload == frame(b"answer-1") and flags & ACK and ack == c.seq and seq == c.ack
    c.ack += len(payload)
    c.send(ACK, now=0.3)
    c.send(FIN | ACK, now=0.4)
    out = c.take()
    assert [s[2] for s in out] == [ACK, FIN | ACK]
    c.ack += 1
    c.send(ACK, now=0.5)
    assert len(server) == 0 and server.next_deadline() is None


def test_fin_waits_for_pending_answers() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(ACK | PSH | FIN, frame(b"q"), now=0.1)  # query and half-close at once
    assert [s[2] for s in c.take()] == [ACK]
    ident = server.queries.pop()[0]
    server.send_answer(ident, b"a", 0.2)
    out = c.take()
    assert out[0][3] == frame(b"a")
    c.ack += 3
    c.send(ACK, now=0.3)
    assert [s[2] for s in c.take()] == [FIN | ACK]


def test_two_messages_in_one_segment_and_one_split_over_two() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(ACK, frame(b"one") + frame(b"two")[:3], now=0.1)
    c.send(ACK, frame(b"two")[3:], now=0.1)
    assert [q[1] for q in server.queries] == [b"one", b"two"]


def test_out_of_order_segment_is_dropped_and_reacked() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.take()
    c.send(ACK, b"later", now=0.1, seq=c.seq + 10)
    (_, ack, flags, _), = c.take()
    assert ack == c.seq and flags == ACK and server.queries == []


def test_large_answer_is_segmented_and_retransmitted() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(ACK, frame(b"q"), now=0.1)
    c.take()
    ident = server.queries.pop()[0]
    answer = bytes(range(256)) * 12  # 3072 bytes: three segments
    server.send_answer(ident, answer, 0.2)
    out = c.take()
    assert [len(s[3]) for s in out] == [MSS, MSS, len(answer) + 2 - 2 * MSS]
    assert b"".join(s[3] for s in out) == frame(answer)
    assert server.next_deadline() == 0.2 + RTO
    c.ack += MSS  # only the first arrived
    c.send(ACK, now=0.3)
    assert c.take() == []
    server.handle_timer(0.3 + RTO)
    (seq, _, _, payload), = c.take()
    assert seq == c.ack and payload == frame(answer)[MSS : 2 * MSS]


def test_retransmits_give_up_with_a_reset() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(ACK, frame(b"q"), now=0.0)
    c.take()
    server.send_answer(server.queries.pop()[0], b"a", 0.0)
    c.take()
    now = 0.0
    for _ in range(MAX_RETRANSMITS):
        now = server.next_deadline()
        server.handle_timer(now)
        assert len(c.take()) == 1
    server.handle_timer(server.next_deadline())
    assert [s[2] for s in c.take()] == [RST | ACK] and len(server) == 0


def test_lost_syn_ack_is_retransmitted_and_unfinished_handshake_forgotten() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.send(SYN, now=0.0)
    first = c.take()
    server.handle_timer(RTO)
    assert c.take() == first
    for _ in range(10):
        deadline = server.next_deadline()
        if deadline is None:
            break
        server.handle_timer(deadline)
    assert len(server) == 0


def test_client_reset_ends_the_connection() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.send(RST, now=0.1)
    assert len(server) == 0


def test_segment_for_no_connection_gets_a_reset() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.ack = 555
    c.send(ACK, b"stray", now=0.0)
    (seq, _, flags, _), = c.take()
    assert flags == RST and seq == 555
    c.send(RST, now=0.0)
    assert c.take() == []


def test_connections_are_bounded() -> None:
    server = TcpDnsServer(rng=random.Random(1), max_connections=2)
    for port in (1, 2):
        Client(server, port=port).connect()
    extra = Client(server, port=3)
    extra.send(SYN)
    assert [s[2] for s in extra.take()][-1] == RST | ACK and len(server) == 2


def test_idle_connection_is_closed_then_forgotten() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect(now=0.0)
    c.take()
    server.handle_timer(IDLE_TIMEOUT)
    assert [s[2] for s in c.take()] == [FIN | ACK]
    for _ in range(10):
        deadline = server.next_deadline()
        if deadline is None:
            break
        server.handle_timer(deadline)
    assert len(server) == 0 and server.next_deadline() is None
    assert deadline is None or deadline <= IDLE_TIMEOUT + CLOSE_TIMEOUT


def test_ipv6() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server, client="fd00:2021:1111::2", sentinel="fd00:2021:1111:8000:100:100:111:1")
    c.connect()
    c.send(ACK, frame(b"q6"), now=0.1)
    assert server.queries[0][1] == b"q6"


def test_corrupt_checksum_is_a_drop() -> None:
    server = TcpDnsServer(rng=random.Random(1))
    packet = bytearray(g.tcp(CLIENT, SENTINEL, 1, 53, SYN))
    packet[-1] ^= 1
    server.handle_segment(bytes(packet), 0.0)
    assert server.to_tun == [] and len(server) == 0 and sum(server.drops.values()) == 1


def snapshot(server: TcpDnsServer) -> tuple:
    return [(c.key, c.rcv_nxt, c.snd_una, c.snd_nxt, bytes(c.inbuf), bytes(c.outbuf), c.established,
             c.fin_received, c.fin_sent) for c in server._conns.values()], list(server.queries)


@FUZZ
@given(st.binary(max_size=120))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    before = snapshot(server)
    server.handle_segment(data, 1.0)
    assert snapshot(server) == before


@FUZZ
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.sampled_from([ACK, ACK | PSH, FIN | ACK, RST, SYN]),
       st.binary(max_size=40))
def test_fuzz_out_of_window_segments_do_not_move_state(seq: int, ack: int, flags: int, payload: bytes) -> None:
    server = TcpDnsServer(rng=random.Random(1))
    c = Client(server)
    c.connect()
    c.take()
    conn = next(iter(server._conns.values()))
    if seq == conn.rcv_nxt or flags == SYN:
        return
    before = snapshot(server)
    packet = g.tcp(CLIENT, SENTINEL, 40000, 53, flags, payload, seq=seq, ack=ack)
    server.handle_segment(packet, 1.0)
    state, queries = snapshot(server)
    if flags & RST:
        assert state == before[0]  # an RST out of sequence is ignored
    else:
        assert [s[:2] for s in state] == [s[:2] for s in before[0]] and queries == before[1]
    assert DEFAULT_MAX_CONNECTIONS >= len(server)
