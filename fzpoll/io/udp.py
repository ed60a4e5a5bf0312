"""The tunnel's UDP sockets (one per address family) with their segmentation offloads.

UDP GSO (linux/udp.h ``UDP_SEGMENT``): one sendmsg carries up to 64 equal-sized datagrams to one
address, the last possibly shorter; the kernel (or the NIC) cuts them. UDP GRO (``UDP_GRO``): one
recvmsg may return a run of datagrams from one sender coalesced, with their size in a control
message; we cut them again. Each socket is probed for both at start; either is used only where
the kernel accepts it, and GSO is switched off for good on the first EIO (as wireguard-go does:
some drivers refuse it at send time only).

Every socket also asks for the local address each datagram was sent to (IP_PKTINFO,
IPV6_RECVPKTINFO: :mod:`fzpoll.io.pktinfo`), which the engine keeps per peer and hands back with
each datagram for it, so that we answer from the address the peer used. With GRO, the pktinfo of
a coalesced run applies to all its datagrams; with GSO, one control-message block carries both the
segment size and the source.

Writes that meet EAGAIN wait in a bounded :class:`~fzpoll.io.loop.Outbox` per socket; the
datapath turns EPOLLOUT on for it and stops feeding it (see :mod:`fzpoll.io.datapath`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from typing import Callable, MutableSequence

from fzpoll.errors import DropReason as D
from fzpoll.io import pktinfo
from fzpoll.io.loop import EPOLLIN, MAX_PENDING_WRITES, Loop, Outbox

log = logging.getLogger("fzpoll.io.udp")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65000
READ_SIZE = 65535
_CMSG_SPACE = socket.CMSG_SPACE(4) + pktinfo.CMSG_SPACE  # UDP_GRO's segment size, the pktinfo
_ORDER = "little" if sys.byteorder == "little" else "big"
Datagram = tuple  # (bytes, address, LocalSource | None): the source to send from, if sticky


def _probe_gso(sock: socket.socket) -> bool:
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        return True
    except OSError:
        return False


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


def gso_run(datagrams: list[Datagram], start: int, count: int) -> int:
    """End of the run from ``start`` that one GSO send can carry: same address and source,
    same size (the last may be shorter), at most MAX_GSO_SEGMENTS and MAX_GSO_BYTES."""
    data, addr, local = datagrams[start]
    size = len(data)
    total = size
    end = start + 1
    limit = min(count, start + MAX_GSO_SEGMENTS)
    while end < limit:
        d, a, s = datagrams[end]
        n = len(d)
        if a != addr or s is not local or n > size or total + n > MAX_GSO_BYTES:
            break
        total += n
        end += 1
        if n < size:
            break  # a shorter datagram can only close a run
    return end


class UdpSockets:
    """The UDP sockets of one device, their offloads and their waiting writes."""

    def __init__(self, loop: Loop, max_pending: int = MAX_PENDING_WRITES) -> None:
        self.loop = loop
        self.max_pending = max_pending
        self.by_fd: dict[int, socket.socket] = {}
        self.outboxes: dict[int, Outbox] = {}
        self._by_family: dict[int, socket.socket] = {}
        self._gso: dict[int, bool] = {}
        self.gro: dict[int, bool] = {}
        self._recvmsg: dict[int, bool] = {}  # GRO or pktinfo: read with recvmsg, not recvfrom
        self.sources = pktinfo.Sources()
        self.on_blocked: Callable[[], None] = lambda: None  # a write met EAGAIN
        # A send from this source failed because the address has gone: forget it (the engine's
        # peers stop using it); the datagram is resent from the kernel's choice.
        self.on_source_gone: Callable[[pktinfo.LocalSource], None] = lambda local: None

    def replace(self, sockets: list[socket.socket], offload: bool = True) -> list[int]:
        """Take ``sockets`` instead of the current ones (the caller closes those afterwards);
        returns the fds that left."""
        gone = list(self.by_fd)
        for fd in gone:
            self.loop.unwatch(fd)
        self.by_fd = {s.fileno(): s for s in sockets}
        self._by_family = {s.family: s for s in sockets}
        self.outboxes = {fd: Outbox(self.max_pending) for fd in self.by_fd}
        disabled = os.environ.get("FZPOLL_DISABLE_OFFLOAD", "").split(",")  # e.g. "gso,gro"
        self._gso = {fd: offload and "gso" not in disabled and _probe_gso(s) for fd, s in self.by_fd.items()}
        self.gro = {fd: offload and "gro" not in disabled and _enable_gro(s) for fd, s in self.by_fd.items()}
        self._recvmsg = {fd: pktinfo.enable(s) or self.gro[fd] for fd, s in self.by_fd.items()}
        for fd in self.by_fd:
            self.loop.set_mask(fd, EPOLLIN, force=True)
        return gone

    def offloads(self) -> dict[str, bool]:
        return {"gso": any(self._gso.values()), "gro": any(self.gro.values())}

    def pending(self) -> bool:
        for out in self.outboxes.values():
            if out.pending:
                return True
        return False

    def pending_writes(self) -> dict[str, int]:
        return {f"udp{'6' if self.by_fd[fd].family == socket.AF_INET6 else '4'}": len(out.pending)
                for fd, out in self.outboxes.items()}

    # ------------------------------------------------------------------ reads

    def read(self, fd: int, sock: socket.socket, batch: list, failures: list[Exception], limit: int) -> int:
        """Up to ``limit`` ``(data, address, local)`` datagrams into ``batch``; how many. With
        pktinfo or GRO, recvmsg: ``local`` from the pktinfo, and a coalesced run (GRO) is cut here
        into its datagrams (so a run may take the batch past ``limit``). One function, no helper: a lone
        packet's pass calls it cold."""
        start = len(batch)
        append = batch.append
        try:
            if self._recvmsg[fd]:
                end = start + limit
                recvmsg = sock.recvmsg
                received, intern = self.sources.received, self.sources.intern
                while len(batch) < end:
                    data, ancillary, _, addr = recvmsg(READ_SIZE, _CMSG_SPACE)
                    size = 0
                    local = None
                    # Only what we asked for comes: UDP_GRO's segment size (a coalesced run only), pktinfo.
                    for level, kind, value in ancillary:
                        if kind == UDP_GRO:
                            size = int.from_bytes(value[:4], _ORDER)
                        else:
                            local = received.get(value) or intern(level, value)
                    if size and len(data) > size:
                        for offset in range(0, len(data), size):
                            append((data[offset : offset + size], addr, local))
                    else:
                        append((data, addr, local))
            else:
                recvfrom = sock.recvfrom
                for _ in range(limit):
                    data, addr = recvfrom(READ_SIZE)
                    append((data, addr, None))
        except BlockingIOError:
            pass
        except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error: the socket stays usable
            failures.append(exc)
        return len(batch) - start

    # ------------------------------------------------------------------ writes

    def write(self, datagrams: list[Datagram], drops: dict[str, int]) -> None:
        """Send every datagram, in GSO runs where possible; EAGAIN leaves the rest waiting."""
        by_family = self._by_family
        v4 = by_family.get(socket.AF_INET)
        v6 = by_family.get(socket.AF_INET6)
        count = len(datagrams)
        i = 0
        while i < count:
            item = datagrams[i]
            data, addr, local = item
            sock = v4 if len(addr) == 2 else v6
            if sock is None:
                drops[D.WRITE_FAILED] += 1
                i += 1
                continue
            fd = sock.fileno()
            out = self.outboxes[fd]
            if out.pending:
                if not out.push(item):
                    drops[D.BUFFER_FULL] += 1
                i += 1
                continue
            end = i + 1
            if end < count and self._gso[fd]:
                end = gso_run(datagrams, i, count)
            try:
                if end - i > 1:
                    control = [(SOL_UDP, UDP_SEGMENT, len(data).to_bytes(2, _ORDER))]
                    if local is not None:
                        control += local
                    sock.sendmsg([d for d, _, _ in datagrams[i:end]], control, 0, addr)
                elif local is None:
                    sock.sendto(data, addr)
                else:
                    sock.sendmsg((data,), local, 0, addr)
            except BlockingIOError:
                self.on_blocked()
                for item in datagrams[i:end]:
                    if not out.push(item):
                        drops[D.BUFFER_FULL] += 1
            except OSError as exc:
                if local is not None and exc.errno in pktinfo.SOURCE_GONE:
                    self._source_gone(local, datagrams, i)
                    continue  # resend from the kernel's choice of source
                if end - i > 1 and exc.errno == errno.EIO:
                    log.warning("UDP GSO failed with EIO: switched off", extra={"fields": {"fd": fd}})
                    self._gso[fd] = False
                    continue  # resend this run one datagram at a time
                drops[D.WRITE_FAILED] += end - i
            i = end

    def _source_gone(self, local: pktinfo.LocalSource, datagrams: MutableSequence[Datagram], start: int) -> None:
        """Sending from ``local`` failed (the address has gone): forget it, and send the rest of
        ``datagrams`` that were to use it from the kernel's choice instead."""
        log.info("source address gone: sending from the kernel's choice",
                 extra={"fields": {"source": local.address}})
        self.on_source_gone(local)
        for j in range(start, len(datagrams)):
            data, addr, s = datagrams[j]
            if s is local:
                datagrams[j] = (data, addr, None)

    def flush(self, fd: int, drops: dict[str, int]) -> None:
        """Send what waited on ``fd``, until EAGAIN."""
        sock = self.by_fd[fd]
        pending = self.outboxes[fd].pending
        while pending:
            data, addr, local = pending[0]
            try:
                if local is None:
                    sock.sendto(data, addr)
                else:
                    sock.sendmsg((data,), local, 0, addr)
            except BlockingIOError:
                return
            except OSError as exc:
                if local is not None and exc.errno in pktinfo.SOURCE_GONE:
                    self._source_gone(local, pending, 0)
                    continue
                drops[D.WRITE_FAILED] += 1
            pending.popleft()
