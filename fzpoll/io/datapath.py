"""The WireGuard datapath: TUN and UDP batches in, the engine in the middle, writes out.

Theory of operation
-------------------
The datapath owns the data fds - the TUN device and the UDP sockets (:mod:`fzpoll.io.udp`) - and
plugs two steps into every pass of the :class:`~fzpoll.io.loop.Loop`:

``take_input`` (before the auxiliary sources and timers):

1. flush the writes that were left pending by an earlier EAGAIN (EPOLLOUT is on a data fd only
   while a write waits there);
2. read **up to** ``batch_size`` packets from **every** ready data fd (UDP and TUN), so that every
   source makes progress on every tick: a busy UDP socket cannot starve the TUN device;
3. process the UDP batch (engine.receive_batch; handshakes beyond a budget shed under load), then
   the TUN batch (engine.send_batch; a packet to the DNS sentinels goes to the intercept first).
   The engine takes a whole batch: a run of packets for one peer costs its per-run work once.

``give_output`` (after the loop's timers and flushers):

4. write what the engine produced and what other sources queued for TUN; a write that meets
   EAGAIN waits in a bounded buffer, and the fd gets EPOLLOUT only while something waits there.
   If what went to TUN may have been answered by the kernel during the write (an ICMP echo
   request, TCP), TUN is read once more, within its batch for the pass, and that is processed and
   written too: the answer is already queued, and taking it now saves a whole epoll round trip on
   the latency path.

A data fd read less than SPARSE_GAP ago is drained (up to the batch); one that was idle gets a
single read, and level triggering brings back whatever is left: a lone packet (a ping) then costs
no read ending in EAGAIN, while a burst is drained from its second pass on.

Backpressure: while the TUN output is blocked we stop *reading* UDP (which feeds it), and while a
UDP output is blocked we stop reading TUN (which feeds it), by taking EPOLLIN off the feeding fds.
A burst then waits in the kernel's socket and TUN queues, not in our memory; a packet is dropped
(and counted) only when a bounded buffer is full.

Errors: a drop reason returned by the engine, or an exception around one packet, is counted in
the pass's drops/failures and reported by the loop after the pass; a bad packet costs exactly
itself. ``schedule="priority"`` (the loop's): TUN is not read in a pass that read UDP, and there
is no re-read.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Callable

from fzpoll.errors import DropReason as D
from fzpoll.io.loop import EPOLLERR, EPOLLIN, EPOLLOUT, MAX_PENDING_WRITES, Loop, Outbox
from fzpoll.io.tun import MAX_FRAME
from fzpoll.io.udp import READ_SIZE, Datagram, UdpSockets
from fzpoll.io.vnet import F_NEEDS_CSUM, GSO_NONE, VNET_HDR_LEN, coalesce, split_frame
from fzpoll.ippacket import destination_in, may_be_answered
from fzpoll.wireguard.constants import (
    DEFAULT_BATCH_SIZE,
    MAX_HANDSHAKES_PER_PASS,
    MESSAGE_HANDSHAKE_INITIATION,
    MESSAGE_HANDSHAKE_RESPONSE,
)
from fzpoll.wireguard.engine import Engine

# A data fd that was last read longer ago than this is "sparse": its next wakeup reads one packet
# and leaves the rest (if any) to the level-triggered epoll, instead of draining it with a read
# that ends in EAGAIN. The EAGAIN read costs a syscall and an exception right on the latency path
# of a lone packet (a ping), while a burst is drained from its second pass on.
SPARSE_GAP = 0.001
_TUN_GONE = (errno.EBADFD, errno.EIO, errno.ENODEV)


class TunGone(Exception):
    """The TUN interface was deleted under us: the daemon should exit cleanly."""


class Stats:
    """Counters ``fzpoll show`` prints and wg cannot: passes, batch sizes, errors by kind."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.udp_packets = 0
        self.tun_packets = 0
        self.max_udp_batch = 0
        self.max_tun_batch = 0

    def as_dict(self) -> dict:
        return {
            "passes": self.loop.passes,
            "udp_packets_in": self.udp_packets,
            "tun_packets_in": self.tun_packets,
            "max_udp_batch": self.max_udp_batch,
            "max_tun_batch": self.max_tun_batch,
            "errors": dict(self.loop.report.errors),
        }


