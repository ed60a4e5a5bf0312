"""One WireGuard interface made real: the engine, its TUN device and UDP sockets, the datapath and loop.

:class:`Device` is also what the UAPI configures (it provides the ``UapiHost`` interface:
``engine``, ``listen_port``, ``fwmark``, ``set_listen_port``, ``set_fwmark``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from fzpoll.wireguard.constants import DEFAULT_MTU
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard import sodium
from fzpoll.errors import LocalError
from fzpoll.wireguard.constants import DEFAULT_BATCH_SIZE
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop
from fzpoll.io import sockfilter
from fzpoll.io.tun import TunDevice, offload_disabled, segmentation_enabled

log = logging.getLogger("fzpoll.device")

SODIUM_ENV = "FZPOLL_SODIUM"  # auto (default), bundled or system: which libsodium (fzpoll.wireguard.sodium)
TUN_TXQUEUELEN = 1000  # packets the kernel holds for us between reads (its default: 500)
SOCKET_BUFFER_BYTES = 4 << 20  # as wireguard-go, large kernel buffers absorb bursts (not ours)


def _tune(sock: socket.socket, fwmark: int) -> None:
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
    if fwmark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)


def bind_udp(port: int, fwmark: int = 0) -> list[socket.socket]:
    """Non-blocking UDP sockets on ``port`` for IPv4 and (where the host has it) IPv6.

    Port 0 picks a free port, the same for both families. Raises OSError(EADDRINUSE) if taken.
    Each socket gets the kernel prefilter (its GRO form, which also passes coalesced runs) before
    it is handed out, so no junk is queued; :meth:`Device._bind` narrows it if GRO stays off.
    """
    for _attempt in range(8):
        v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            v4.bind(("0.0.0.0", port))
        except OSError:
            v4.close()
            raise
        chosen = v4.getsockname()[1]
        try:
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            v6 = None  # no IPv6 on this host: IPv4 only
        if v6 is not None:
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                v6.bind(("::", chosen))
            except OSError as exc:
                v6.close()
                v6 = None
                if exc.errno == errno.EADDRINUSE:
                    v4.close()
                    if port:
                        raise
                    continue  # the random v4 port is taken on v6: try another
                # EADDRNOTAVAIL / EAFNOSUPPORT: IPv6 disabled, run on IPv4 alone
        sockets = [s for s in (v4, v6) if s is not None]
        for s in sockets:
            s.setblocking(False)
            _tune(s, fwmark)
            sockfilter.attach_wireguard(s, gro=True)
        return sockets
    raise OSError(errno.EADDRINUSE, "no free port for both IPv4 and IPv6")


class Device:
    """An interface: TUN + UDP + engine, their datapath and the loop."""

    def __init__(
        self,
        ifname: str,
        *,
        mtu: int = DEFAULT_MTU,
        batch_size: int = DEFAULT_BATCH_SIZE,
        schedule: str = "fair",
        listen_port: int = 0,
    ) -> None:
        self.tun = TunDevice(ifname, offload=not offload_disabled(), segmentation=segmentation_enabled())
        self.name = self.tun.name
        try:
            self.tun.set_mtu(mtu)  # as wireguard-go: the interface starts at the engine's MTU
            self.tun.set_txqueuelen(TUN_TXQUEUELEN)
        except LocalError:
            self.tun.close()
            raise
        self.engine = Engine(None, random_bytes=os.urandom, wall_time=time.time, mtu=mtu,
                             aead=sodium.choose(os.environ.get(SODIUM_ENV)))
        self.loop = Loop(schedule=schedule)
        self.datapath = Datapath(self.engine, self.loop, self.tun.fd, batch_size=batch_size,
                                 tun_vnet=self.tun.vnet_hdr)
        self.fwmark = 0
        self.sockets: list[socket.socket] = []
        self.udp_filter = "off"  # the kernel prefilter on the sockets: "gro", "exact" or "off"
        self.prefilter = sockfilter.PrefilterControl(self.engine, gro=True,
                                                     check_indices=sockfilter.index_check_enabled())
        self.loop.add_flusher(self.prefilter)
        self._retired_kernel_drops = 0  # of sockets closed by a listen-port change
        self.listen_port = 0
        try:
            self._bind(listen_port)
        except OSError as exc:
            self.tun.close()
            raise LocalError(f"cannot listen on UDP port {listen_port}: {exc.strerror}") from None

    def _bind(self, port: int) -> None:
        self.install_sockets(bind_udp(port, self.fwmark))

    def install_sockets(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` (from :func:`bind_udp`) instead of the current ones."""
        self._retired_kernel_drops += self.kernel_drops()
        self.datapath.set_udp_sockets(sockets)  # the old sockets leave the loop before they close
        for s in self.sockets:
            s.close()
        self.sockets = sockets
        self.listen_port = sockets[0].getsockname()[1]
        gro = self.datapath.offloads()["gro"]
        self.udp_filter = ("gro" if gro else "exact") if self.prefilter.set_sockets(sockets, gro) else "off"
        log.info("listening", extra={"fields": {"port": self.listen_port, "families": len(sockets)}})

    # ------------------------------------------------------------------ UapiHost

    def set_listen_port(self, port: int) -> None:
        if port == self.listen_port:
            return
        try:
            self._bind(port)
        except OSError as exc:
            from fzpoll.uapi.protocol import UapiError

            raise UapiError(exc.errno or errno.EIO) from None

    @staticmethod
    def zone_exists(name: str) -> bool:
        """Whether an interface ``name`` exists (the zone of an IPv6 endpoint, as Go resolves it)."""
        try:
            socket.if_nametoindex(name)
            return True
        except OSError:
            return False

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        for s in self.sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        self.engine.forget_local()  # routing by mark may want other sources now

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped at our UDP sockets: rejected by the prefilter, or
        refused because a receive buffer was full (the kernel counts both as one)."""
        return self._retired_kernel_drops + sum(sockfilter.kernel_drops(s) or 0 for s in self.sockets)

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets = []
        self.loop.close()
        self.tun.close()
