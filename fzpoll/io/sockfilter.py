"""Attach the WireGuard prefilter (:mod:`fzpoll.io.bpf`) to UDP sockets, and read what the kernel
dropped for them.

``SO_ATTACH_FILTER`` takes a ``struct sock_fprog`` (a length and a pointer to the instructions);
the kernel copies the program during the call, so the buffer only has to outlive it. Attaching
again replaces the program atomically. ``FZPOLL_DISABLE_FILTER=1`` turns the filter off; a kernel
that refuses it (no CONFIG_BPF, a seccomp policy) leaves the socket unfiltered, logged once.

Counting: the kernel does not count filter rejects apart. A rejected datagram increments the
socket's ``sk_drops`` - as does a datagram dropped because the receive buffer was full (and one
with a bad checksum) - and ``sk_drops`` is what ``SO_MEMINFO`` reports (``SK_MEMINFO_DROPS``), the
"drops" column of /proc/net/udp and the ``SO_RXQ_OVFL`` ancillary value. So ``fzpoll show`` prints
one per-socket figure, "kernel drops": junk the filter rejected plus receive-buffer overflows.

Replays (:class:`ReplayGuard`): a replayed transport datagram carries a live receiver index and a
well-formed header, so only its counter gives it away. While a replay flood is seen, the program
gets a counter floor per session: the newest counter the engine had accepted at the last refresh
minus REPLAY_FLOOR_MARGIN. The trade-off: the engine itself accepts anything unseen within
REPLAY_WINDOW_SIZE (8128) behind its newest counter, as wireguard-go and the kernel do, so a
legitimate datagram reordered by more than the margin is dropped by the floor (and counted among
the kernel drops) - but only during a flood; without one the program has no floor at all. On a
UDP_GRO socket a coalesced run is judged by its first datagram (the lowest counter of a run the
peer sent): a run that GRO merged behind a replay from a spoofed peer address is dropped whole.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct
from typing import Callable

from fzpoll.errors import DropReason
from fzpoll.io.bpf import MAX_FILTER_INDICES, pack, wireguard_filter

log = logging.getLogger("fzpoll.io.sockfilter")

SO_ATTACH_FILTER = 26  # asm-generic/socket.h
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8  # linux/sock_diag.h: index in the SO_MEMINFO array
SK_MEMINFO_VARS = 9
DISABLE_ENV = "FZPOLL_DISABLE_FILTER"
INDEX_ENV = "FZPOLL_FILTER_INDICES"
INITIATION_KEEP_UNDER_LOAD = 4096  # in 65536: 1/16 of the initiations reach the loop under load
REPLAY_FLOOD_CHECK = 0.05  # s between samples of the replay rate (and floor refreshes while on)
REPLAY_FLOOD_RATE = 1000  # replays per second (once on: kernel drops per second) that mean a flood
REPLAY_FLOOD_HOLD = 1.0  # s the floors stay after the last sample above the rate
REPLAY_FLOOR_MARGIN = 64  # counters below the newest accepted (at the refresh) that still pass


def filter_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def index_check_enabled() -> bool:
    """Receiver indices checked in the kernel too (``FZPOLL_FILTER_INDICES=0``: not)."""
    return os.environ.get(INDEX_ENV, "1") != "0"


def attach(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach ``program`` to ``sock`` (raises OSError if the kernel refuses it)."""
    code = pack(program)
    buf = ctypes.create_string_buffer(code, len(code))  # referenced until setsockopt returns
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach(sock: socket.socket) -> None:
    """Remove the socket's filter (none attached, or a closed socket: nothing to do)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass


def replace(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Attach ``program`` in place of the socket's filter. The kernel charges the new program to
    the socket (optmem_max, 20 KiB on older kernels) before it frees the old one: two large
    programs (200 counter floors) may not fit together where one does, so retry alone."""
    try:
        attach(sock, program)
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        detach(sock)
        attach(sock, program)


def attach_wireguard(sock: socket.socket, gro: bool) -> bool:
    """Attach the WireGuard prefilter unless disabled; False (logged) if not attached."""
    if filter_disabled():
        return False
    try:
        attach(sock, wireguard_filter(gro))
        return True
    except OSError as exc:
        log.warning("kernel prefilter unavailable, every datagram reaches the loop",
                    extra={"fields": {"error": exc.strerror or str(exc)}})
        return False


def kernel_drops(sock: socket.socket) -> int | None:
    """The socket's ``sk_drops``: datagrams the filter rejected or the full buffer refused."""
    try:
        info = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    except OSError:
        return None
    if len(info) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return struct.unpack_from("=I", info, 4 * SK_MEMINFO_DROPS)[0]


