#!/usr/bin/env python3
"""What sticky source addresses cost the UDP path, per datagram, in-process on loopback.

Times :class:`~fzpoll.io.udp.UdpSockets` reading (``read``: recvmsg with the pktinfo control
message and its interned LocalSource, against recvfrom / recvmsg without it) and writing (``write``:
sendmsg with the source's control message, against sendto), with GSO/GRO off and on, in CPU time of
this process (so the figure holds on a shared machine). "off" is the same code with pktinfo not
enabled on the socket and no source on the datagrams: what main did. No root needed.

    python3 tools/bench_pktinfo.py [--runs 7] [--count 2000] [--size 1452]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fzpoll.io import pktinfo  # noqa: E402
from fzpoll.io.loop import Loop  # noqa: E402
from fzpoll.io.report import Drops  # noqa: E402
from fzpoll.io.udp import UdpSockets  # noqa: E402


def rig(loop: Loop, sticky: bool, offload: bool) -> tuple[UdpSockets, UdpSockets, socket.socket]:
    enable = pktinfo.enable
    if not sticky:
        pktinfo.enable = lambda sock: False  # type: ignore[assignment]
    try:
        tx, rx = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
        for s in (tx, rx):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sender, receiver = UdpSockets(loop), UdpSockets(loop)
        sender.replace([tx], offload)
        receiver.replace([rx], offload)
    finally:
        pktinfo.enable = enable
    return sender, receiver, rx


def one_run(sender: UdpSockets, receiver: UdpSockets, rx: socket.socket, datagrams: list) -> tuple[float, float]:
    """CPU us per datagram: write all of them, then read all of them."""
    drops = Drops()
    start = time.process_time()
    sender.write(list(datagrams), drops)
    wrote = time.process_time() - start
    got: list = []
    start = time.process_time()
    while len(got) < len(datagrams):
        if not receiver.read(rx.fileno(), rx, got, [], 64):
            break
    read = time.process_time() - start
    assert len(got) == len(datagrams) and not drops, (len(got), dict(drops))
    return wrote / len(datagrams) * 1e6, read / len(datagrams) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--count", type=int, default=2000, help="datagrams per run")
    parser.add_argument("--size", type=int, default=1452, help="bytes per datagram (a 1420-MTU packet)")
    args = parser.parse_args(argv)
    loop = Loop()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    rigs = {(o, s): rig(loop, s == "on", o == "on") for o in ("off", "on") for s in ("off", "on")}
    for _ in range(args.runs):  # interleaved, so drifts of the machine hit every variant
        for (offload, sticky), (sender, receiver, rx) in rigs.items():
            local = pktinfo.local_source("127.0.0.1") if sticky == "on" else None
            datagrams = [(b"x" * args.size, rx.getsockname(), local)] * args.count
            results.setdefault((offload, sticky), []).append(one_run(sender, receiver, rx, datagrams))
    print(f"UDP path, {args.size}-byte datagrams, {args.count} per run, CPU us per datagram, "
          f"median of {args.runs} runs")
    for (offload, sticky), runs in results.items():
        write = statistics.median(w for w, _ in runs)
        read = statistics.median(r for _, r in runs)
        print(f"  GSO/GRO {offload:<3}  sticky source {sticky:<3}  write {write:5.2f}  read {read:5.2f}")
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