class Datapath:
    """Feeds one :class:`Engine` from the TUN fd and the UDP sockets of a :class:`Loop`."""

    def __init__(self, engine: Engine, loop: Loop, tun_fd: int | None, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_pending: int = MAX_PENDING_WRITES,
                 tun_vnet: bool = False) -> None:
        self.engine = engine
        self.loop = loop
        self.batch_size = batch_size
        self.stats = Stats(loop)
        self.udp = UdpSockets(loop, max_pending)
        self.udp.on_blocked = self._blocked
        self.udp.on_source_gone = engine.forget_local
        self._priority = loop.schedule == "priority"
        self._tun_fd = tun_fd
        # The TUN device has virtio-net headers (offloads, fzpoll.io.tun): a read is a frame that
        # may hold a super-packet to split, and what goes to TUN is coalesced into frames.
        self._tun_vnet = tun_vnet
        self._tun_out = Outbox(max_pending)
        self._to_tun: list[bytes] = []  # packets other sources queued for TUN this pass
        # A TUN packet whose destination is in intercept_v4/v6 is offered to ``intercept`` first
        # (the DNS stub's sentinels); True means it was consumed and is not for the engine.
        self.intercept: Callable[[bytes, float], bool] | None = None
        self.intercept_v4: frozenset[bytes] = frozenset()
        self.intercept_v6: frozenset[bytes] = frozenset()
        self._last_read: dict[int, float] = {}  # data fd -> when a pass last read it
        self._tun_taken = 0  # packets read from TUN in this pass (its re-read stays within the batch)
        self._masks_clear = True  # no output waits: every data fd has EPOLLIN and no EPOLLOUT
        loop.add_timer_source(engine.next_deadline, engine.handle_timer, hint=engine.deadline_hint)
        loop.attach(self)
        if tun_fd is not None:
            loop.set_mask(tun_fd, EPOLLIN, force=True)

    # ------------------------------------------------------------------ wiring

    def set_udp_sockets(self, sockets: list[socket.socket], offload: bool = True) -> None:
        """Replace the UDP sockets (at start, and when the listen port changes); close the old
        ones only after this. With ``offload``, GSO/GRO are probed (see :mod:`fzpoll.io.udp`)."""
        for fd in self.udp.replace(sockets, offload):
            self._last_read.pop(fd, None)
        self.engine.forget_local()  # the sticky sources were seen on the old sockets

    def set_intercept(self, intercept: Callable[[bytes, float], bool], v4: frozenset[bytes],
                      v6: frozenset[bytes]) -> None:
        """Offer TUN packets to these (packed) destinations to ``intercept`` before the engine."""
        self.intercept, self.intercept_v4, self.intercept_v6 = intercept, v4, v6

    def queue_tun(self, packets: list[bytes]) -> None:
        """Packets for the TUN device from a source other than the engine, written this pass."""
        self._to_tun.extend(packets)

    def offloads(self) -> dict[str, bool]:
        """Which UDP offloads are in use, for logs and ``fzpoll show``."""
        return self.udp.offloads()

    def pending_writes(self) -> dict[str, int]:
        depths = {"tun": len(self._tun_out.pending)}
        depths.update(self.udp.pending_writes())
        return depths

    # ------------------------------------------------------------------ the pass's two steps

    def take_input(self, events: list[tuple[int, int]], now: float, drops: dict[str, int],
                   failures: list[Exception]) -> bool:
        """Steps 1-3: flush what waited, read a batch from every ready data fd, process it."""
        if not self._masks_clear:
            self._flush_waiting(events, drops)
        udp_batch: list[Datagram] = []
        tun_batch: list[bytes] = []
        self._read(events, now, udp_batch, tun_batch, failures)
        self._tun_taken = len(tun_batch)
        if udp_batch:
            self._receive(udp_batch, now, drops, failures)
        if tun_batch:
            self._send(tun_batch, now, drops, failures)
        return bool(udp_batch or tun_batch)

    def give_output(self, now: float, drops: dict[str, int], failures: list[Exception]) -> None:
        """Step 4: write everything, re-read TUN if the kernel may have answered, set the masks."""
        if self._write(drops) and not self._priority and self._tun_fd is not None:
            self._reread(now, drops, failures)
        if not self._masks_clear:
            self._update_masks()

    # ------------------------------------------------------------------ steps

    def _flush_waiting(self, events: list[tuple[int, int]], drops: dict[str, int]) -> None:
        tun_fd = self._tun_fd
        udp = self.udp
        for fd, mask in events:
            if mask & EPOLLOUT:
                if fd == tun_fd:
                    self._flush_tun(drops)
                elif fd in udp.by_fd:
                    udp.flush(fd, drops)

    def _read(self, events: list[tuple[int, int]], now: float, udp_batch: list[Datagram],
              tun_batch: list[bytes], failures: list[Exception]) -> None:
        """A batch from every ready data fd (strict priority: TUN only if UDP had nothing). The
        UDP sockets are read in the order epoll reported them, then TUN."""
        last_read = self._last_read  # each read's limit: a batch, or one if the fd was sparse (SPARSE_GAP)
        tun_fd = self._tun_fd
        tun_events = 0
        udp = self.udp
        by_fd = udp.by_fd
        udp_open = not self._tun_out.pending  # UDP feeds TUN: not read while TUN's writes wait
        for fd, mask in events:
            if fd == tun_fd:
                tun_events = mask
            elif mask & EPOLLIN and udp_open and fd in by_fd:
                limit = self.batch_size if now - last_read.get(fd, now) < SPARSE_GAP else 1
                last_read[fd] = now
                n = udp.read(fd, by_fd[fd], udp_batch, failures, limit)
                stats = self.stats
                stats.udp_packets += n
                if n > stats.max_udp_batch:
                    stats.max_udp_batch = n
        if tun_events:
            if tun_events & EPOLLERR and not tun_events & EPOLLIN:
                raise TunGone()
            if tun_events & EPOLLIN and not (self._priority and udp_batch) \
                    and (self._masks_clear or not udp.pending()):
                limit = self.batch_size if now - last_read.get(tun_fd, now) < SPARSE_GAP else 1
                last_read[tun_fd] = now
                self._read_tun(tun_fd, tun_batch, failures, limit)

    def _receive(self, batch: list[Datagram], now: float, drops: dict[str, int],
                 failures: list[Exception]) -> None:
        engine = self.engine
        if engine.is_under_load(now):
            batch = self._shed_handshakes(batch, drops)
        for reason in engine.receive_batch(batch, now, failures):  # a bad datagram costs only itself
            drops[reason] += 1

    def _send(self, batch: list[bytes], now: float, drops: dict[str, int], failures: list[Exception]) -> None:
        """Packets read from TUN, to the engine in one batch; with an interceptor (DNS sentinels
        and resources), each packet to one of its destinations is offered to it first, and the
        engine takes what came before that packet first (the interceptor may send too)."""
        intercept = self.intercept
        start = 0
        if intercept is not None:
            iv4, iv6 = self.intercept_v4, self.intercept_v6
            for i, packet in enumerate(batch):
                if destination_in(packet, iv4, iv6):
                    self._send_to_engine(batch[start:i], now, drops, failures)
                    start = i + 1
                    try:
                        if not intercept(packet, now):
                            start = i
                    except Exception as exc:
                        failures.append(exc)
        self._send_to_engine(batch[start:] if start else batch, now, drops, failures)

    def _send_to_engine(self, packets: list[bytes], now: float, drops: dict[str, int],
                        failures: list[Exception]) -> None:
        if packets:
            for reason in self.engine.send_batch(packets, now, failures):
                drops[reason] += 1

    def _shed_handshakes(self, batch: list, drops: dict[str, int]) -> list:
        """Under load, a pass processes at most MAX_HANDSHAKES_PER_PASS handshake messages (each
        costs MACs and a cookie reply, ~12 us); the rest are dropped for the price of a look at
        their first byte, so a handshake flood cannot starve the data path (wireguard-go bounds
        its handshake queue the same way)."""
        budget = MAX_HANDSHAKES_PER_PASS
        kept = []
        shed = 0
        for item in batch:
            kind = item[0][0] if item[0] else 0
            if kind == MESSAGE_HANDSHAKE_INITIATION or kind == MESSAGE_HANDSHAKE_RESPONSE:
                if budget <= 0:
                    shed += 1
                    continue
                budget -= 1
            kept.append(item)
        if shed:
            drops[D.HANDSHAKE_SHED] += shed
            self.engine.count_drop(D.HANDSHAKE_SHED, shed)
        return kept

    def _reread(self, now: float, drops: dict[str, int], failures: list[Exception]) -> None:
        """What was just written to TUN may have been answered by the kernel during the write (an
        ICMP echo reply, a TCP ACK or SYN-ACK, more data the ACKs let out): it is in the TUN queue
        already, so take it now rather than after another epoll round trip."""
        taken = self._tun_taken
        if taken < self.batch_size and \
                (self._masks_clear or not (self._tun_out.pending or self.udp.pending())):
            fd: int = self._tun_fd  # type: ignore[assignment]
            last_read = self._last_read  # the limit as in _read, within the TUN fd's batch for this pass
            limit = self.batch_size - taken if now - last_read.get(fd, now) < SPARSE_GAP else 1
            last_read[fd] = now
            again: list[bytes] = []
            self._read_tun(fd, again, failures, limit)
            if again:
                self._send(again, now, drops, failures)
                self.loop.run_flushers(now, failures)
                self._write(drops)

    def _read_tun(self, fd: int, batch: list[bytes], failures: list[Exception], limit: int) -> None:
        """Up to ``limit`` packets; with virtio-net headers a frame may hold many (a super-packet
        split by :func:`~fzpoll.io.vnet.split_frame`), and they all count against the limit."""
        read = os.read
        n = 0
        try:
            if self._tun_vnet:
                while n < limit:
                    frame = read(fd, MAX_FRAME)
                    if len(frame) > VNET_HDR_LEN and frame[1] == GSO_NONE and not frame[0] & F_NEEDS_CSUM:
                        batch.append(frame[VNET_HDR_LEN:])  # a plain packet (the usual case): no call
                        n += 1
                        continue
                    packets = split_frame(frame)
                    if packets is None:
                        self.engine.count_drop(D.BAD_TUN_FRAME)
                        n += 1
                        continue
                    batch += packets
                    n += len(packets)
            else:
                while n < limit:
                    batch.append(read(fd, READ_SIZE))
                    n += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in _TUN_GONE:
                raise TunGone() from None
            failures.append(exc)
        stats = self.stats
        stats.tun_packets += n
        if n > stats.max_tun_batch:
            stats.max_tun_batch = n

    # ------------------------------------------------------------------ writes

    def _write(self, drops: dict[str, int]) -> bool:
        """Write what the engine produced and what was queued for TUN; True if something was
        written to TUN that the kernel may have answered during the write."""
        engine = self.engine
        wrote_tun = False
        packets = engine.packets_for_tun()
        if self._to_tun:
            queued, self._to_tun = self._to_tun, []
            packets = packets + queued if packets else queued
        if packets:
            self._write_tun(packets, drops)
            wrote_tun = may_be_answered(packets)
        datagrams = engine.datagrams_to_send()
        if datagrams:
            self.udp.write(datagrams, drops)
        return wrote_tun

    def _blocked(self) -> None:
        self._masks_clear = False  # a write waits now: _update_masks has work

    def _write_tun(self, packets: list[bytes], drops: dict[str, int]) -> None:
        if self._tun_vnet:
            # Decrypted packets were authenticated by the engine, and those other sources queue
            # (DNS answers) are built here with their checksums: nothing to check again.
            packets = coalesce(packets, authenticated=True)
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
                self._masks_clear = False
                for p in packets[i:]:
                    if not out.push(p):
                        drops[D.BUFFER_FULL] += 1
                return
            except OSError:
                drops[D.WRITE_FAILED] += 1

    def _flush_tun(self, drops: dict[str, int]) -> None:
        pending = self._tun_out.pending
        while pending:
            try:
                os.write(self._tun_fd, pending[0])  # type: ignore[arg-type]
            except BlockingIOError:
                return
            except OSError:
                drops[D.WRITE_FAILED] += 1
            pending.popleft()

    def _update_masks(self) -> None:
        """EPOLLOUT only where a write waits; EPOLLIN off on fds feeding a blocked output."""
        tun_blocked = bool(self._tun_out.pending)
        udp_blocked = False
        set_mask = self.loop.set_mask
        for fd, out in self.udp.outboxes.items():
            blocked = bool(out.pending)
            udp_blocked |= blocked
            set_mask(fd, (0 if tun_blocked else EPOLLIN) | (EPOLLOUT if blocked else 0))
        if self._tun_fd is not None:
            set_mask(self._tun_fd, (0 if udp_blocked else EPOLLIN) | (EPOLLOUT if tun_blocked else 0))
        self._masks_clear = not (tun_blocked or udp_blocked)
