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

from fzpoll.io.bpf import pack, wireguard_filter

log = logging.getLogger("fzpoll.io.sockfilter")

SO_ATTACH_FILTER = 26  # asm-generic/socket.h
SO_DETACH_FILTER = 27
SO_MEMINFO = 55
SK_MEMINFO_DROPS = 8  # linux/sock_diag.h: index in the SO_MEMINFO array
SK_MEMINFO_VARS = 9
DISABLE_ENV = "FZPOLL_DISABLE_FILTER"


def filter_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


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
