#!/usr/bin/env python3
"""TUN offload costs per packet, in-process (issue 16): splitting a TSO super-packet, and coalescing
decrypted segments, beside the engine's encryption and decryption of the same packets.

One 45-segment IPv4 TCP super-packet (MSS 1368, timestamps option: what a 1420-byte tunnel MTU
gives) as the kernel hands it over with TSO; per measurement the median over ROUNDS of the time
per segment for:

- split:             vnet.split_frame of the frame (segments with their own checksums);
- encrypt:           engine a.send of the 45 segments, taking the datagrams;
- decrypt:           engine b.receive of those datagrams, taking the packets;
- decrypt+coalesce:  the same, then vnet.coalesce(..., authenticated=True) into one GSO frame.

No root, no sockets. ``python3 tools/bench_vnet.py [--rounds 15]``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fzpoll.io import vnet  # noqa: E402
from fzpoll.ippacket import ones_complement_sum  # noqa: E402
from fzpoll.wireguard.engine import Engine  # noqa: E402
from fzpoll.wireguard.keys import PrivateKey  # noqa: E402

SEGMENTS, MSS = 45, 1368
SRC, DST = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
ADDR_A, ADDR_B = ("192.0.2.1", 51820), ("192.0.2.2", 51820)


def super_frame() -> bytes:
    """The frame a TUN read gives with TSO: virtio header + IPv4/TCP super-packet, the TCP
    checksum field holding the pseudo-header sum (NEEDS_CSUM)."""
    options = bytes([1, 1, 8, 10]) + bytes(8)
    payload = random.Random(1).randbytes(SEGMENTS * MSS)
    tcp_len = 32 + len(payload)
    pseudo = ones_complement_sum(SRC + DST + struct.pack("!BBH", 0, 6, tcp_len))
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 77, 8 << 4, vnet.TCP_ACK, 512, pseudo, 0) + options
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 1, 0x4000, 64, 6, 0, SRC, DST))
    ip[10:12] = struct.pack("!H", ~ones_complement_sum(ip) & 0xFFFF)
    header = vnet.VNET_HDR.pack(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 52, MSS, 20, 16)
    return header + bytes(ip) + tcp + payload


def engines(first: bytes) -> tuple[Engine, Engine]:
    """Engines a and b after a handshake (started by ``first``, a packet from a to b)."""
    rng = random.Random(2)
    key_a, key_b = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
    a = Engine(key_a, random_bytes=rng.randbytes, wall_time=lambda: 1.7e9)
    b = Engine(key_b, random_bytes=rng.randbytes, wall_time=lambda: 1.7e9)
    peer_b, peer_a = a.add_peer(key_b.public_key), b.add_peer(key_a.public_key)
    a.add_allowed_ip(peer_b, "10.0.0.2/32")
    b.add_allowed_ip(peer_a, "10.0.0.1/32")
    a.set_endpoint(peer_b, ADDR_B)
    b.set_endpoint(peer_a, ADDR_A)
    a.send(first, 0.0)
    for _ in range(3):
        for data, *_ in a.datagrams_to_send():
            b.receive(data, ADDR_A, 0.0)
        for data, *_ in b.datagrams_to_send():
            a.receive(data, ADDR_B, 0.0)
    b.packets_for_tun()
    return a, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    frame = super_frame()
    segments = vnet.split_frame(frame)
    assert segments is not None and len(segments) == SEGMENTS
    a, b = engines(segments[0])
    times: dict[str, list[float]] = {k: [] for k in ("split", "encrypt", "decrypt", "decrypt+coalesce")}
    for _ in range(args.rounds):
        t = time.perf_counter()
        vnet.split_frame(frame)
        times["split"].append(time.perf_counter() - t)
        for name, co in (("decrypt", False), ("decrypt+coalesce", True)):
            t = time.perf_counter()
            for s in segments:
                a.send(s, 0.0)
            datagrams = a.datagrams_to_send()
            if name == "decrypt":
                times["encrypt"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for data, *_ in datagrams:
                b.receive(data, ADDR_A, 0.0)
            packets = b.packets_for_tun()
            if co:
                frames = vnet.coalesce(packets, authenticated=True)
                assert len(frames) == 1 and len(frames[0]) == len(frame)
            times[name].append(time.perf_counter() - t)
            assert packets == segments, "decrypted packets differ from what was sent"
    print(f"{SEGMENTS} x {MSS}-byte TCP segments (IPv4, timestamps), median of {args.rounds} rounds, per segment:")
    for name, values in times.items():
        print(f"  {name:<18} {statistics.median(values) / SEGMENTS * 1e6:6.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
