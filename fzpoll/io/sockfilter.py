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
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct

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
        self._indices: frozenset[int] = frozenset()
        self._generation = -1  # of the engine's indices when the program was built

    def set_sockets(self, sockets: list[socket.socket], gro: bool) -> bool:
        """Filter these sockets from now on; False if the filter is off or refused."""
        self.sockets, self.gro = sockets, gro
        self.attached = not filter_disabled()
        self._attach()
        return self.attached

    def __call__(self, now: float) -> None:
        if not self.attached:
            return
        if self.engine.is_under_load(now) != self.under_load:
            self._attach(now)
        elif self.check_indices and self.engine.index_generation() != self._generation:
            indices = self.engine.live_indices()
            self._generation = self.engine.index_generation()
            if indices != self._indices and (len(indices) <= MAX_FILTER_INDICES
                                             or len(self._indices) <= MAX_FILTER_INDICES):
                self._attach(now)  # else: too many to check in the kernel either way, same program
            self._indices = indices

    def _attach(self, now: float | None = None) -> None:
        self.under_load = now is not None and self.engine.is_under_load(now)
        indices = None
        if self.check_indices:
            self._indices = self.engine.live_indices()
            self._generation = self.engine.index_generation()
            indices = self._indices if len(self._indices) <= MAX_FILTER_INDICES else None
        program = wireguard_filter(self.gro, receiver_indices=indices,
                                   initiation_keep=INITIATION_KEEP_UNDER_LOAD if self.under_load else None)
        for sock in self.sockets:
            if self.attached:
                try:
                    attach(sock, program)
                except OSError as exc:
                    log.warning("kernel prefilter unavailable, every datagram reaches the loop",
                                extra={"fields": {"error": exc.strerror or str(exc)}})
                    self.attached = False
        self.updates += 1
