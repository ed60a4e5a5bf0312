"""A Linux TUN device: the daemon's side of the tunnel interface.

Opened with ``IFF_TUN | IFF_NO_PI`` so every read and write is exactly one IP packet with no
4-byte packet-info header in front (the header would only repeat what the IP version nibble
already says). The fd is non-blocking because the loop owns all waiting: a read on an empty
queue raises :class:`BlockingIOError` and the loop goes back to epoll.

This is a thin IO wrapper: it knows nothing about WireGuard. Errors that a user can fix (no TUN
driver, no privilege, name taken) become :class:`~fzpoll.errors.LocalError` with a message that
says what to do, instead of a bare ``OSError`` traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from fzpoll.errors import LocalError

# The clone device. Module-level so tests can point it elsewhere.
TUN_PATH = "/dev/net/tun"

# From <linux/if_tun.h>; stable kernel ABI.
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SIOCSIFTXQLEN = 0x8943
SIOCSIFMTU = 0x8922  # <linux/sockios.h>

IFNAMSIZ = 16  # including the terminating NUL: at most 15 visible characters
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags, padded to 40 bytes
_IFREQ_MTU = struct.Struct("16si20x")  # struct ifreq: name, then ifr_mtu

# Largest IP packet a TUN read can return (IPv4 total length is 16 bits; we do not enable GSO).
MAX_PACKET = 65535


def _check_name(name: str) -> bytes:
    """Encode an interface name, rejecting what the kernel would reject less clearly."""
    raw = name.encode("ascii", "replace")
    if not name or len(raw) >= IFNAMSIZ:
        raise LocalError(f"interface name {name!r} must be 1 to {IFNAMSIZ - 1} characters")
    if any(c in name for c in "/ \t\n:") or not name.isascii():
        raise LocalError(f"interface name {name!r} contains an invalid character")
    return raw


class TunDevice:
    """An open, non-blocking TUN interface; closing the fd removes the (non-persistent) link."""

    def __init__(self, name: str) -> None:
        raw = _check_name(name)
        self.fd: int = -1
        self.name: str = name
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LocalError(
                f"{TUN_PATH} does not exist: load the tun module (modprobe tun) or, in a "
                "container, pass the device in (--device /dev/net/tun)"
            ) from None
        except PermissionError:
            raise LocalError(
                f"permission denied opening {TUN_PATH}: run as root or with CAP_NET_ADMIN"
            ) from None
        except OSError as exc:
            raise LocalError(f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            ifr = _IFREQ.pack(raw, IFF_TUN | IFF_NO_PI)
            out = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise _setiff_error(name, exc) from None
        self.fd = fd
        # The kernel writes back the final name (differs only for patterns like "tun%d").
        self.name = _IFREQ.unpack(out)[0].rstrip(b"\0").decode("ascii")

    def set_mtu(self, mtu: int) -> None:
        """Set the interface MTU (SIOCSIFMTU, so no netlink is needed for it).

        wireguard-go creates its TUN with MTU 1420; a TUN left at the kernel's 1500 would send
        1500-byte packets whose encrypted datagrams (1560 B on the wire) need fragmenting.
        """
        ifr = _IFREQ_MTU.pack(self.name.encode("ascii"), int(mtu))
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                fcntl.ioctl(sock.fileno(), SIOCSIFMTU, ifr)
        except OSError as exc:
            raise LocalError(f"cannot set MTU {mtu} on {self.name}: {exc.strerror}") from None

    def set_txqueuelen(self, length: int) -> None:
        """Set how many packets the kernel queues for us to read (SIOCSIFTXQLEN).

        The kernel's default for TUN is 500; a burst larger than that (1000 DNS queries sent at
        once) is dropped before we can read it, so the daemon asks for more.
        """
        ifr = _IFREQ_MTU.pack(self.name.encode("ascii"), int(length))  # same layout: name, int
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                fcntl.ioctl(sock.fileno(), SIOCSIFTXQLEN, ifr)
        except OSError as exc:
            raise LocalError(f"cannot set txqueuelen {length} on {self.name}: {exc.strerror}") from None

    def fileno(self) -> int:
        """The fd, so the device can be registered with selectors/epoll directly."""
        return self.fd

    def read_into(self, buf: bytearray | memoryview) -> int:
        """Read one packet into ``buf`` without allocating; raises BlockingIOError when empty.

        A packet longer than ``buf`` is truncated by the kernel, so pass a buffer of at least the
        interface MTU.
        """
        return os.readv(self.fd, [buf])

    def read(self) -> bytes:
        """Read one packet as new bytes; raises BlockingIOError when none is queued."""
        return os.read(self.fd, MAX_PACKET)

    def write(self, packet: bytes | bytearray | memoryview) -> int:
        """Write one whole IP packet; raises BlockingIOError if the kernel queue is full."""
        return os.write(self.fd, packet)

    def close(self) -> None:
        """Close the fd (idempotent); the kernel then deletes the interface."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "TunDevice":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TunDevice(name={self.name!r}, fd={self.fd})"


def _setiff_error(name: str, exc: OSError) -> LocalError:
    """Turn a TUNSETIFF failure into an error that says what to do about it."""
    if exc.errno in (errno.EPERM, errno.EACCES):
        return LocalError(
            f"creating TUN interface {name!r} needs CAP_NET_ADMIN (run as root or grant the "
            "capability)"
        )
    if exc.errno == errno.EBUSY:
        return LocalError(f"TUN interface {name!r} is busy: another process has it open")
    if exc.errno == errno.EINVAL:
        return LocalError(
            f"cannot create TUN interface {name!r}: the name is invalid or taken by an "
            "interface of another type"
        )
    return LocalError(f"cannot create TUN interface {name!r}: {exc.strerror}")
