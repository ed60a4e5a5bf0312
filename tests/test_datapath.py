"""The loop and datapath on real sockets: a datagram socketpair stands in for the TUN device, UDP on loopback."""

from __future__ import annotations

import logging
import socket

import pytest

from fzpoll.errors import DropReason as D
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop
from helpers import TUN_A, TUN_B, Pair, ip4


class Rig:
    """Engine ``b`` of a Pair run by a real Loop and Datapath; engine ``a`` is driven by hand over UDP."""

    def __init__(self, schedule: str = "fair", batch_size: int = 8, max_pending: int = 1024) -> None:
        self.pair = Pair()
        self.tun_app, self.tun_dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun_dev.setblocking(False)
        self.tun_app.setblocking(False)
        self.udp_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_b.bind(("127.0.0.1", 0))
        self.udp_b.setblocking(False)
        self.udp_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_a.bind(("127.0.0.1", 0))
        self.udp_a.settimeout(2)
        self.addr_a = self.udp_a.getsockname()
        self.addr_b = self.udp_b.getsockname()
        self.pair.peer_b.endpoint = self.addr_b
        self.pair.peer_a.endpoint = self.addr_a
        self.loop = Loop(schedule=schedule, clock=lambda: self.pair.now)
        self.datapath = Datapath(self.pair.b, self.loop, self.tun_dev.fileno(), batch_size=batch_size,
                                 max_pending=max_pending)
        self.datapath.set_udp_sockets([self.udp_b])

    def a_to_b(self, datagrams: list[bytes]) -> None:
        for d in datagrams:
            self.udp_a.sendto(d, self.addr_b)

    def pump_a(self) -> None:
        """Deliver what b sent to a (handshake responses etc.)."""
        self.udp_a.setblocking(False)
        try:
            while True:
                data, _ = self.udp_a.recvfrom(65535)
                self.pair.a.receive(data, self.addr_b, self.pair.now)
        except BlockingIOError:
            pass
        finally:
            self.udp_a.settimeout(2)

    def handshake(self) -> None:
        self.pair.a.send(ip4(TUN_A, TUN_B, b"hi"), self.pair.now)
        self.a_to_b(self.pair.take(self.pair.a))
        self.loop.run_once(max_timeout=1)
        self.pump_a()  # response -> a sends the staged packet
        self.a_to_b(self.pair.take(self.pair.a))
        self.loop.run_once(max_timeout=1)
        assert self.tun_app.recv(65535) == ip4(TUN_A, TUN_B, b"hi")

    def tun_packets(self) -> list[bytes]:
        out = []
        try:
            while True:
                out.append(self.tun_app.recv(65535))
        except BlockingIOError:
            return out

    def close(self) -> None:
        self.loop.close()
        for s in (self.tun_app, self.tun_dev, self.udp_a, self.udp_b):
            s.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_bad_packets_in_a_batch_cost_only_themselves(rig, caplog):
    rig.handshake()
    p = rig.pair
    good = []
    for i in range(3):
        p.a.send(ip4(TUN_A, TUN_B, b"good%d" % i), p.now)
        good.extend(p.take(p.a))
    replay = good[0]
    junk = b"\x04\x00\x00\x00" + b"\xff" * 40
    tampered = good[1][:-1] + bytes([good[1][-1] ^ 1])
    batch = [junk, good[0], replay, b"\x01", tampered, good[1], good[2], b"\x09\x00\x00\x00junk"]
    rig.a_to_b(batch)
    with caplog.at_level(logging.WARNING, logger="fzpoll.io.loop"):
        rig.loop.run_once(max_timeout=1)
    assert rig.tun_packets() == [ip4(TUN_A, TUN_B, b"good%d" % i) for i in range(3)]
    records = [r for r in caplog.records if r.name == "fzpoll.io.loop"]
    assert len(records) == 1  # the aggregate error, logged once after the pass
    counts = records[0].fields["counts"]
    assert counts == {D.UNKNOWN_INDEX: 1, D.REPLAYED: 1, D.TOO_SHORT: 1, D.BAD_TAG: 1, D.BAD_TYPE: 1}
    assert rig.loop.last_error is not None
    assert sorted(rig.loop.last_error.counts().items()) == sorted(counts.items())


