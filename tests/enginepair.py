"""Two engines linked by a fake network and a fake clock (as h11's ConnectionPair)."""

from __future__ import annotations

import ipaddress
import random

from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PresharedKey, PrivateKey

ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
TUN_A = "10.0.0.1"
TUN_B = "10.0.0.2"
WALL_OFFSET = 1_700_000_000.0


def ip4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    """A minimal IPv4 packet (header checksum not needed: the engine does not check it)."""
    total = 20 + len(payload)
    return (
        bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8)
        + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload
    )


def ip6(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([17, 64])
        + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload
    )


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def wall(self) -> float:
        return WALL_OFFSET + self.now


class Pair:
    """Engines ``a`` and ``b``, each with the other as its only peer."""

    def __init__(self, seed: int = 1, psk: bytes | None = None) -> None:
        self.clock = Clock()
        rng = random.Random(seed)
        self.key_a = PrivateKey.generate(rng.randbytes)
        self.key_b = PrivateKey.generate(rng.randbytes)
        self.a = Engine(self.key_a, random_bytes=rng.randbytes, wall_time=self.clock.wall)
        self.b = Engine(self.key_b, random_bytes=rng.randbytes, wall_time=self.clock.wall)
        self.peer_b = self.a.add_peer(self.key_b.public_key)  # a's view of b
        self.peer_a = self.b.add_peer(self.key_a.public_key)  # b's view of a
        self.a.add_allowed_ip(self.peer_b, "10.0.0.2/32")
        self.a.add_allowed_ip(self.peer_b, "fd00::2/128")
        self.b.add_allowed_ip(self.peer_a, "10.0.0.1/32")
        self.b.add_allowed_ip(self.peer_a, "fd00::1/128")
        self.a.set_endpoint(self.peer_b, ADDR_B)
        self.b.set_endpoint(self.peer_a, ADDR_A)
        if psk is not None:
            self.a.set_preshared_key(self.peer_b, PresharedKey(psk))
            self.b.set_preshared_key(self.peer_a, PresharedKey(psk))
        self.wire: list[tuple[str, bytes]] = []  # every datagram delivered: (direction, bytes)
        # What each engine handed over and the test has not consumed yet: the engine gives its
        # outputs away once, a test often looks before it delivers.
        self._out: dict[Engine, list[tuple[bytes, tuple]]] = {self.a: [], self.b: []}
        self._tun: dict[Engine, list[bytes]] = {self.a: [], self.b: []}

    def out(self, engine: Engine) -> list[tuple[bytes, tuple]]:
        """The datagrams ``engine`` produced and nobody delivered yet (a live list: clear() it to drop them)."""
        buf = self._out[engine]
        buf.extend(engine.datagrams_to_send())
        return buf

    def tun(self, engine: Engine) -> list[bytes]:
        """The packets ``engine`` decrypted for its TUN device and the test has not consumed yet."""
        buf = self._tun[engine]
        buf.extend(engine.packets_for_tun())
        return buf

    @property
    def now(self) -> float:
        return self.clock.now

    def advance(self, seconds: float) -> None:
        """Move time forward and fire both engines' due timers (without delivering)."""
        self.clock.now += seconds
        self.a.handle_timer(self.clock.now)
        self.b.handle_timer(self.clock.now)

    def run_until(self, t: float) -> None:
        """Advance to ``t`` stopping at every deadline on the way, delivering everything."""
        while True:
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            step = min([d for d in deadlines if d <= t], default=None)
            if step is None:
                break
            self.clock.now = max(self.clock.now, step)
            self.a.handle_timer(self.clock.now)
            self.b.handle_timer(self.clock.now)
            self.deliver()
        self.clock.now = t
        self.deliver()

    def take(self, engine: Engine) -> list[bytes]:
        buf = self.out(engine)
        out = [d for d, _ in buf]
        buf.clear()
        return out

    def deliver(self, drop_a_to_b: bool = False, drop_b_to_a: bool = False) -> int:
        """Deliver queued datagrams both ways until quiet; returns how many were delivered."""
        count = 0
        while self.out(self.a) or self.out(self.b):
            for data in self.take(self.a):
                self.wire.append(("a->b", data))
                if not drop_a_to_b:
                    self.b.receive(data, ADDR_A, self.clock.now)
                    count += 1
            for data in self.take(self.b):
                self.wire.append(("b->a", data))
                if not drop_b_to_a:
                    self.a.receive(data, ADDR_B, self.clock.now)
                    count += 1
        return count

    def handshake(self) -> None:
        self.a.send(ip4(TUN_A, TUN_B, b"first"), self.clock.now)
        self.deliver()
        assert self.tun(self.b), "handshake did not complete"
        self.tun(self.b).clear()
