"""A lone packet's pass (issue 16, latency): what the pass must still do while it calls as little
as it can - the TUN re-read writes the kernel's answer in the same pass, a flusher (the kernel
prefilter) sees a receiver index before the handshake message announcing it leaves, auxiliary
callbacks run whenever one of their fds is among the events, and drops are counted as before."""

from __future__ import annotations

import random
import select
import socket

import pytest

from fzpoll.errors import DropReason as D
from fzpoll.io import sockfilter
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PrivateKey
from helpers import TUN_A, TUN_B, ip4
from test_datapath import Rig

TUN_C = "10.0.0.3"


@pytest.fixture
def rig():
    r = Rig()
    r.handshake()
    yield r
    r.close()


def _inject_once(rig: Rig, packet: bytes) -> list[int]:
    """A flusher that puts ``packet`` in the TUN queue in the first pass it runs in, after that
    pass's epoll wait and before its writes: what the kernel does when it answers a write (the
    TUN fd is not among the pass's events, so only the re-read can take it)."""
    calls: list[int] = []

    def flusher(now: float) -> None:
        if not calls:
            rig.tun_app.send(packet)
        calls.append(1)

    rig.loop.add_flusher(flusher)
    return calls


def _received_by_a(rig: Rig) -> list[bytes]:
    """What ``a`` decrypts from the datagrams waiting on its socket now (no further pass)."""
    rig.pump_a()
    return rig.pair.tun(rig.pair.a)


def test_a_reread_pass_writes_the_answer_in_the_same_pass(rig):
    request, answer = ip4(TUN_A, TUN_B, b"request"), ip4(TUN_B, TUN_A, b"answer")
    calls = _inject_once(rig, answer)
    rig.pair.a.send(request, rig.pair.now)
    rig.a_to_b(rig.pair.take(rig.pair.a))
    passes = rig.loop.passes
    rig.loop.run_once(max_timeout=1)
    assert rig.loop.passes == passes + 1
    assert rig.tun_packets() == [request]
    assert _received_by_a(rig) == [answer]  # read, encrypted and sent in that one pass
    assert len(calls) == 2  # the flushers ran again before the re-read's writes
    assert rig.loop.last_error is None and dict(rig.pair.b.drops) == {}


def test_drops_in_a_reread_are_counted_and_reported_once(rig):
    """A packet the re-read takes that the engine refuses (no route) is counted like one the
    pass's first read took: in the engine's drops and in the pass's one aggregate error."""
    _inject_once(rig, ip4(TUN_B, "10.9.9.9", b"nowhere"))
    rig.pair.a.send(ip4(TUN_A, TUN_B, b"request"), rig.pair.now)
    rig.a_to_b(rig.pair.take(rig.pair.a) + [b"\x04\x00\x00\x00" + b"\xff" * 40])
    rig.datapath.batch_size = 8
    rig.loop.run_once(max_timeout=1)
    rig.loop.run_once(max_timeout=1)  # the rest, if the first pass took only one datagram
    assert rig.pair.b.drops[D.NO_ROUTE] == 1 and rig.pair.b.drops[D.UNKNOWN_INDEX] == 1
    assert rig.loop.report.errors == {D.NO_ROUTE: 1, D.UNKNOWN_INDEX: 1}


def test_the_prefilter_has_a_new_index_before_the_initiation_leaves(rig):
    """The re-read's packet goes to a peer without a session: the initiation it starts names a
    new receiver index, which must be in the kernel prefilter before the initiation is sent (the
    response could come back before the next pass), and the response then passes the kernel."""
    b = rig.pair.b
    rng = random.Random(7)
    key_c = PrivateKey.generate(rng.randbytes)
    c = Engine(key_c, random_bytes=rng.randbytes, wall_time=rig.pair.clock.wall)
    udp_c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_c.bind(("127.0.0.1", 0))
    udp_c.setblocking(False)
    try:
        peer_c = b.add_peer(key_c.public_key)
        b.add_allowed_ip(peer_c, TUN_C + "/32")
        b.set_endpoint(peer_c, udp_c.getsockname())
        peer_b = c.add_peer(b.public_key)
        c.add_allowed_ip(peer_b, TUN_B + "/32")
        prefilter = sockfilter.PrefilterControl(b, gro=rig.datapath.offloads()["gro"], check_indices=True)
        assert prefilter.set_sockets([rig.udp_b], rig.datapath.offloads()["gro"])
        to_c = ip4(TUN_B, TUN_C, b"to c")
        _inject_once(rig, to_c)
        rig.loop.add_flusher(prefilter)
        seen: list[tuple[frozenset[int], bool]] = []  # per flusher run: filtered indices, initiation gone

        def recorder(now: float) -> None:
            try:
                udp_c.recv(1, socket.MSG_PEEK)
                gone = True
            except BlockingIOError:
                gone = False
            seen.append((prefilter._indices, gone))

        rig.loop.add_flusher(recorder)
        rig.pair.a.send(ip4(TUN_A, TUN_B, b"request"), rig.pair.now)
        rig.a_to_b(rig.pair.take(rig.pair.a))
        rig.loop.run_once(max_timeout=1)
        initiation, source = udp_c.recvfrom(65535)
        index = int.from_bytes(initiation[4:8], "little")
        assert any(index in indices and not gone for indices, gone in seen)
        assert c.receive(initiation, source, rig.pair.now) is None
        for response, *_ in c.datagrams_to_send():
            udp_c.sendto(response, rig.addr_b)
        rig.loop.run_once(max_timeout=1)  # the response passes the kernel: b sends what it staged
        udp_c.settimeout(2)
        data, _ = udp_c.recvfrom(65535)
        assert c.receive(data, source, rig.pair.now) is None
        assert c.packets_for_tun() == [to_c]
    finally:
        udp_c.close()