def test_an_exception_on_one_packet_does_not_abort_the_batch(rig, monkeypatch):
    rig.handshake()
    p = rig.pair
    datagrams = []
    for i in range(4):
        p.a.send(ip4(TUN_A, TUN_B, b"p%d" % i), p.now)
        datagrams.extend(p.take(p.a))
    real = p.b._deliver  # a bug in the engine's batch, on the second datagram only
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bug on one packet")
        return real(*args)

    monkeypatch.setattr(p.b, "_deliver", flaky)
    rig.a_to_b(datagrams)
    rig.loop.run_once(max_timeout=1)
    assert len(rig.tun_packets()) == 3
    assert rig.loop.last_error.counts() == {"RuntimeError": 1}


def _fill(rig: Rig, udp_junk: int, tun_packets: int) -> None:
    rig.a_to_b([b"\x04\x00\x00\x00" + bytes(40)] * udp_junk)
    for i in range(tun_packets):
        rig.tun_app.send(ip4(TUN_B, TUN_A, b"t%d" % i))


@pytest.mark.parametrize("schedule", ["fair", "priority"])
def test_fair_schedule_serves_tun_while_udp_is_flooded(schedule):
    rig = Rig(schedule=schedule, batch_size=8)
    try:
        rig.handshake()
        _fill(rig, udp_junk=64, tun_packets=4)
        rig.loop.run_once(max_timeout=1)
        rig.udp_a.setblocking(False)
        got = []
        try:
            while True:
                got.append(rig.udp_a.recvfrom(65535)[0])
        except BlockingIOError:
            pass
        if schedule == "fair":
            assert len(got) == 4  # every TUN packet went out in the first pass
            assert rig.datapath.stats.udp_packets >= 8
        else:
            assert got == []  # strict priority: UDP had more, so TUN waited
    finally:
        rig.close()


@pytest.mark.parametrize("sent, first", [(6, 3), (2, 1)])  # (2, 1): a lone packet meets the full TUN
def test_backpressure_stops_reading_udp_while_tun_output_is_blocked(sent: int, first: int):
    rig = Rig(max_pending=4)
    try:
        _backpressure(rig, sent, first)
    finally:
        rig.close()


def _backpressure(rig: Rig, sent: int = 6, first: int = 3) -> None:
    """``sent`` datagrams while TUN writes meet EAGAIN, ``first`` of them in the first pass."""
    rig.handshake()
    p = rig.pair
    # fill the fake TUN's socket buffer so writes meet EAGAIN
    filler = b"x" * 1000
    try:
        while True:
            rig.tun_dev.send(filler)
    except BlockingIOError:
        pass
    datagrams = []
    for i in range(sent):
        p.a.send(ip4(TUN_A, TUN_B, b"bp%d" % i), p.now)
        datagrams.extend(p.take(p.a))
    rig.a_to_b(datagrams[:first])
    rig.loop.run_once(max_timeout=1)
    assert rig.datapath.pending_writes()["tun"] == first
    rig.a_to_b(datagrams[first:])
    rig.loop.run_once(max_timeout=0.05)
    assert rig.datapath.pending_writes()["tun"] == first  # UDP was not read: the burst waits in the kernel
    drained = rig.tun_packets()  # the application reads: TUN writable again
    assert len(drained) > first
    for _ in range(3):
        rig.loop.run_once(max_timeout=0.05)
    rest = rig.tun_packets()
    delivered = [x for x in drained + rest if x != filler]
    assert delivered == [ip4(TUN_A, TUN_B, b"bp%d" % i) for i in range(sent)]  # nothing lost, in order


def test_idle_poller_sleeps_until_the_engine_deadline(rig):
    rig.handshake()
    deadline = rig.loop.next_deadline()
    assert deadline is not None and deadline > rig.pair.now  # the keepalive timer, not a busy loop


