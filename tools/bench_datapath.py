#!/usr/bin/env python3
"""Datapath microbenchmark: what the loop and datapath add around the engine, per packet, in-process.

Engine ``b`` is run by a real :class:`~fzpoll.io.loop.Loop` and :class:`~fzpoll.io.datapath.Datapath`:
its UDP socket is on loopback and a datagram socketpair stands in for the TUN device. Engine ``a``
(driven by hand, as in tools/bench_engine.py) encrypts --batch packets of SIZE bytes, sends them to
``b``'s socket, and ``b``'s loop runs passes until all of them are written to the fake TUN. Only the
passes are timed (epoll_wait, recvfrom, engine.receive, write to TUN), in CPU time of this process,
so the figure holds on a machine shared with other jobs, where wall time does not. No root needed.

    python3 tools/bench_datapath.py [--runs 7] [--rounds 150] [--size 1420] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_engine import TUN_A, TUN_B, Link, ip4  # noqa: E402
from fzpoll.io.datapath import Datapath  # noqa: E402
from fzpoll.io.loop import Loop  # noqa: E402

BATCH = 64


class Rig:
    """Engine ``b`` behind a real loop on loopback UDP and a socketpair TUN."""

    def __init__(self) -> None:
        self.link = Link(seed=1)
        self.link.handshake()
        self.tun_app, tun_dev = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun_dev = tun_dev
        self.udp_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp_b.bind(("127.0.0.1", 0))
        self.udp_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_app, tun_dev, self.udp_b, self.udp_a):
            s.setblocking(False)
        self.addr_b = self.udp_b.getsockname()
        self.loop = Loop(clock=lambda: self.link.now)
        self.datapath = Datapath(self.link.b, self.loop, tun_dev.fileno(), batch_size=BATCH)
        self.datapath.set_udp_sockets([self.udp_b], offload=False)

    def one_batch(self, packets: list[bytes]) -> tuple[float, int]:
        """Send ``packets`` through; CPU seconds of the passes and packets that reached TUN."""
        a = self.link.a
        for p in packets:
            a.send(p, self.link.now)
        for data, *_ in a.datagrams_to_send():
            self.udp_a.sendto(data, self.addr_b)
        spent, got, idle = 0.0, 0, 0
        while got < len(packets):
            start = time.process_time()
            self.loop.run_once(max_timeout=0.1)
            spent += time.process_time() - start
            before = got
            try:
                while True:
                    self.tun_app.recv(65535)
                    got += 1
            except BlockingIOError:
                pass
            idle = idle + 1 if got == before else 0
            if idle > 20:  # 20 passes (up to 2 s) without a packet: something is broken
                raise SystemExit("bench_datapath: packets are not coming through")
        return spent, got

    def close(self) -> None:
        self.loop.close()
        for s in (self.tun_app, self.tun_dev, self.udp_b, self.udp_a):
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=150, help="batches per run")
    parser.add_argument("--size", type=int, default=1420, help="IPv4 packet size in bytes")
    parser.add_argument("--batch", type=int, default=BATCH, help="packets sent per round (1: the latency path)")
    args = parser.parse_args(argv)
    rig = Rig()
    packets = [ip4(TUN_A, TUN_B, bytes([i % 256]) * (args.size - 20)) for i in range(args.batch)]
    per_packet = []
    try:
        for _ in range(args.runs):
            spent = n = 0
            for _ in range(args.rounds):
                s, g = rig.one_batch(packets)
                spent += s
                n += g
            per_packet.append(spent / n * 1e6)
    finally:
        rig.close()
    runs = " ".join(f"{x:.2f}" for x in per_packet)
    print(f"datapath, {args.size}-byte packets in rounds of {args.batch}: {statistics.median(per_packet):.2f} CPU us "
          f"per packet (UDP read, engine.receive, TUN write), median of {args.runs} runs: {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
