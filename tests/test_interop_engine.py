"""The sans-IO engine against the real thing: Debian's wireguard-go, no TUN on our side.

Two namespaces joined by a veth pair. In one, wireguard-go with a real TUN device
(100.64.0.1, fd00:64::1), configured with ``wg``. In the other, a plain UDP socket driven by an
:class:`~fzpoll.wireguard.engine.Engine` from this process: we play 100.64.0.2 / fd00:64::2 by writing ICMP
echo packets ourselves and reading the decrypted ones from ``engine.packets_for_tun()``. The kernel behind
wireguard-go is the other end of every ping, so a wrong key, nonce, padding or checksum shows up
as a missing reply.

The socket is opened inside its namespace by a short-lived thread that ``setns``-es itself there
(a network namespace switch is per thread, and a socket stays in the namespace it was created
in), so the test drives it directly instead of through a subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import select
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

import netns
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from helpers import skip_unless

WG_PORT = 51820  # wireguard-go's listen port, in its namespace
OUR_PORT = 51821  # the engine's UDP port, in the other namespace
WG_TUN4, OUR_TUN4 = "100.64.0.1", "100.64.0.2"
WG_TUN6, OUR_TUN6 = "fd00:64::1", "fd00:64::2"
WAIT = 4.0  # seconds to wait for any one packet

# ---------------------------------------------------------------- ICMP echo packets


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): ones' complement of the ones' complement sum."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _with_checksum(message: bytes, offset: int, checksum: int) -> bytes:
    return message[:offset] + checksum.to_bytes(2, "big") + message[offset + 2:]


def _ip6_pseudo_header(src: bytes, dst: bytes, length: int, next_header: int) -> bytes:
    """RFC 8200 section 8.1: what the upper-layer checksum covers besides the message."""
    return src + dst + length.to_bytes(4, "big") + bytes(3) + bytes([next_header])


def icmp_echo(src: str, dst: str, ident: int, seq: int, data: bytes, *,
              reply: bool = False) -> bytes:
    """An IPv4 ICMP or IPv6 ICMPv6 echo request (or reply), both checksums filled in."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        message = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + data
        message = _with_checksum(message, 2, inet_checksum(message))
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(message), 0, 0x4000, 64, 1, 0,
                             s.packed, d.packed)
        return _with_checksum(header, 10, inet_checksum(header)) + message
    message = struct.pack("!BBHHH", 129 if reply else 128, 0, 0, ident, seq) + data
    pseudo = _ip6_pseudo_header(s.packed, d.packed, len(message), 58)
    message = _with_checksum(message, 2, inet_checksum(pseudo + message))
    header = struct.pack("!IHBB16s16s", 6 << 28, len(message), 58, 64, s.packed, d.packed)
    return header + message


@dataclass(frozen=True)
class Echo:
    src: str
    dst: str
    reply: bool
    ident: int
    seq: int
    data: bytes