def test_under_load_a_pass_sheds_handshakes_beyond_its_budget_but_keeps_data(rig):
    from fzpoll.wireguard.constants import MAX_HANDSHAKES_PER_PASS

    rig.handshake()
    p = rig.pair
    p.b.assume_under_load(1e9)
    p.peer_b.last_sent_handshake_at = float("-inf")
    p.a.initiate_handshake(p.peer_b, p.now)
    initiation = p.take(p.a)[0]
    p.a.send(ip4(TUN_A, TUN_B, b"data"), p.now)
    data = p.take(p.a)[0]
    flood = [initiation] * 30
    rig.a_to_b(flood[:15] + [data] + flood[15:])
    rig.datapath.batch_size = 64
    rig.loop.run_once(max_timeout=1)
    assert rig.tun_packets() == [ip4(TUN_A, TUN_B, b"data")]
    assert p.b.drops[D.HANDSHAKE_SHED] == 30 - MAX_HANDSHAKES_PER_PASS


def test_packets_queued_for_tun_by_another_source_are_written_once(rig):
    """queue_tun (the DNS stub's answers) has its own outbox: a pass in which the engine produced
    nothing writes them once, and the next pass does not write them again."""
    rig.handshake()
    answer = ip4(TUN_B, TUN_A, b"dns answer")
    sent: list[int] = []
    rig.loop.add_flusher(lambda now: rig.datapath.queue_tun([answer]) if not sent else None)
    rig.loop.run_pass([], rig.pair.now)
    sent.append(1)
    assert rig.tun_packets() == [answer]
    rig.loop.run_pass([], rig.pair.now)
    assert rig.tun_packets() == []


def test_a_lone_bad_packet_is_counted_and_reported(rig, caplog):
    rig.handshake()
    rig.a_to_b([b"\x04\x00\x00\x00" + b"\xff" * 40])
    with caplog.at_level(logging.WARNING, logger="fzpoll.io.loop"):
        rig.loop.run_once(max_timeout=1)
    assert rig.loop.last_error.counts() == {D.UNKNOWN_INDEX: 1}
    assert rig.pair.b.drops[D.UNKNOWN_INDEX] == 1
    assert rig.tun_packets() == []


def test_intercepted_packets_keep_their_place_among_those_for_the_engine(rig):
    """The interceptor (DNS resources) may send a packet of its own through the engine: it goes
    out between the packets read before and after the one it took, as it did one by one."""
    rig.handshake()
    p = rig.pair
    sentinel = ip4(TUN_B, "100.100.111.1", b"query")
    offered = []

    def intercept(packet: bytes, now: float) -> bool:
        offered.append(packet)
        if packet.endswith(b"boom"):
            raise RuntimeError("a bug in the interceptor")
        if packet.endswith(b"pass"):
            return False  # not consumed: the engine gets it (no route: dropped there)
        p.b.send(ip4(TUN_B, TUN_A, b"answer"), now)
        return True

    sentinels = frozenset({bytes([100, 100, 111, 1])})
    rig.datapath.set_intercept(intercept, sentinels, frozenset())
    batch = [ip4(TUN_B, TUN_A, b"one"), sentinel, ip4(TUN_B, TUN_A, b"two"),
             ip4(TUN_B, "100.100.111.1", b"pass"), ip4(TUN_B, "100.100.111.1", b"boom"), ip4(TUN_B, TUN_A, b"three")]
    for packet in batch:
        rig.tun_app.send(packet)
    rig.loop.run_once(max_timeout=1)
    assert offered == batch[1:2] + batch[3:5]
    rig.pump_a()
    assert p.tun(p.a) == [ip4(TUN_B, TUN_A, x) for x in (b"one", b"answer", b"two", b"three")]
    assert p.b.drops[D.NO_ROUTE] == 1
    assert rig.loop.last_error.counts() == {"RuntimeError": 1, D.NO_ROUTE: 1}
