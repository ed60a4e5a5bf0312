"""Sticky source addresses: the engine keeps, per peer, the local address its latest authenticated
datagram came to and hands it back with what it sends; UDP reads it from the pktinfo control
message and sends from it (on loopback: 127.0.0.1 and 127.0.0.2 are both ours, no root needed).
End to end against real peers: tests/test_sticky_netns.py."""

from __future__ import annotations

import socket

import pytest

from fzpoll.errors import DropReason as D
from fzpoll.io import pktinfo
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop
from fzpoll.io.report import Drops
from fzpoll.io.udp import SOL_UDP, UDP_SEGMENT, UdpSockets
from fzpoll.wireguard.constants import MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX
from helpers import ADDR_A, ADDR_B, TUN_A, TUN_B, Pair, established, ip4

L1, L2 = ("local", 1), ("local", 2)  # the engine only keeps and compares what the IO shell gives


def data_from_a(p: Pair, payload: bytes = b"x", src: str = TUN_A) -> bytes:
    p.a.send(ip4(src, TUN_B, payload), p.now)
    (data,) = p.take(p.a)
    return data


# ------------------------------------------------------------------------------- the engine


def test_what_we_send_leaves_from_where_the_latest_authenticated_datagram_came():
    p = established()
    assert p.b.receive(data_from_a(p), ADDR_A, p.now, L1) is None
    p.b.send(ip4(TUN_B, TUN_A), p.now)
    assert [(a, local) for _, a, local in p.out(p.b)] == [(ADDR_A, L1)]
    p.out(p.b).clear()
    forged = bytearray(data_from_a(p))
    forged[-1] ^= 1
    assert p.b.receive(bytes(forged), ADDR_A, p.now, L2) == D.BAD_TAG
    assert p.peer_a.local == L1  # what does not authenticate moves nothing
    # authentic but refused by cryptokey routing: the source moves with the endpoint
    assert p.b.receive(data_from_a(p, src="10.9.9.9"), ADDR_A, p.now, L2) == D.NOT_ALLOWED_SOURCE
    assert p.peer_a.local == L2


def test_handshake_messages_are_answered_from_where_they_came():
    p = Pair()
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    (init,) = p.take(p.a)
    assert p.b.receive(init, ADDR_A, p.now, L1) is None
    (response,) = p.out(p.b)
    assert response[1:] == (ADDR_A, L1)
    p.out(p.b).clear()
    assert p.a.receive(response[0], ADDR_B, p.now, L2) is None
    assert [local for *_, local in p.out(p.a)] == [L2]  # the staged packet goes from there


def test_a_cookie_reply_under_load_leaves_from_where_the_initiation_came():
    p = Pair()
    p.b.assume_under_load(1e9)
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    (init,) = p.take(p.a)
    assert p.b.receive(init, ADDR_A, p.now, L1) == D.BAD_MAC2
    ((reply, addr, local),) = p.out(p.b)
    assert reply[0] == 3 and (addr, local) == (ADDR_A, L1)


def test_the_sticky_source_is_forgotten_on_a_new_endpoint_a_gone_address_and_a_retry():
    p = established()
    p.b.receive(data_from_a(p), ADDR_A, p.now, L1)
    p.b.forget_local(L2)
    assert p.peer_a.local == L1
    p.b.forget_local(L1)  # the IO shell could not send from it
    assert p.peer_a.local is None
    p.b.receive(data_from_a(p), ADDR_A, p.now, L1)
    p.b.forget_local()  # all of them: new sockets, or a new fwmark
    assert p.peer_a.local is None
    p.b.receive(data_from_a(p), ADDR_A, p.now, L1)
    p.b.set_endpoint(p.peer_a, ADDR_A)  # configured: from the kernel's choice
    assert p.peer_a.local is None
    # A handshake that goes unanswered is retried without it (as the kernel and wireguard-go).
    p.b.receive(data_from_a(p), ADDR_A, p.now, L1)
    p.out(p.b).clear()
    p.b.initiate_handshake(p.peer_a, p.now)
    assert [local for *_, local in p.out(p.b)] == [L1]
    p.out(p.b).clear()
    p.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    assert p.peer_a.local is None and p.peer_a.handshake_attempts == 1 <= MAX_TIMER_HANDSHAKES
    assert [local for *_, local in p.out(p.b)] == [None]


# ------------------------------------------------------------------------------- UDP


@pytest.fixture
def loop():
    loop = Loop()
    yield loop
    loop.close()


def test_new_sockets_forget_every_sticky_source(loop):
    p = established()
    p.b.receive(data_from_a(p), ADDR_A, p.now, L1)
    Datapath(p.b, loop, None).set_udp_sockets([])  # a new listen port (as wireguard-go's BindUpdate)
    assert p.peer_a.local is None


def udp(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, 0))
    s.setblocking(False)
    return s