class ReplayGuard:
    """When the prefilter carries counter floors: from a sample of the engine's ``replayed`` drops
    above REPLAY_FLOOD_RATE until REPLAY_FLOOD_HOLD after the last sample above it. Once on, the
    replays are dropped in the kernel and stop reaching the engine, so the kernel's drops above
    the rate also keep it on (a flood of junk alongside too: it only costs reordering). Sampled at
    most every REPLAY_FLOOD_CHECK (a comparison per loop pass otherwise), and never wakes the loop.
    """

    def __init__(self) -> None:
        self.active = False
        self.activations = 0  # replay floods seen since start (for fzpoll show)
        self.due_at = REPLAY_FLOOD_CHECK  # the next sample (the prefilter compares it in every pass)
        self._sampled_at = 0.0
        self._replays = 0
        self._kernel_drops = 0
        self._until = 0.0

    def sample(self, now: float, replays: int, kernel_drops: Callable[[], int]) -> bool:
        """Take the engine's replay count and the sockets' kernel drops (both since start); True
        if the floors are to be attached again: switched on, refreshed, or switched off.
        ``kernel_drops`` is read only while its count matters (the floors are on, or go on now):
        it is a getsockopt per socket, in the pass of whatever packet comes after 50 ms - a
        ping's, on the latency path (BENCHMARKS.md, issue 16, session 11)."""
        threshold = REPLAY_FLOOD_RATE * (now - self._sampled_at)
        flood = replays - self._replays >= threshold
        if flood or self.active:
            drops = kernel_drops()
            flood = flood or drops - self._kernel_drops >= threshold
            self._kernel_drops = drops
        self._sampled_at, self._replays = now, replays
        self.due_at = now + REPLAY_FLOOD_CHECK
        if flood:
            self.activations += not self.active
            self.active, self._until = True, now + REPLAY_FLOOD_HOLD
            return True
        if self.active and now >= self._until:
            self.active = False
            return True
        return self.active


class PrefilterControl:
    """Keeps the prefilter of a device's sockets in step with the engine; called once per loop
    pass (a loop flusher: after the pass's input, before its output is written, so a receiver
    index is in the filter before the response that announces it leaves).

    Under load (the engine answers initiations with cookie replies) only a random
    INITIATION_KEEP_UNDER_LOAD in 65536 initiations reach the socket: a flood of initiations with
    valid MAC1 from spoofed sources is shed in the kernel, as the loop's per-pass budget sheds it
    in Python, but before it fills the receive queue ahead of the tunnel's own datagrams. With
    ``check_indices``, transport datagrams must carry a live receiver index.
    """

    def __init__(self, engine, gro: bool, check_indices: bool) -> None:
        self.engine = engine
        self.gro = gro
        self.check_indices = check_indices
        self.sockets: list[socket.socket] = []
        self.attached = False
        self.updates = 0  # programs attached since start (for fzpoll show)
        self.under_load = False
        self.replay = ReplayGuard()
        self.floors_on = False  # the attached program carries counter floors (for fzpoll show)
        self._indices: frozenset[int] = frozenset()
        self._generation = -1  # of the engine's indices when the program was built
        self._program: list[tuple[int, int, int, int]] = []

    def set_sockets(self, sockets: list[socket.socket], gro: bool) -> bool:
        """Filter these sockets from now on; False if the filter is off or refused."""
        self.sockets, self.gro = sockets, gro
        self.attached = not filter_disabled()
        self._program = []
        self._attach()
        return self.attached

    def __call__(self, now: float) -> None:
        """The pass's check. It runs in every pass, on a lone packet's latency path too: when
        nothing changed it is the engine's two O(1) answers and a comparison with the replay
        guard's next sample, calling nothing else."""
        if not self.attached:
            return
        engine = self.engine
        rebuild = engine.is_under_load(now) != self.under_load
        if self.check_indices:
            generation = engine.index_generation()
            if generation != self._generation:
                indices = engine.live_indices()
                self._generation = generation
                # beyond MAX_FILTER_INDICES both programs check no index: the same program
                rebuild |= indices != self._indices and (len(indices) <= MAX_FILTER_INDICES
                                                         or len(self._indices) <= MAX_FILTER_INDICES)
                rebuild |= self.replay.active  # a new session (even at a reused index) has no floor
                self._indices = indices
            if now >= self.replay.due_at:
                rebuild |= self.replay.sample(now, engine.drops.get(DropReason.REPLAYED, 0), self._kernel_drops)
        if rebuild:
            self._attach(now)

    def _kernel_drops(self) -> int:
        return sum(kernel_drops(s) or 0 for s in self.sockets)

    def _floors(self, indices: frozenset[int] | None) -> dict[int, int] | None:
        """Counter floors while a replay flood is on: below them the engine may still accept a
        datagram only if it was reordered by more than REPLAY_FLOOR_MARGIN."""
        if indices is None or not self.replay.active:
            return None
        return {i: newest - REPLAY_FLOOR_MARGIN for i, newest in self.engine.receive_counters().items()
                if i in indices}

    def _attach(self, now: float | None = None) -> None:
        self.under_load = now is not None and self.engine.is_under_load(now)
        indices = None
        if self.check_indices:
            self._indices = self.engine.live_indices()
            self._generation = self.engine.index_generation()
            indices = self._indices if len(self._indices) <= MAX_FILTER_INDICES else None
        floors = self._floors(indices)
        program = wireguard_filter(self.gro, receiver_indices=indices, counter_floors=floors,
                                   initiation_keep=INITIATION_KEEP_UNDER_LOAD if self.under_load else None)
        if program == self._program:
            return  # e.g. floors refreshed while no datagram of the sessions arrived
        self._program = program
        self.floors_on = any(floor > 0 for floor in (floors or {}).values())
        for sock in self.sockets:
            if self.attached:
                try:
                    replace(sock, program)
                except OSError as exc:
                    log.warning("kernel prefilter unavailable, every datagram reaches the loop",
                                extra={"fields": {"error": exc.strerror or str(exc)}})
                    self.attached = False
        if not self.attached:  # no earlier program left behind: its indices and floors go stale
            self.floors_on = False
            for sock in self.sockets:
                detach(sock)
        self.updates += 1
