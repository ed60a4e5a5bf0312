"""Sticky source addresses: answer a peer from the local address it sent to.

On a host with several addresses on a link (or where the route's preferred source is not the
address the peer used), a reply sent from whatever source the kernel picks makes the peer roam to
another address of ours, or its stateful firewall drop the reply. The kernel's WireGuard and
wireguard-go remember, per peer, the local address (with the interface index, for IPv6) that the
peer's latest authenticated packet was sent to and send from it. We do the same with the socket
API: ``IP_PKTINFO`` / ``IPV6_RECVPKTINFO`` make every recvmsg say where the datagram was sent to,
and the same control message on sendmsg picks the source (ip(7), ipv6(7)).

The engine keeps the :class:`LocalSource` of a peer's latest authenticated datagram and hands it
back with each datagram for the peer (see ``Engine.receive``). A LocalSource *is* the ancillary
data of sendmsg, built once per local address and shared by every peer and datagram using it
(:class:`Sources` interns them), so a send costs no allocation for it. If the address has gone
(the send fails with one of SOURCE_GONE), the source is forgotten and the datagram resent from
the kernel's choice (the kernel module does the same when its cached source stops being local).
"""

from __future__ import annotations

import errno
import socket
import struct

IPPROTO_IP = socket.IPPROTO_IP  # 0
IPPROTO_IPV6 = socket.IPPROTO_IPV6  # 41
IP_PKTINFO = 8  # linux/in.h; Python's socket module has no constant for it
IPV6_RECVPKTINFO = 49  # linux/in6.h (RFC 3542)
IPV6_PKTINFO = 50
# struct in_pktinfo {int ipi_ifindex; struct in_addr ipi_spec_dst, ipi_addr} (host-order int)
_IN_PKTINFO = struct.Struct("=i4s4s")
# struct in6_pktinfo {struct in6_addr ipi6_addr; unsigned int ipi6_ifindex}
_IN6_PKTINFO = struct.Struct("=16sI")
CMSG_SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size)  # room for either family's pktinfo
# A send from a source that is no longer ours fails with one of these: IPv4's route lookup says
# ENETUNREACH for a source that is no local address, IPv6's control message EINVAL, ENODEV if its
# interface has gone. (Should the network really be unreachable, the resend fails too, and the
# source comes back with the peer's next packet.)
SOURCE_GONE = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENETUNREACH})
MAX_SOURCES = 256  # distinct pktinfo values kept interned (a host has few addresses)


class LocalSource(tuple):
    """The ancillary data that makes sendmsg send from one local address: a tuple holding one
    ``(level, type, data)`` control message, usable as sendmsg's ``ancdata`` as it is."""

    __slots__ = ()

    @property
    def family(self) -> int:
        return socket.AF_INET if self[0][0] == IPPROTO_IP else socket.AF_INET6

    @property
    def address(self) -> str:
        level, _, data = self[0]
        if level == IPPROTO_IP:
            return socket.inet_ntop(socket.AF_INET, _IN_PKTINFO.unpack(data)[1])
        return socket.inet_ntop(socket.AF_INET6, _IN6_PKTINFO.unpack(data)[0])

    @property
    def ifindex(self) -> int:
        """The interface the datagram must leave by (IPv6 only; 0: any)."""
        level, _, data = self[0]
        return 0 if level == IPPROTO_IP else _IN6_PKTINFO.unpack(data)[1]

    def __repr__(self) -> str:
        return f"LocalSource({self.address!r}, ifindex={self.ifindex})"


def local_source(address: str, ifindex: int = 0) -> LocalSource:
    """The LocalSource that sends from ``address`` (and, IPv6, by interface ``ifindex``)."""
    if ":" in address:
        data = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, address), ifindex)
        return LocalSource(((IPPROTO_IPV6, IPV6_PKTINFO, data),))
    # The source is ipi_spec_dst; the interface is left to the route (the kernel module, too,
    # only uses the address to send: a forced interface would outlive a change of route).
    data = _IN_PKTINFO.pack(0, socket.inet_pton(socket.AF_INET, address), bytes(4))
    return LocalSource(((IPPROTO_IP, IP_PKTINFO, data),))


def enable(sock: socket.socket) -> bool:
    """Ask for the pktinfo control message on every datagram ``sock`` receives."""
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(IPPROTO_IP, IP_PKTINFO, 1)
        return True
    except OSError:
        return False


class Sources:
    """Interns the LocalSource of each pktinfo value received: one object per local address,
    found by one dict probe on the received bytes (``received.get(data) or intern(level, data)``
    inline in the read loop: no parsing, no call per datagram)."""

    __slots__ = ("received", "_made")

    def __init__(self) -> None:
        self.received: dict[bytes, LocalSource] = {}  # raw pktinfo as received -> its source
        self._made: dict[LocalSource, LocalSource] = {}  # equal sources -> one object

    def intern(self, level: int, data: bytes) -> LocalSource | None:
        """The source for a pktinfo control message received at ``level``; None if malformed."""
        try:
            if level == IPPROTO_IP:
                _, spec_dst, _ = _IN_PKTINFO.unpack(data)
                made = local_source(socket.inet_ntop(socket.AF_INET, spec_dst))
            else:
                addr, ifindex = _IN6_PKTINFO.unpack(data)
                made = local_source(socket.inet_ntop(socket.AF_INET6, addr), ifindex)
        except (struct.error, ValueError):
            return None
        if len(self.received) >= MAX_SOURCES:
            self.received.clear()
            self._made.clear()
        source = self._made.setdefault(made, made)
        self.received[data] = source
        return source