def parse_echo(packet: bytes) -> Echo | None:
    """The echo in ``packet`` (checksums verified), or None if it is not an ICMP echo."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        if packet[9] != 1:
            return None
        assert inet_checksum(packet[:ihl]) == 0, f"bad IPv4 header checksum: {packet.hex()}"
        src, dst = packet[12:16], packet[16:20]
        message = packet[ihl:struct.unpack("!H", packet[2:4])[0]]
        assert inet_checksum(message) == 0, f"bad ICMP checksum: {packet.hex()}"
        kinds = {8: False, 0: True}
    else:
        if packet[6] != 58:
            return None
        src, dst = packet[8:24], packet[24:40]
        message = packet[40:40 + struct.unpack("!H", packet[4:6])[0]]
        pseudo = _ip6_pseudo_header(src, dst, len(message), 58)
        assert inet_checksum(pseudo + message) == 0, f"bad ICMPv6 checksum: {packet.hex()}"
        kinds = {128: False, 129: True}
    kind, code, _, ident, seq = struct.unpack("!BBHHH", message[:8])
    if kind not in kinds or code != 0:
        return None
    return Echo(str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)), kinds[kind],
                ident, seq, message[8:])


def test_inet_checksum_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2; the checksum is its complement.
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


@pytest.mark.parametrize("src, dst", [(OUR_TUN4, WG_TUN4), (OUR_TUN6, WG_TUN6)])
def test_echo_helpers_round_trip(src: str, dst: str) -> None:
    packet = icmp_echo(src, dst, 0x1234, 7, b"odd-length payload!", reply=True)
    assert parse_echo(packet) == Echo(src, dst, True, 0x1234, 7, b"odd-length payload!")


# ---------------------------------------------------------------- the fzpoll side


CLONE_NEWNET = 0x40000000  # <sched.h>; os.setns and os.CLONE_NEWNET arrive only in Python 3.12


def udp_socket_in(ns: netns.Namespace, family: int = socket.AF_INET) -> socket.socket:
    """A UDP socket that lives in ``ns``, opened by a thread that joins ``ns`` and then ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def enter_and_open() -> None:
        try:
            with open(f"/run/netns/{ns.name}", "rb") as handle:
                if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {ns.name}: {os.strerror(errno)}")
            made.append(socket.socket(family, socket.SOCK_DGRAM))
        except BaseException as exc:  # re-raised in the caller's thread below
            made.append(exc)

    thread = threading.Thread(target=enter_and_open, name=f"setns-{ns.name}")
    thread.start()
    thread.join(timeout=5)
    if not made:
        raise AssertionError(f"could not open a socket in {ns.name}")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class FzpollEnd:
    """An Engine and its UDP socket in a namespace: the IO shell of this test, clock included."""

    def __init__(self, ns: netns.Namespace, address: str, wg: netns.WireguardGo) -> None:
        self.engine = Engine(PrivateKey.generate(os.urandom), random_bytes=os.urandom,
                             wall_time=time.time)
        self.wg = wg  # only for its log in failure messages
        self.received: list[bytes] = []  # decrypted packets not yet claimed by wait_for
        self.sock = udp_socket_in(ns)
        ns.on_close(self.sock.close)
        self.sock.setblocking(False)
        self.sock.bind((address, OUR_PORT))

    @property
    def public_key(self) -> str:
        assert self.engine.public_key is not None
        return self.engine.public_key.base64()

    def send(self, packet: bytes) -> None:
        """Hand an IP packet to the engine as if read from a TUN, and send what it produces."""
        assert self.engine.send(packet, time.monotonic()) is None
        self.flush()

    def flush(self) -> None:
        for datagram, addr, _ in self.engine.datagrams_to_send():
            self.sock.sendto(datagram, addr)

    def wait_for(self, match: Callable[[Echo], bool], timeout: float = WAIT) -> Echo:
        """Pump socket, engine and timers until a decrypted echo satisfying ``match`` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for i, packet in enumerate(self.received):
                echo = parse_echo(packet)
                if echo is not None and match(echo):
                    del self.received[i]
                    return echo
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(
                    f"no matching echo within {timeout}s; decrypted: {self.received!r}; "
                    f"drops: {dict(self.engine.drops)}; wireguard-go log:\n{self.wg.log()}"
                )
            timer_at = self.engine.next_deadline()
            wake_at = deadline if timer_at is None else min(deadline, timer_at)
            readable, _, _ = select.select([self.sock], [], [], max(0.0, wake_at - now))
            if readable:
                self._drain_socket()
            self.engine.handle_timer(time.monotonic())
            self.flush()

    def _drain_socket(self) -> None:
        while True:
            try:
                datagram, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.engine.receive(datagram, addr, time.monotonic())
            self.flush()
            self.received.extend(self.engine.packets_for_tun())


@dataclass
class Bed:
    wg: netns.WireguardGo
    ours: FzpollEnd
    wg_ns: netns.Namespace
    pair: netns.VethPair
    wg_public_key: str


@contextlib.contextmanager
def interop_bed(*, initiator: str, psk: str | None) -> Iterator[Bed]:
    """wireguard-go and a FzpollEnd peered with each other (optionally with a preshared key).

    Only the ``initiator`` ("fzpoll" or "wireguard-go") is told the other's endpoint; the
    responder learns it from the handshake initiation.
    """
    assert initiator in ("fzpoll", "wireguard-go")
    skip_unless("wireguard-go")
    with netns.Namespace("wg") as wg_ns, netns.Namespace("fzpoll") as our_ns:
        pair = netns.veth_pair(wg_ns, our_ns)
        wg = netns.WireguardGo(wg_ns, log_level="verbose").start()
        ours = FzpollEnd(our_ns, pair.ip_b, wg)
        wg_key = netns.genkey()
        wg.configure(wg_key, WG_PORT)
        wg.add_peer(ours.public_key, [f"{OUR_TUN4}/32", f"{OUR_TUN6}/128"],
                    endpoint=f"{pair.ip_b}:{OUR_PORT}" if initiator == "wireguard-go" else None,
                    preshared_key=psk)
        wg.address(f"{WG_TUN4}/24", f"{WG_TUN6}/64")
        wg.up()

        wg_public_key = netns.pubkey(wg_key)
        peer = ours.engine.add_peer(PublicKey.from_text(wg_public_key))
        ours.engine.add_allowed_ip(peer, f"{WG_TUN4}/32")
        ours.engine.add_allowed_ip(peer, f"{WG_TUN6}/128")
        if initiator == "fzpoll":
            ours.engine.set_endpoint(peer, (pair.ip_a, WG_PORT))
        if psk is not None:
            ours.engine.set_preshared_key(peer, PresharedKey.from_text(psk))
        yield Bed(wg, ours, wg_ns, pair, wg_public_key)


def kernel_checksum_errors(ns: netns.Namespace) -> dict[str, int]:
    """The nonzero counters of packets the kernel in ``ns`` dropped for a bad IP or ICMP checksum.

    A ping's raw socket sees an IPv4 echo reply before the kernel checks its ICMP checksum, so
    ping alone would not notice a wrong one; these counters do.
    """
    snmp = ns.run(["cat", "/proc/net/snmp", "/proc/net/snmp6"]).stdout.splitlines()
    counters: dict[str, int] = {}
    for names, values in zip(snmp, snmp[1:]):  # /proc/net/snmp: header line, then values
        if names.split(":")[0] == values.split(":")[0] and ":" in names:
            proto = names.split(":")[0]
            for name, value in zip(names.split()[1:], values.split()[1:]):
                counters[proto + name] = int(value)
    for line in snmp:  # /proc/net/snmp6: one "Name value" per line
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            counters[fields[0]] = int(fields[1])
    wanted = ("IpInHdrErrors", "IcmpInCsumErrors", "Icmp6InCsumErrors")
    return {name: counters[name] for name in wanted if counters[name]}


@pytest.fixture(scope="module", autouse=True)
def _stale() -> None:
    if netns.need_root() is None:
        netns.cleanup_stale()


# ---------------------------------------------------------------- the interop tests


@pytest.mark.netns
@pytest.mark.parametrize("use_psk", [False, True], ids=["no-psk", "psk"])
def test_fzpoll_initiates_and_pings_wireguard_go(use_psk: bool) -> None:
    psk = netns.genkey() if use_psk else None  # any 32 random bytes, as `wg genpsk`
    with interop_bed(initiator="fzpoll", psk=psk) as bed:
        engine = bed.ours.engine
        request = icmp_echo(OUR_TUN4, WG_TUN4, 0xBEEF, 1, b"fzpoll ping v4")
        assert engine.send(request, time.monotonic()) is None
        sent = engine.datagrams_to_send()
        assert [d[0] for d, _, _ in sent] == [1]  # staged; a handshake initiation goes out
        for datagram, addr, _ in sent:
            bed.ours.sock.sendto(datagram, addr)

        reply = bed.ours.wait_for(lambda e: e.reply and e.ident == 0xBEEF)
        assert reply == Echo(WG_TUN4, OUR_TUN4, True, 0xBEEF, 1, b"fzpoll ping v4")

        # IPv6 inside the same session (odd length: exercises the padding and the checksum).
        bed.ours.send(icmp_echo(OUR_TUN6, WG_TUN6, 0xCAFE, 2, b"fzpoll ping v6!"))
        reply6 = bed.ours.wait_for(lambda e: e.reply and e.ident == 0xCAFE)
        assert reply6 == Echo(WG_TUN6, OUR_TUN6, True, 0xCAFE, 2, b"fzpoll ping v6!")

        dump = bed.wg.wg_show_dump().peer(bed.ours.public_key)
        assert dump.latest_handshake > 0
        assert dump.rx_bytes > 0 and dump.tx_bytes > 0
        assert dump.endpoint == f"{bed.pair.ip_b}:{OUR_PORT}"  # learnt from our initiation
        assert dump.preshared_key == psk
        assert not engine.drops, dict(engine.drops)
        assert kernel_checksum_errors(bed.wg_ns) == {}


@pytest.mark.netns
def test_wireguard_go_initiates_and_fzpoll_answers_its_pings() -> None:
    psk = netns.genkey()
    with interop_bed(initiator="wireguard-go", psk=psk) as bed:
        engine = bed.ours.engine
        peer = engine.get_peer(PublicKey.from_text(bed.wg_public_key))
        assert peer is not None and peer.endpoint is None  # the initiation will tell us
        for dst in (OUR_TUN4, OUR_TUN6):
            ping = bed.wg_ns.popen(["ping", "-c", "1", "-W", "3", dst], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            request = bed.ours.wait_for(lambda e, dst=dst: not e.reply and e.dst == dst)
            bed.ours.send(icmp_echo(request.dst, request.src, request.ident, request.seq,
                                    request.data, reply=True))
            output, _ = ping.communicate(timeout=5)  # (the namespace stops it on failure)
            assert ping.returncode == 0, f"{output}\nwireguard-go log:\n{bed.wg.log()}"
            assert " 1 received" in output, output
            assert kernel_checksum_errors(bed.wg_ns) == {}, output

        assert peer.endpoint == (bed.pair.ip_a, WG_PORT)
        assert peer.last_handshake_wall > 0
        dump = bed.wg.wg_show_dump().peer(bed.ours.public_key)
        assert dump.latest_handshake > 0 and dump.rx_bytes > 0 and dump.tx_bytes > 0
        assert dump.preshared_key == psk
        assert not engine.drops, dict(engine.drops)