def test_aux_callbacks_run_when_their_fd_comes_with_data(rig):
    """A pass whose events hold data fds and auxiliary fds runs the auxiliary callbacks (readers
    on EPOLLIN, writers on EPOLLOUT, readers on an error), whatever their place in the events."""
    r, w = socket.socketpair()
    try:
        got: list[str] = []
        rig.loop.add_reader(r.fileno(), lambda now: got.append("read"))
        rig.loop.add_writer(w.fileno(), lambda now: got.append("write"))
        data = (rig.udp_b.fileno(), select.EPOLLIN)
        for events in ([data, (r.fileno(), select.EPOLLIN)], [(w.fileno(), select.EPOLLOUT), data],
                       [data, (r.fileno(), select.EPOLLHUP)], [data]):
            got.clear()
            rig.loop.run_pass(events, rig.pair.now, None)
            fds = {fd for fd, _ in events}
            assert got == (["read"] if r.fileno() in fds else []) + (["write"] if w.fileno() in fds else [])
    finally:
        rig.loop.remove_reader(r.fileno())
        rig.loop.remove_writer(w.fileno())
        r.close()
        w.close()


def test_every_ready_udp_socket_is_read_in_one_pass(rig):
    """Two UDP sockets and the TUN device ready in one pass: all three are read in it."""
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second.bind(("127.0.0.1", 0))
    second.setblocking(False)
    rig.datapath.set_udp_sockets([rig.udp_b, second])
    p = rig.pair
    for target in (rig.addr_b, second.getsockname()):
        p.a.send(ip4(TUN_A, TUN_B, f"to {target[1]}".encode()), p.now)
        for d in p.take(p.a):
            rig.udp_a.sendto(d, target)
    rig.tun_app.send(ip4(TUN_B, TUN_A, b"outbound"))
    ready = select.epoll()
    try:
        for fd in (rig.udp_b.fileno(), second.fileno(), rig.tun_dev.fileno()):
            ready.register(fd, select.EPOLLIN)
        events = []
        for _ in range(50):
            events = ready.poll(0.1)
            if len(events) == 3:
                break
        assert len(events) == 3
    finally:
        ready.close()
    stats = rig.datapath.stats
    udp, tun = stats.udp_packets, stats.tun_packets
    rig.loop.run_pass(events, p.now, None)
    assert (stats.udp_packets - udp, stats.tun_packets - tun) == (2, 1)
    assert sorted(rig.tun_packets()) == sorted(ip4(TUN_A, TUN_B, f"to {t[1]}".encode())
                                               for t in (rig.addr_b, second.getsockname()))
    assert _received_by_a(rig) == [ip4(TUN_B, TUN_A, b"outbound")]
    second.close()


def test_the_prefilter_samples_replays_once_per_check_interval() -> None:
    """The replay rate is sampled at most every REPLAY_FLOOD_CHECK, in whichever pass comes
    after it (a field compared in every pass): not in the passes between."""
    class Engine_:
        drops = {D.REPLAYED: 0}

        def is_under_load(self, now: float) -> bool:
            return False

        def index_generation(self) -> int:
            return 0

        def live_indices(self) -> frozenset[int]:
            return frozenset()

    control = sockfilter.PrefilterControl(Engine_(), gro=False, check_indices=True)
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert control.set_sockets([r], gro=False)
        samples: list[float] = []
        sample = control.replay.sample
        control.replay.sample = lambda now, *a: samples.append(now) or sample(now, *a)  # type: ignore[method-assign]
        step = sockfilter.REPLAY_FLOOD_CHECK
        for now in (0.01, step * 0.5, step, step * 1.5, step * 1.9, step * 2.1, step * 10):
            control(now)
        assert samples == [step, step * 2.1, step * 10]
    finally:
        r.close()