def read(sockets: UdpSockets, want: int) -> list:
    got: list = []
    failures: list[Exception] = []
    for _ in range(200):
        for fd, sock in sockets.by_fd.items():
            sockets.read(fd, sock, got, failures, 64)
        if len(got) >= want:
            break
    assert failures == []
    return got


def recv_all(sock: socket.socket, want: int) -> list[tuple[bytes, tuple]]:
    sock.settimeout(2)
    return [sock.recvfrom(65535) for _ in range(want)]


@pytest.mark.parametrize("family, ours, other", [(socket.AF_INET, "127.0.0.2", "127.0.0.1"),
                                                  (socket.AF_INET6, "::1", None)], ids=["ipv4", "ipv6"])
def test_a_reply_leaves_from_the_address_the_datagram_came_to(loop, family, ours, other):
    wildcard = "0.0.0.0" if family == socket.AF_INET else "::"
    try:
        server, client = udp(family, wildcard), udp(family, "::1" if family == socket.AF_INET6 else "127.0.0.1")
    except OSError:
        pytest.skip("no IPv6 on loopback")
    sockets = UdpSockets(loop)
    sockets.replace([server])
    port = server.getsockname()[1]
    client.sendto(b"one", (ours, port))
    client.sendto(b"two", (ours, port))
    (_, addr, local), (_, _, again) = read(sockets, 2)
    assert local.address == ours and again is local  # one object per source: no parsing per datagram
    assert local.ifindex == (0 if family == socket.AF_INET else socket.if_nametoindex("lo"))
    drops = Drops()
    sockets.write([(b"sticky", addr, local), (b"kernel's", addr, None)], drops)
    assert drops == {}
    (d1, from1), (d2, from2) = recv_all(client, 2)
    assert (d1, from1[:2]) == (b"sticky", (ours, port))
    if other:  # the kernel alone answers 127.0.0.1 from 127.0.0.1
        assert (d2, from2[:2]) == (b"kernel's", (other, port))
    server.close()
    client.close()


class Recording:
    """A socket that records the control messages of its sendmsg calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.controls: list[list] = []

    def __getattr__(self, name: str):
        return getattr(self.sock, name)

    def sendmsg(self, buffers, control, flags, addr):
        self.controls.append([(level, kind) for level, kind, _ in control])
        return self.sock.sendmsg(buffers, control, flags, addr)


def test_a_gso_run_carries_its_source_and_a_gro_run_shares_it(loop):
    sender, receiver = UdpSockets(loop), UdpSockets(loop)
    tx, rx = udp(socket.AF_INET, "0.0.0.0"), udp(socket.AF_INET, "0.0.0.0")
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    recording = Recording(tx)
    sender.replace([recording])  # type: ignore[list-item]
    receiver.replace([rx])
    if not (sender.offloads()["gso"] and receiver.offloads()["gro"]):
        pytest.skip("this kernel has no UDP GSO/GRO")
    to = ("127.0.0.1", rx.getsockname()[1])
    local = pktinfo.local_source("127.0.0.2")
    sender.write([(bytes([i]) * 1000, to, local) for i in range(10)], Drops())
    assert recording.controls == [[(SOL_UDP, UDP_SEGMENT), (pktinfo.IPPROTO_IP, pktinfo.IP_PKTINFO)]]
    got = read(receiver, 10)
    assert [d for d, _, _ in got] == [bytes([i]) * 1000 for i in range(10)]
    assert {addr for _, addr, _ in got} == {("127.0.0.2", tx.getsockname()[1])}  # sent from the source
    assert len({id(local) for *_, local in got}) == 1 and got[0][2].address == "127.0.0.1"
    tx.close()
    rx.close()


@pytest.mark.parametrize("gone, to_family", [("192.0.2.1", socket.AF_INET), ("fd00:aa::9", socket.AF_INET6)],
                         ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("count", [1, 5], ids=["one", "gso-run"])
def test_a_source_that_has_gone_is_forgotten_and_the_datagrams_sent_anyway(loop, gone, to_family, count):
    host = "127.0.0.1" if to_family == socket.AF_INET else "::1"
    try:
        tx, rx = udp(to_family, host), udp(to_family, host)
    except OSError:
        pytest.skip("no IPv6 on loopback")
    sender = UdpSockets(loop)
    sender.replace([tx])
    forgotten = []
    sender.on_source_gone = forgotten.append
    local = pktinfo.local_source(gone, socket.if_nametoindex("lo") if ":" in gone else 0)
    drops = Drops()
    sender.write([(b"y" * 100, rx.getsockname(), local) for _ in range(count)], drops)
    assert drops == {} and forgotten == [local]
    assert [(d, a[0]) for d, a in recv_all(rx, count)] == [(b"y" * 100, host)] * count
    tx.close()
    rx.close()
