#!/usr/bin/env python3
"""A lone packet's pass, cold and warm, in-process: the latency path's cost without the harness.

One packet goes through engine ``b``'s real Loop and Datapath (tools/bench_datapath.py's Rig: UDP
on loopback, a datagram socketpair for TUN): "in" is UDP->TUN (a datagram from engine ``a``), "out"
is TUN->UDP (a packet written to the fake TUN, sent to ``a``'s loopback socket). Each pass is
timed in wall time after the process slept ``cold`` (50 ms: this VM's caches and TLB are gone by
then), slept ``warm`` (0.2 ms), or right after copying 64 MB (``evict``: caches flushed on
purpose, steadier than sleeping on a shared machine). ``--daemon`` adds what a daemon's loop has
besides: the kernel prefilter's flusher on the UDP socket, two more timer sources, an auxiliary
reader. Every pass must put its packet out at the other side (else exit 1). Prints each run's
median of --samples passes; alternate it with ``--repo`` of another checkout to compare (one
process per tree; wrap it in ``flock /tmp/fzpoll-bench.lock``).

    python3 tools/bench_lone_pass.py [--daemon] [--gaps cold,warm,evict] [--runs 3] [--repo PATH]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

GAPS = {"cold": 0.05, "warm": 0.0002, "evict": None}
EVICT_BYTES = 64 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout to measure (default: this one)")
    parser.add_argument("--daemon", action="store_true", help="a daemon's flusher, timer sources and reader too")
    parser.add_argument("--gaps", default="cold,warm", help="comma-separated: cold, warm, evict")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30, help="passes per run (the median is printed)")
    args = parser.parse_args(argv)
    gaps = args.gaps.split(",")
    if not gaps or any(g not in GAPS for g in gaps):
        parser.error(f"--gaps: a comma-separated subset of {','.join(GAPS)}")
    sys.path[:0] = [args.repo, os.path.join(args.repo, "tools")]
    from bench_datapath import Rig
    from bench_engine import TUN_A, TUN_B, ip4
    from fzpoll.io import sockfilter

    rig = Rig()
    a, b = rig.link.a, rig.link.b
    start = time.monotonic()
    rig.loop.clock = lambda: time.monotonic() - start + 1.0  # real time, keys made at 0
    rig.link.now = 1.0
    rig.udp_a.bind(("127.0.0.1", 0))
    b.set_endpoint(next(iter(b.peers.values())), rig.udp_a.getsockname())
    extra: list[socket.socket] = []
    if args.daemon:
        prefilter = sockfilter.PrefilterControl(b, gro=False, check_indices=True)
        prefilter.set_sockets([rig.udp_b], False)
        rig.loop.add_flusher(prefilter)
        rig.loop.add_timer_source(lambda: rig.loop.clock() + 10.0, lambda now: None)
        rig.loop.add_timer_source(lambda: None, lambda now: None)
        extra = list(socket.socketpair())
        rig.loop.add_reader(extra[0].fileno(), lambda now: extra[0].recv(100))
    evict, fill = bytearray(EVICT_BYTES), bytes(EVICT_BYTES)

    def drain(sock: socket.socket) -> int:
        got = 0
        try:
            while True:
                sock.recv(65535)
                got += 1
        except BlockingIOError:
            return got

    lost = [0]  # passes whose packet did not come out at the other side (a broken rig, or code)

    def one(direction: str, gap: str) -> float:
        if direction == "in":
            a.send(ip4(TUN_A, TUN_B, b"x" * 56), rig.loop.clock())
            for data, *_ in a.datagrams_to_send():
                rig.udp_a.sendto(data, rig.addr_b)
        else:
            rig.tun_app.send(ip4(TUN_B, TUN_A, b"y" * 56))
        if GAPS[gap] is None:
            evict[:] = fill
        else:
            time.sleep(GAPS[gap])
        began = time.perf_counter()
        rig.loop.run_once(max_timeout=0)
        spent = (time.perf_counter() - began) * 1e6
        got = drain(rig.tun_app), drain(rig.udp_a)
        lost[0] += got != ((1, 0) if direction == "in" else (0, 1))
        return spent

    for direction in ("in", "out"):  # the first passes set up what later passes find
        for _ in range(3):
            one(direction, "warm")
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.runs):
        for direction in ("in", "out"):
            for gap in gaps:
                results.setdefault((direction, gap), []).append(
                    statistics.median(one(direction, gap) for _ in range(args.samples)))
    kind = "daemon" if args.daemon else "plain"
    for (direction, gap), medians in results.items():
        print(f"{kind} {direction:3} {gap:5}: " + " ".join(f"{m:.1f}" for m in medians)
              + f"  (median {statistics.median(medians):.1f} us)")
    if b.drops or lost[0]:
        print(f"drops: {dict(b.drops)}, passes without their packet out: {lost[0]}")
    rig.close()
    for s in extra:
        s.close()
    return 0 if not (b.drops or lost[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
