"""UDP with its offloads: GSO runs, GRO splitting, EIO switching GSO off, on loopback sockets."""

from __future__ import annotations

import errno
import socket

import pytest

from fzpoll.errors import DropReason as D
from fzpoll.io.loop import Loop
from fzpoll.io.udp import MAX_GSO_SEGMENTS, UdpSockets, gso_run
from fzpoll.io.report import Drops

A = ("127.0.0.1", 1000)
B = ("127.0.0.1", 1001)


def test_a_gso_run_is_one_address_one_size_and_may_end_shorter():
    d = [(b"x" * 100, A, None)] * 3 + [(b"x" * 50, A, None), (b"x" * 100, A, None)]
    assert gso_run(d, 0, len(d)) == 4  # the shorter one closes the run
    assert gso_run(d, 4, len(d)) == 5
    d = [(b"x" * 100, A, None), (b"x" * 100, B, None)]
    assert gso_run(d, 0, 2) == 1  # another address
    d = [(b"x" * 100, A, None), (b"x" * 200, A, None)]
    assert gso_run(d, 0, 2) == 1  # a bigger one cannot follow
    d = [(b"x" * 10, A, None)] * (MAX_GSO_SEGMENTS + 5)
    assert gso_run(d, 0, len(d)) == MAX_GSO_SEGMENTS
    d = [(b"x" * 1400, A, None)] * 60
    assert gso_run(d, 0, len(d)) == 46  # 46 * 1400 = 64400 <= MAX_GSO_BYTES < 47 * 1400


@pytest.fixture
def sockets():
    loop = Loop()
    tx, rx = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (tx, rx):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sender, receiver = UdpSockets(loop), UdpSockets(loop)
    sender.replace([tx])
    receiver.replace([rx])
    yield sender, receiver, rx
    loop.close()
    tx.close()
    rx.close()


def _receive_all(receiver: UdpSockets, rx: socket.socket, want: int) -> list[bytes]:
    got: list = []
    failures: list[Exception] = []
    for _ in range(100):
        receiver.read(rx.fileno(), rx, got, failures, 64)
        if len(got) >= want:
            break
    assert failures == []
    return [data for data, _, _ in got]


def test_datagrams_sent_in_gso_runs_arrive_one_by_one_in_order(sockets):
    """On loopback the kernel hands a GSO run to a UDP_GRO socket coalesced: the read cuts it."""
    sender, receiver, rx = sockets
    datagrams = [(bytes([i]) * 1000, rx.getsockname(), None) for i in range(20)] + [(b"end", rx.getsockname(), None)]
    drops = Drops()
    sender.write(datagrams, drops)
    assert drops == {}
    assert _receive_all(receiver, rx, len(datagrams)) == [d for d, _, _ in datagrams]


class EioOnGso:
    """A socket whose GSO sends fail with EIO, as some drivers' do at send time only."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.gso_sends = 0

    def __getattr__(self, name: str):
        return getattr(self.sock, name)

    def sendmsg(self, *args):
        self.gso_sends += 1
        raise OSError(errno.EIO, "Input/output error")


def test_eio_on_a_gso_send_switches_gso_off_and_resends_one_by_one(sockets):
    sender, receiver, rx = sockets
    if not sender.offloads()["gso"]:
        pytest.skip("this kernel has no UDP GSO")
    (sock,) = sender.by_fd.values()
    eio = EioOnGso(sock)
    sender.replace([eio])  # type: ignore[list-item]
    datagrams = [(bytes([i]) * 500, rx.getsockname(), None) for i in range(5)]
    drops = Drops()
    sender.write(datagrams, drops)
    assert drops == {} and sender.offloads()["gso"] is False and eio.gso_sends == 1
    assert _receive_all(receiver, rx, 5) == [d for d, _, _ in datagrams]
    sender.write(datagrams, drops)  # off for good: no GSO send tried again
    assert eio.gso_sends == 1 and _receive_all(receiver, rx, 5) == [d for d, _, _ in datagrams]


def test_a_datagram_for_a_family_without_a_socket_is_a_counted_write_failure(sockets):
    sender, _, _ = sockets
    drops = Drops()
    sender.write([(b"x", ("::1", 9, 0, 0), None)], drops)
    assert drops == {D.WRITE_FAILED: 1}
