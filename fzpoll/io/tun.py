"""A Linux TUN device: the daemon's side of the tunnel interface.

Opened with ``IFF_TUN | IFF_NO_PI`` so every read and write is exactly one IP packet with no
4-byte packet-info header in front (the header would only repeat what the IP version nibble
already says). The fd is non-blocking because the loop owns all waiting: a read on an empty
queue raises :class:`BlockingIOError` and the loop goes back to epoll.

With ``offload=True`` the device is opened with ``IFF_VNET_HDR``: every read and write carries a
10-byte virtio-net header, and a write may be a TCP super-packet that the kernel takes in one go
(:func:`fzpoll.io.vnet.coalesce` builds them, as upstream wireguard-go's GRO). With
``segmentation=True`` too, ``TUNSETOFFLOAD`` asks for checksum offload, TSO4/TSO6 and (linux
6.2+) USO4/USO6, as upstream wireguard-go does, and reads may be ~64 KiB super-packets
(:func:`fzpoll.io.vnet.split_frame` cuts them). What the kernel refuses is probed, not assumed:
USO is dropped first, then the offloads altogether, in which case the device is opened plain,
exactly as without offloads. :attr:`TunDevice.offloads` says what is on.

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
from collections.abc import Mapping

from fzpoll.errors import LocalError

# The clone device. Module-level so tests can point it elsewhere.
TUN_PATH = "/dev/net/tun"

# From <linux/if_tun.h>; stable kernel ABI.
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int): the IFF_ flags the driver supports
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # linux 6.2+ (Debian 12's headers predate them)
TUN_F_USO6 = 0x40
# What we ask for, richest first: the kernel answers EINVAL to a flag it does not know.
OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
)
OFFLOAD_NAMES = {TUN_F_CSUM: "csum", TUN_F_TSO4: "tso4", TUN_F_TSO6: "tso6", TUN_F_USO4: "uso4",
                 TUN_F_USO6: "uso6"}
SIOCSIFTXQLEN = 0x8943
SIOCSIFMTU = 0x8922  # <linux/sockios.h>

IFNAMSIZ = 16  # including the terminating NUL: at most 15 visible characters
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags, padded to 40 bytes
_IFREQ_MTU = struct.Struct("16si20x")  # struct ifreq: name, then ifr_mtu

# Largest IP packet a TUN read can return (IPv4 total length is 16 bits; a GSO super-packet
# too; an IPv6 one adds its fixed header), and the largest read with a virtio-net header.
MAX_PACKET = 65535
MAX_FRAME = 10 + 40 + 65535


def offload_disabled(environ: Mapping[str, str] = os.environ) -> bool:
    """FZPOLL_DISABLE_OFFLOAD=tun (a comma-separated list, as gso,gro) turns TUN offloads off."""
    return "tun" in environ.get("FZPOLL_DISABLE_OFFLOAD", "").split(",")


def segmentation_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """FZPOLL_ENABLE_OFFLOAD=tso also asks the kernel for TSO/USO/checksum offload on TUN reads
    (super-packets, split in Python). Off by default: measured slower here (BENCHMARKS.md, issue
    16) - a 64 KB super-packet costs a pass ~0.3 ms of splitting and encrypting before any of it
    leaves, and the sender's TCP small queues then keep only about two of them in flight."""
    return "tso" in environ.get("FZPOLL_ENABLE_OFFLOAD", "").split(",")


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

    def __init__(self, name: str, offload: bool = False, segmentation: bool = True) -> None:
        """``offload``: virtio-net headers, so that writes can be GSO frames; ``segmentation``
        too: ask for TSO/USO/CSUM, so that reads can be super-packets (else single packets)."""
        raw = _check_name(name)
        self.fd: int = -1
        self.name: str = name
        self.vnet_hdr: bool = False  # every read and write carries a virtio-net header
        self.offload_flags: int = 0  # the TUN_F_* flags the kernel accepted
        if offload and _has_vnet_hdr():
            self._setiff(raw, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
            self.offload_flags = _set_offload(self.fd) if segmentation else 0
            if self.offload_flags or not segmentation:
                self.vnet_hdr = True
                return
            self.close()  # nothing accepted: the plain device, as without offloads
        self._setiff(raw, IFF_TUN | IFF_NO_PI)

    @property
    def offloads(self) -> list[str]:
        """The offloads on, by name (``["gro", "csum", "tso4", ...]``: ``gro`` for the
        coalesced writes), for logs and ``fzpoll show``."""
        on = [label for flag, label in OFFLOAD_NAMES.items() if self.offload_flags & flag]
        return ["gro", *on] if self.vnet_hdr else on

    def _setiff(self, raw: bytes, flags: int) -> None:
        fd = _open()
        try:
            out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
        except OSError as exc:
            os.close(fd)
            raise _setiff_error(self.name, exc) from None
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
        """Read one packet (a frame with its virtio-net header if :attr:`vnet_hdr`) as new
        bytes; raises BlockingIOError when none is queued."""
        return os.read(self.fd, MAX_FRAME if self.vnet_hdr else MAX_PACKET)

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
        return f"TunDevice(name={self.name!r}, fd={self.fd}, offloads={self.offloads})"


def _open() -> int:
    """A new fd on the clone device, or an error that says what to do."""
    try:
        return os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
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


def _has_vnet_hdr() -> bool:
    """Does this kernel's TUN driver support IFF_VNET_HDR (TUNGETFEATURES)?"""
    fd = _open()
    try:
        features = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, bytes(4)))[0]
    except OSError:
        return False
    finally:
        os.close(fd)
    return bool(features & IFF_VNET_HDR)


def _set_offload(fd: int) -> int:
    """The richest TUNSETOFFLOAD set the kernel accepts on ``fd``, or 0 if none."""
    for flags in OFFLOAD_CHOICES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return flags
    return 0


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
