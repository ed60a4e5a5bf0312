"""Link events for our interface from a small rtnetlink socket of our own, watched in the loop.

pyroute2 configures the interface (short-lived, see :mod:`fzpoll.up.forked`); the running
daemon only needs to hear two things about its link: that it was deleted (exit cleanly) and that
its MTU changed (``ip link set wg0 mtu N``: the engine's padding follows, as wireguard-go's
``RoutineTUNEventReader``). For that one socket bound to RTMGRP_LINK and a parser of
RTM_NEWLINK/RTM_DELLINK are enough, and importing pyroute2 (19 MiB, 80 ms) for them is not.

:func:`parse_link_messages` is pure (bytes in, events out); :class:`LinkWatcher` owns the socket.
A message the kernel could not deliver (ENOBUFS: the socket's queue overflowed) is made up for by
asking the kernel directly for the link's state (:meth:`LinkWatcher.resync`).
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from typing import Iterator, NamedTuple

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>: stable kernel ABI.
NETLINK_ROUTE = 0
RTMGRP_LINK = 1
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_IFNAME = 3
IFLA_MTU = 4
SIOCGIFMTU = 0x8921  # <linux/sockios.h>

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFINFOMSG = struct.Struct("=BxHiII")  # family, (pad), device type, index, flags, change mask
_RTATTR = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")
_IFREQ_MTU = struct.Struct("16si20x")
_RECV_SIZE = 32768


def _align(n: int) -> int:
    return (n + 3) & ~3


class LinkEvent(NamedTuple):
    """One link message: ``deleted`` for RTM_DELLINK; ``mtu`` None if the message had none."""

    index: int
    deleted: bool
    mtu: int | None
    name: str | None


def rtattrs(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """The rtattrs of one message (the last of a type wins); a truncated one ends the list."""
    attrs: dict[int, bytes] = {}
    at = start
    while at + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(data, at)
        if length < _RTATTR.size or at + length > end:
            break
        attrs[kind & 0x3FFF] = data[at + _RTATTR.size : at + length]  # without NLA_F_NESTED etc.
        at += _align(length)
    return attrs


def netlink_messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """``(type, sequence, body start, end)`` of each netlink message in one datagram read from a
    netlink socket; a truncated or malformed message ends them (what came before it is kept)."""
    at, size = 0, len(data)
    while at + _NLMSGHDR.size <= size:
        length, kind, _flags, seq, _port = _NLMSGHDR.unpack_from(data, at)
        if length < _NLMSGHDR.size or at + length > size:
            return
        yield kind, seq, at + _NLMSGHDR.size, at + length
        at += _align(length)


def parse_link_messages(data: bytes) -> list[LinkEvent]:
    """Every RTM_NEWLINK/RTM_DELLINK in one datagram read from an rtnetlink socket.

    Other message types are skipped; a truncated or malformed message ends the parse (what came
    before it is kept): the kernel never sends one, and nothing we read must raise."""
    events: list[LinkEvent] = []
    for kind, _seq, body, end in netlink_messages(data):
        if kind in (RTM_NEWLINK, RTM_DELLINK) and end - body >= _IFINFOMSG.size:
            _family, _type, index, _ifflags, _change = _IFINFOMSG.unpack_from(data, body)
            attrs = rtattrs(data, body + _IFINFOMSG.size, end)
            mtu = attrs.get(IFLA_MTU)
            name = attrs.get(IFLA_IFNAME)
            events.append(LinkEvent(
                index=index,
                deleted=kind == RTM_DELLINK,
                mtu=_U32.unpack(mtu)[0] if mtu is not None and len(mtu) == 4 else None,
                name=name.split(b"\0", 1)[0].decode("ascii", "replace") if name else None,
            ))
    return events


def build_link_message(kind: int, index: int, *, mtu: int | None = None, name: str | None = None,
                       seq: int = 0) -> bytes:
    """An RTM_NEWLINK/RTM_DELLINK as the kernel sends it (for tests and recorded messages)."""
    attrs = b""
    for attr, value in ((IFLA_IFNAME, name.encode() + b"\0" if name is not None else None),
                        (IFLA_MTU, _U32.pack(mtu) if mtu is not None else None)):
        if value is not None:
            n = _RTATTR.size + len(value)
            attrs += _RTATTR.pack(n, attr) + value + bytes(_align(n) - n)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 65534, index, 0, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, 0, seq, 0) + body


class LinkState(NamedTuple):
    """What changed for our link after a read: gone, or its new MTU (None: unchanged)."""

    gone: bool
    mtu: int | None


class LinkWatcher:
    """A non-blocking rtnetlink socket subscribed to link events, filtered to one interface."""

    def __init__(self, ifname: str, mtu: int) -> None:
        self.ifname = ifname
        self.index = socket.if_nametoindex(ifname)
        self.mtu = mtu
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK))
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> LinkState:
        """Drain the socket; what happened to our link since the last read."""
        gone = False
        mtu = None
        while True:
            try:
                data = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                return self.resync()  # events were lost: ask the kernel for the state itself
            for event in parse_link_messages(data):
                if event.index != self.index:
                    continue
                if event.deleted:
                    gone = True
                elif event.mtu is not None and event.mtu != self.mtu:
                    self.mtu = mtu = event.mtu
        return LinkState(gone, mtu)

    def resync(self) -> LinkState:
        """The link's state asked of the kernel: gone if the index has no name, and its MTU."""
        try:
            name = socket.if_indextoname(self.index)
        except OSError:
            return LinkState(True, None)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                out = fcntl.ioctl(s.fileno(), SIOCGIFMTU, _IFREQ_MTU.pack(name.encode("ascii"), 0))
        except OSError:
            return LinkState(False, None)
        mtu = _IFREQ_MTU.unpack(out)[1]
        if mtu == self.mtu:
            return LinkState(False, None)
        self.mtu = mtu
        return LinkState(False, mtu)

    def close(self) -> None:
        self.sock.close()
