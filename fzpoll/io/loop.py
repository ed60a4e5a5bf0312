"""The one loop: a single-threaded epoll poller that feeds the sans-IO engine fair batches.

Theory of operation
-------------------
Every fd is registered level-triggered in one ``select.epoll``: the TUN device, the UDP sockets
(IPv4 and IPv6) and any number of auxiliary sources (the UAPI socket and its clients, DNS sockets,
the signal wakeup socket) added with :meth:`Poller.add_reader`. Level triggering means we never
have to drain an fd to EAGAIN: whatever we leave unread is reported again on the next wakeup.

Each wakeup is one *pass*, in a fixed order:

1. flush the writes that were left pending by an earlier EAGAIN;
2. read **up to** ``batch_size`` packets from **every** ready data fd (UDP and TUN), so that every
   source makes progress on every tick: a busy UDP socket cannot starve the TUN device;
3. process the UDP batch (engine.receive), then the TUN batch (engine.send), then the auxiliary
   sources (DNS replies, recursive DNS queries, UAPI), then due timers;
4. write what the engine produced; a write that meets EAGAIN waits in a bounded buffer, and the fd
   gets EPOLLOUT only while something waits there. If what went to TUN may have been answered by
   the kernel during the write (an ICMP echo request, TCP), TUN is read once more, within its
   batch for the pass, and that is processed and written too: the answer is already queued, and
   taking it now saves a whole epoll round trip on the latency path.

A data fd read less than SPARSE_GAP ago is drained (up to the batch); one that was idle gets a
single read, and level triggering brings back whatever is left: a lone packet (a ping) then costs
no read ending in EAGAIN, while a burst is drained from its second pass on. The wait's timeout
comes from the engine's O(1) lower bound of its next deadline, and timers are looked at only in a
pass that reaches it.

Backpressure: while the TUN output is blocked we stop *reading* UDP (which feeds it), and while a
UDP output is blocked we stop reading TUN (which feeds it), by taking EPOLLIN off the feeding fds.
A burst then waits in the kernel's socket and TUN queues, not in our memory; a packet is dropped
(and counted) only when a bounded buffer is full.

Errors: every packet's failure - a drop reason returned by the engine or an unexpected exception -
is collected, and after the pass they become one :class:`TunnelError` logged once with counts by
kind. Nothing aborts a batch; a bad packet costs exactly itself.

The epoll timeout is the earliest deadline of the engine and of the auxiliary timer sources, so an
idle daemon sleeps in epoll_wait and uses no CPU.

``schedule="priority"`` keeps Firezone's old strict-priority loop (flush, UDP, TUN, auxiliary,
timers; a lower source is served only when every higher one is idle) on the same code, so the
benchmark can compare both.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import time
from collections import Counter, deque
from typing import Callable

from fzpoll.wireguard.constants import DEFAULT_BATCH_SIZE, MAX_HANDSHAKES_PER_PASS
from fzpoll.wireguard.engine import Engine
from fzpoll.errors import DropReason as D
from fzpoll.errors import QUIET_DROPS, TunnelError

log = logging.getLogger("fzpoll.io.loop")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP


# UDP segmentation offloads (linux/udp.h): one sendmsg carries up to 64 equal-sized datagrams
# to one address (GSO), one recvmsg returns a run of them coalesced (GRO) with their size.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_GSO_SEGMENTS = 64
MAX_GSO_BYTES = 65000
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
MAX_PENDING_WRITES = 1024  # per output fd
# Events taken per epoll_wait. Level-triggered: fds beyond it stay ready and come in the next pass
# (epoll rotates its ready list), while a small array keeps each wait's buffer small.
MAX_EVENTS = 64
MAX_ERROR_LOGS_PER_SECOND = 5.0
# A data fd that was last read longer ago than this is "sparse": its next wakeup reads one packet
# and leaves the rest (if any) to the level-triggered epoll, instead of draining it with a read
# that ends in EAGAIN. The EAGAIN read costs a syscall and an exception right on the latency path
# of a lone packet (a ping), while a burst is drained from its second pass on.
SPARSE_GAP = 0.001
_READ_SIZE = 65535
_UNKNOWN = object()  # run_pass: no deadline given
Callback = Callable[[float], None]


_LITTLE = sys.byteorder == "little"


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


# ICMP messages the kernel never answers: echo reply, destination unreachable, source quench,
# time exceeded, parameter problem (v4); destination unreachable, packet too big, time exceeded,
# parameter problem, echo reply (v6).
_ICMP4_FINAL = frozenset({0, 3, 4, 11, 12})
_ICMP6_FINAL = frozenset({1, 2, 3, 4, 129})


def _may_be_answered(packets: list[bytes]) -> bool:
    """Could writing ``packets`` to TUN make the kernel answer at once, during the write? Only
    False when each is an ICMP message that is never answered (the echo reply a ping waits for):
    the read that would find nothing costs a syscall and an exception."""
    for p in packets:
        n = len(p)
        version = p[0] >> 4 if n else 0
        if version == 4:
            at = (p[0] & 15) << 2
            if n < 20 or p[9] != 1 or n <= at or p[at] not in _ICMP4_FINAL:
                return True
        elif version == 6:
            if n <= 40 or p[6] != 58 or p[40] not in _ICMP6_FINAL:
                return True
        else:
            return True
    return False


def _gso_run(datagrams: list[tuple[bytes, tuple]], start: int, count: int) -> int:
    """End of the run from ``start`` that one GSO send can carry: same address, same size
    (the last may be shorter), at most MAX_GSO_SEGMENTS and MAX_GSO_BYTES."""
    data, addr = datagrams[start]
    size = len(data)
    total = size
    end = start + 1
    limit = min(count, start + MAX_GSO_SEGMENTS)
    while end < limit:
        d, a = datagrams[end]
        n = len(d)
        if a != addr or n > size or total + n > MAX_GSO_BYTES:
            break
        total += n
        end += 1
        if n < size:
            break  # a shorter datagram can only close a run
    return end


class _Drops(dict):
    """Drop counts of one pass: a dict that counts from 0 (a Counter costs ~1 us to create)."""

    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0


class TunGone(Exception):
    """The TUN interface was deleted under us: the daemon should exit cleanly."""


class _Output:
    """Writes to one fd that met EAGAIN, waiting for EPOLLOUT (bounded)."""

    __slots__ = ("pending", "dropped", "high_water")

    def __init__(self) -> None:
        self.pending: deque = deque()
        self.dropped = 0
        self.high_water = 0

    def push(self, item) -> bool:
        if len(self.pending) >= MAX_PENDING_WRITES:
            self.dropped += 1
            return False
        self.pending.append(item)
        if len(self.pending) > self.high_water:
            self.high_water = len(self.pending)
        return True


class Stats:
    """Counters ``fzpoll show`` prints and wg cannot: passes, batch sizes, errors by kind."""

    def __init__(self) -> None:
        self.passes = 0
        self.udp_packets = 0
        self.tun_packets = 0
        self.max_udp_batch = 0
        self.max_tun_batch = 0
        self.errors: Counter[str] = Counter()

    def as_dict(self) -> dict:
        return {
            "passes": self.passes,
            "udp_packets_in": self.udp_packets,
            "tun_packets_in": self.tun_packets,
            "max_udp_batch": self.max_udp_batch,
            "max_tun_batch": self.max_tun_batch,
            "errors": dict(self.errors),
        }


class Poller:
    """Owns every fd and the clock; drives one :class:`Engine`."""

    def __init__(
        self,
        engine: Engine,
        tun_fd: int | None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        schedule: str = "fair",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if schedule not in ("fair", "priority"):
            raise ValueError("schedule must be 'fair' or 'priority'")
        self.engine = engine
        self.batch_size = batch_size
        self.schedule = schedule
        self.clock = clock
        self.stats = Stats()
        self.running = False
        self._epoll = select.epoll()
        self._masks: dict[int, int] = {}
        self._tun_fd = tun_fd
        self._udp: dict[int, socket.socket] = {}  # fd -> socket
        self._udp_by_family: dict[int, socket.socket] = {}
        self._udp_out: dict[int, _Output] = {}
        self._tun_out = _Output()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timer_sources: list[tuple[Callable[[], float | None], Callback]] = []
        self._last_error_log = float("-inf")
        self._error_tokens = MAX_ERROR_LOGS_PER_SECOND
        self._suppressed: Counter[str] = Counter()
        self.last_error: TunnelError | None = None
        # A TUN packet whose destination is in intercept_v4/v6 is offered to ``intercept`` first
        # (the DNS stub's sentinels); True means it was consumed and is not for the engine.
        self.intercept: Callable[[bytes, float], bool] | None = None
        self.intercept_v4: frozenset[bytes] = frozenset()
        self.intercept_v6: frozenset[bytes] = frozenset()
        self._flushers: list[Callback] = []
        self._tun_queue: list[bytes] = []  # from sources other than the engine (queue_tun)
        self._last_read: dict[int, float] = {}  # data fd -> when a pass last read it
        self._masks_clear = True  # no output waits: every data fd has EPOLLIN and no EPOLLOUT
        if tun_fd is not None:
            self._set_mask(tun_fd, EPOLLIN)

    # ------------------------------------------------------------------ registration

    def _set_mask(self, fd: int, mask: int) -> None:
        old = self._masks.get(fd)
        if old == mask:
            return
        if old is None:
            self._epoll.register(fd, mask)
        else:
            self._epoll.modify(fd, mask)
        self._masks[fd] = mask

    def _unregister(self, fd: int) -> None:
        if self._masks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed

    def set_udp_sockets(self, sockets: list[socket.socket], offload: bool = True) -> None:
        """Replace the UDP sockets (at start, and when the listen port changes).

        With ``offload``, each socket is probed for UDP GSO and GRO; either is used only where the
        kernel accepts it, and GSO is switched off for good on the first EIO (as wireguard-go).
        """
        for fd in list(self._udp):
            self._unregister(fd)
            self._last_read.pop(fd, None)
        self._udp = {s.fileno(): s for s in sockets}
        self._udp_by_family = {s.family: s for s in sockets}
        self._udp_out = {fd: _Output() for fd in self._udp}
        disabled = os.environ.get("FZPOLL_DISABLE_OFFLOAD", "").split(",")  # e.g. "gso,gro"
        self._gso = {fd: offload and "gso" not in disabled and _probe_gso(s) for fd, s in self._udp.items()}
        self._gro = {fd: offload and "gro" not in disabled and _enable_gro(s) for fd, s in self._udp.items()}
        for fd in self._udp:
            self._set_mask(fd, EPOLLIN)

    def offloads(self) -> dict[str, bool]:
        """Which UDP offloads are in use, for logs and ``fzpoll show``."""
        return {"gso": any(self._gso.values()), "gro": any(self._gro.values())}

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update_aux_mask(fd)

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._update_aux_mask(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update_aux_mask(fd)

    def remove_writer(self, fd: int) -> None:
        self._writers.pop(fd, None)
        self._update_aux_mask(fd)

    def _update_aux_mask(self, fd: int) -> None:
        mask = (EPOLLIN if fd in self._readers else 0) | (EPOLLOUT if fd in self._writers else 0)
        if mask:
            self._set_mask(fd, mask)
        else:
            self._unregister(fd)

    def add_flusher(self, callback: Callback) -> None:
        """Called at the end of every pass, before writes: a source sends what it produced
        (the DNS stub's recursive queries) and queues packets for TUN with :meth:`queue_tun`."""
        self._flushers.append(callback)

    def queue_tun(self, packets: list[bytes]) -> None:
        """Packets for the TUN device from a source other than the engine, written this pass."""
        self._tun_queue.extend(packets)

    def add_timer_source(self, next_deadline: Callable[[], float | None], handle: Callback) -> None:
        """Another sans-IO object with deadlines (UAPI idle clients, DNS, watchdog)."""
        self._timer_sources.append((next_deadline, handle))

    # ------------------------------------------------------------------ the loop

    def next_deadline(self) -> float | None:
        return self._earliest(self.engine.next_deadline())

    def _earliest(self, deadline: float | None) -> float | None:
        """The earliest of ``deadline`` (the engine's) and every timer source's deadline."""
        for next_deadline, _ in self._timer_sources:
            d = next_deadline()
            if d is not None and (deadline is None or d < deadline):
                deadline = d
        return deadline

    def run(self) -> None:
        """Run passes until :meth:`stop` (or a TunGone) ends the loop."""
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def run_once(self, max_timeout: float | None = None) -> None:
        """Wait for events or the next deadline, then run one pass.

        The wait is for :meth:`next_deadline` with the engine's part replaced by its O(1) lower
        bound (:meth:`Engine.deadline_hint`): when that comes, the pass's timers look at the exact
        one. This runs between the last write of a pass and the next sleep, so it is kept short."""
        deadline = self._earliest(self.engine.deadline_hint())
        if deadline is None:
            timeout = -1.0
        else:
            timeout = deadline - self.clock()
            if timeout < 0.0:
                timeout = 0.0
        if max_timeout is not None:
            timeout = max_timeout if timeout < 0 else min(timeout, max_timeout)
        try:
            events = self._epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            events = []
        self.run_pass(events, self.clock(), deadline)

    def run_pass(self, events: list[tuple[int, int]], now: float, deadline: float | None | object = _UNKNOWN) -> None:
        """One pass over ``events``. ``deadline`` is the deadline (or a lower bound of it) the wait
        was computed for, if the caller has it: timers are then only looked at when it is due (a
        timer armed during a pass is never due in that pass, and if it were, the next wait would
        not sleep)."""
        self.stats.passes += 1
        drops: Counter[str] = _Drops()  # type: ignore[assignment]
        failures: list[Exception] = []
        ready = dict(events)
        tun_fd = self._tun_fd
        # 1. flush what waited (EPOLLOUT is on a data fd only while a write waits there)
        if not self._masks_clear:
            for fd, mask in events:
                if mask & EPOLLOUT:
                    if fd == tun_fd:
                        self._flush_tun(drops)
                    elif fd in self._udp:
                        self._flush_udp(fd, drops)
        # 2. read a batch from every ready data fd (or, strict priority, from the first)
        udp_batch: list[tuple[bytes, tuple]] = []
        tun_batch: list[bytes] = []
        priority = self.schedule == "priority"
        if not self._tun_out.pending:
            for fd, sock in self._udp.items():
                if ready.get(fd, 0) & EPOLLIN:
                    if self._gro[fd]:
                        self._read_udp_gro(fd, sock, udp_batch, failures, now)
                    else:
                        self._read_udp(fd, sock, udp_batch, failures, now)
        if tun_fd is not None:
            tun_events = ready.get(tun_fd, 0)
            if tun_events & EPOLLERR and not tun_events & EPOLLIN:
                raise TunGone()
            if tun_events & EPOLLIN and not (priority and udp_batch) \
                    and (self._masks_clear or not self._udp_pending()):
                self._read_tun(tun_fd, tun_batch, failures, now)
        # 3. process: UDP, TUN, auxiliary sources, timers
        if udp_batch:
            engine = self.engine
            receive = engine.receive
            if engine.is_under_load(now):
                udp_batch = self._shed_handshakes(udp_batch, drops)
            for data, addr in udp_batch:
                try:
                    reason = receive(data, addr, now)
                    if reason is not None:
                        drops[reason] += 1
                except Exception as exc:  # a bug on one packet must not cost the batch
                    failures.append(exc)
        if tun_batch:
            self._send_batch(tun_batch, drops, failures, now)
        busy = bool(udp_batch or tun_batch)
        if not (priority and busy):
            readers = self._readers
            for fd, mask in events:
                callback = readers.get(fd) if mask & (EPOLLIN | EPOLLERR) else None
                if callback is None and mask & EPOLLOUT:
                    callback = self._writers.get(fd)
                if callback is not None:
                    busy = True
                    try:
                        callback(now)
                    except Exception as exc:
                        failures.append(exc)
        if not (priority and busy):
            if deadline is _UNKNOWN or (deadline is not None and deadline <= now):  # type: ignore[operator]
                self._run_timers(now, failures)
        # 4. sources send what they produced (recursive DNS queries), then write everything
        self._run_flushers(now, failures)
        if self._write_outputs(drops) and not priority and tun_fd is not None:
            # What we just wrote to TUN may have been answered by the kernel during the write
            # (an ICMP echo reply, a TCP ACK or SYN-ACK, more data the ACKs let out): it is in the
            # TUN queue already, so take it now rather than after another epoll round trip.
            if len(tun_batch) < self.batch_size and \
                    (self._masks_clear or not (self._tun_out.pending or self._udp_pending())):
                again: list[bytes] = []  # within the TUN fd's batch for this pass
                self._read_tun(tun_fd, again, failures, now, self.batch_size - len(tun_batch))
                if again:
                    self._send_batch(again, drops, failures, now)
                    self._run_flushers(now, failures)
                    self._write_outputs(drops)
        if not self._masks_clear:
            self._update_masks()
        if drops or failures:
            self._report(drops, failures, now)

    def _run_flushers(self, now: float, failures: list[Exception]) -> None:
        for flush in self._flushers:
            try:
                flush(now)
            except Exception as exc:
                failures.append(exc)

    def _send_batch(self, tun_batch: list[bytes], drops: Counter[str], failures: list[Exception],
                    now: float) -> None:
        """Packets read from TUN: to the interceptor (DNS sentinels) or the engine."""
        send = self.engine.send
        intercept = self.intercept
        if intercept is None:
            for packet in tun_batch:
                try:
                    reason = send(packet, now)
                    if reason is not None:
                        drops[reason] += 1
                except Exception as exc:
                    failures.append(exc)
        else:
            iv4, iv6 = self.intercept_v4, self.intercept_v6
            for packet in tun_batch:
                try:
                    version = packet[0] >> 4 if packet else 0
                    if ((version == 4 and packet[16:20] in iv4) or (version == 6 and packet[24:40] in iv6)) \
                            and intercept(packet, now):
                        continue
                    reason = send(packet, now)
                    if reason is not None:
                        drops[reason] += 1
                except Exception as exc:
                    failures.append(exc)

    def _udp_pending(self) -> bool:
        for out in self._udp_out.values():
            if out.pending:
                return True
        return False

    def _shed_handshakes(self, batch: list, drops: Counter[str]) -> list:
        """Under load, a pass processes at most MAX_HANDSHAKES_PER_PASS handshake messages (each
        costs MACs and a cookie reply, ~12 us); the rest are dropped for the price of a look at
        their first byte, so a handshake flood cannot starve the data path (wireguard-go bounds
        its handshake queue the same way)."""
        budget = MAX_HANDSHAKES_PER_PASS
        kept = []
        shed = 0
        for item in batch:
            kind = item[0][0] if item[0] else 0
            if kind == 1 or kind == 2:
                if budget <= 0:
                    shed += 1
                    continue
                budget -= 1
            kept.append(item)
        if shed:
            drops[D.HANDSHAKE_SHED] += shed
            self.engine.count_drop(D.HANDSHAKE_SHED, shed)
        return kept

    def _run_timers(self, now: float, failures: list[Exception]) -> None:
        deadline = self.engine.next_deadline()
        if deadline is not None and deadline <= now:
            try:
                self.engine.handle_timer(now)
            except Exception as exc:
                failures.append(exc)
        for next_deadline, handle in self._timer_sources:
            try:
                d = next_deadline()
                if d is not None and d <= now:
                    handle(now)
            except Exception as exc:
                failures.append(exc)

    # ------------------------------------------------------------------ reads

    # Each read takes up to batch_size packets, or one if the fd was sparse (see SPARSE_GAP).

    def _read_udp(self, fd: int, sock: socket.socket, batch: list, failures: list[Exception], now: float) -> None:
        last_read = self._last_read
        limit = self.batch_size if now - last_read.get(fd, now) < SPARSE_GAP else 1
        last_read[fd] = now
        recvfrom = sock.recvfrom
        n = 0
        try:
            while n < limit:
                batch.append(recvfrom(_READ_SIZE))
                n += 1
        except BlockingIOError:
            pass
        except OSError as exc:  # e.g. ECONNREFUSED from an ICMP error: the socket stays usable
            failures.append(exc)
        stats = self.stats
        stats.udp_packets += n
        if n > stats.max_udp_batch:
            stats.max_udp_batch = n

    def _read_udp_gro(self, fd: int, sock: socket.socket, batch: list, failures: list[Exception],
                      now: float) -> None:
        """Like :meth:`_read_udp`, but one recvmsg may return a coalesced run of datagrams."""
        last_read = self._last_read
        limit = self.batch_size if now - last_read.get(fd, now) < SPARSE_GAP else 1
        last_read[fd] = now
        recvmsg = sock.recvmsg
        n = 0
        try:
            while n < limit:
                data, ancillary, _, addr = recvmsg(_READ_SIZE, _GRO_CMSG_SPACE)
                size = 0
                if ancillary:  # only a coalesced run carries the segment size
                    for level, kind, value in ancillary:
                        if level == SOL_UDP and kind == UDP_GRO:
                            size = int.from_bytes(value[:4], "little" if _LITTLE else "big")
                if size and len(data) > size:
                    for offset in range(0, len(data), size):
                        batch.append((data[offset : offset + size], addr))
                        n += 1
                else:
                    batch.append((data, addr))
                    n += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            failures.append(exc)
        stats = self.stats
        stats.udp_packets += n
        if n > stats.max_udp_batch:
            stats.max_udp_batch = n

    def _read_tun(self, fd: int, batch: list[bytes], failures: list[Exception], now: float,
                  budget: int | None = None) -> None:
        last_read = self._last_read
        limit = self.batch_size if now - last_read.get(fd, now) < SPARSE_GAP else 1
        if budget is not None and budget < limit:
            limit = budget
        last_read[fd] = now
        read = os.read
        n = 0
        try:
            while n < limit:
                batch.append(read(fd, _READ_SIZE))
                n += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EBADFD, errno.EIO, errno.ENODEV):
                raise TunGone() from None
            failures.append(exc)
        stats = self.stats
        stats.tun_packets += n
        if n > stats.max_tun_batch:
            stats.max_tun_batch = n

    # ------------------------------------------------------------------ writes

    def _write_outputs(self, drops: Counter[str]) -> bool:
        """Write what the engine produced; True if something was written to TUN that the kernel
        may have answered during the write (see :func:`_may_be_answered`)."""
        engine = self.engine
        wrote_tun = False
        packets = engine.packets_for_tun()
        if self._tun_queue:
            packets += self._tun_queue
            self._tun_queue = []
        if packets:
            self._write_tun(packets, drops)
            wrote_tun = _may_be_answered(packets)
        datagrams = engine.datagrams_to_send()
        if datagrams:
            self._write_udp(datagrams, drops)
        return wrote_tun

    def _write_tun(self, packets: list[bytes], drops: Counter[str]) -> None:
        out = self._tun_out
        if out.pending:
            for p in packets:
                if not out.push(p):
                    drops[D.BUFFER_FULL] += 1
            return
        write = os.write
        fd = self._tun_fd
        if fd is None:
            return
        for i, packet in enumerate(packets):
            try:
                write(fd, packet)
            except BlockingIOError:
                self._masks_clear = False  # a write waits now: _update_masks has work
                for p in packets[i:]:
                    if not out.push(p):
                        drops[D.BUFFER_FULL] += 1
                return
            except OSError:
                drops[D.WRITE_FAILED] += 1

    def _write_udp(self, datagrams: list[tuple[bytes, tuple]], drops: Counter[str]) -> None:
        by_family = self._udp_by_family
        v4 = by_family.get(socket.AF_INET)
        v6 = by_family.get(socket.AF_INET6)
        count = len(datagrams)
        i = 0
        while i < count:
            data, addr = datagrams[i]
            sock = v4 if len(addr) == 2 else v6
            if sock is None:
                drops[D.WRITE_FAILED] += 1
                i += 1
                continue
            fd = sock.fileno()
            out = self._udp_out[fd]
            if out.pending:
                if not out.push((data, addr)):
                    drops[D.BUFFER_FULL] += 1
                i += 1
                continue
            end = i + 1
            if end < count and self._gso[fd]:
                end = _gso_run(datagrams, i, count)
            try:
                if end - i > 1:
                    size = len(data)
                    sock.sendmsg([d for d, _ in datagrams[i:end]],
                                 [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little" if _LITTLE else "big"))], 0, addr)
                else:
                    sock.sendto(data, addr)
            except BlockingIOError:
                self._masks_clear = False  # a write waits now: _update_masks has work
                for item in datagrams[i:end]:
                    if not out.push(item):
                        drops[D.BUFFER_FULL] += 1
            except OSError as exc:
                if end - i > 1 and exc.errno == errno.EIO:
                    log.warning("UDP GSO failed with EIO: switched off", extra={"fields": {"fd": fd}})
                    self._gso[fd] = False
                    continue  # resend this run one datagram at a time
                drops[D.WRITE_FAILED] += end - i
            i = end

    def _flush_tun(self, drops: Counter[str]) -> None:
        pending = self._tun_out.pending
        while pending:
            try:
                os.write(self._tun_fd, pending[0])  # type: ignore[arg-type]
            except BlockingIOError:
                return
            except OSError:
                drops[D.WRITE_FAILED] += 1
            pending.popleft()

    def _flush_udp(self, fd: int, drops: Counter[str]) -> None:
        sock = self._udp[fd]
        pending = self._udp_out[fd].pending
        while pending:
            data, addr = pending[0]
            try:
                sock.sendto(data, addr)
            except BlockingIOError:
                return
            except OSError:
                drops[D.WRITE_FAILED] += 1
            pending.popleft()

    def _update_masks(self) -> None:
        """EPOLLOUT only where a write waits; EPOLLIN off on fds feeding a blocked output."""
        if self._masks_clear:
            return  # nothing waited and no write met EAGAIN since: the masks are already right
        tun_blocked = bool(self._tun_out.pending)
        udp_blocked = False
        for fd, out in self._udp_out.items():
            blocked = bool(out.pending)
            udp_blocked |= blocked
            self._set_mask(fd, (0 if tun_blocked else EPOLLIN) | (EPOLLOUT if blocked else 0))
        if self._tun_fd is not None:
            self._set_mask(self._tun_fd, (0 if udp_blocked else EPOLLIN) | (EPOLLOUT if tun_blocked else 0))
        self._masks_clear = not (tun_blocked or udp_blocked)

    def pending_writes(self) -> dict[str, int]:
        depths = {"tun": len(self._tun_out.pending)}
        for fd, out in self._udp_out.items():
            depths[f"udp{'6' if self._udp[fd].family == socket.AF_INET6 else '4'}"] = len(out.pending)
        return depths

    # ------------------------------------------------------------------ the aggregate error

    def _report(self, drops: Counter[str], failures: list[Exception], now: float) -> None:
        error = TunnelError.from_batch(drops, failures)
        if error is None:
            return
        self.last_error = error
        counts = error.counts()
        self.stats.errors.update(counts)
        # A flood must not become a log flood: a few lines per second, the rest summed up.
        self._error_tokens = min(
            MAX_ERROR_LOGS_PER_SECOND, self._error_tokens + (now - self._last_error_log) * MAX_ERROR_LOGS_PER_SECOND
        )
        self._last_error_log = now
        if self._error_tokens < 1.0:
            self._suppressed.update(counts)
            return
        self._error_tokens -= 1.0
        fields: dict = {"counts": counts, "total": sum(counts.values())}
        if self._suppressed:
            fields["suppressed_since_last"] = dict(self._suppressed)
            self._suppressed.clear()
        unexpected = error.exceptions
        if unexpected:
            fields["first_unexpected"] = f"{type(unexpected[0]).__name__}: {unexpected[0]}"
        quiet = all(kind in QUIET_DROPS for kind in counts)
        level = logging.ERROR if unexpected else logging.DEBUG if quiet else logging.WARNING
        log.log(level, str(error.message), extra={"fields": fields})

    def close(self) -> None:
        self._epoll.close()
