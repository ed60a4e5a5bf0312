#!/usr/bin/env python3
"""What a datagram costs when the kernel prefilter drops it, against what it costs when Python does.

On loopback, one process sends ``--count`` datagrams with ``sendmmsg`` (256 per call) to a UDP
socket. The kernel delivers each one in the sender's own system call (softirq on the same CPU),
so the sender's CPU time per datagram is the kernel's whole cost of it: the send, the delivery,
the socket filter, and the drop or the enqueue. Rows:

  no filter, Python drains   the receiver (fzpoll's engine) reads each one and drops it by name:
                             sender CPU + the receiver's (recvfrom and ``Engine.receive``);
  filter: header/length      fzpoll's prefilter rejects it (junk with a wrong type byte);
  filter: index, N live      a transport datagram of the right shape for an unknown receiver index,
                             rejected after N index comparisons (N = 4, 64, 200);
  replay, filter: floor      a transport datagram to a live index (the last of N, each with a
                             counter floor) whose counter is below its floor (a replay).

And what a new program costs the daemon (in its own thread: CPU us per re-attach, median of
``--count`` / 100): building it in Python (bpf.wireguard_filter) and ``SO_ATTACH_FILTER`` on
two sockets (the kernel checks the program and translates it), with N indices, each with a
counter floor - what the replay guard does every REPLAY_FLOOD_CHECK during a replay flood.

    python3 tools/bench_prefilter.py [--count 200000] [--rounds 3]

Medians of ``--rounds``; the machine may be shared (run it when quiet; compare rows of one run).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import flood_attack as attack  # noqa: E402
from fzpoll.io import bpf, sockfilter  # noqa: E402
from fzpoll.wireguard.engine import Engine  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sender(receiver: socket.socket, pool: list[bytes]):
    """A socket connected to ``receiver`` and a function sending the next batch of the pool."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(receiver.getsockname())
    libc = ctypes.CDLL(None, use_errno=True)
    batches = attack._batches(pool)
    turn = iter(range(1 << 62))

    def send() -> int:
        msgs = batches[next(turn) % len(batches)][0]
        return max(libc.sendmmsg(s.fileno(), msgs, attack.VLEN, 0), 0)

    return s, send


def send_cost(receiver: socket.socket, pool: list[bytes], count: int) -> float:
    """Sender CPU microseconds per datagram (the kernel delivers in the sender's call)."""
    s, send = _sender(receiver, pool)
    sent = 0
    start = _cpu()
    while sent < count:
        sent += send()
    s.close()
    return (_cpu() - start) / sent * 1e6


def python_cost(pool: list[bytes], count: int) -> float:
    """Sender + receiver CPU per datagram when every datagram reaches the engine (no filter):
    send one batch at a time, then drain it with recvfrom and Engine.receive."""
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    r.setblocking(False)
    s, send = _sender(r, pool)
    engine = Engine(None, random_bytes=os.urandom, wall_time=time.time)
    done = 0
    start = _cpu()
    while done < count:
        for _ in range(send()):
            try:
                data, addr = r.recvfrom(65535)
            except BlockingIOError:
                break
            engine.receive(data, addr, 0.0)
            done += 1
    r.close()
    s.close()
    return (_cpu() - start) / done * 1e6


def filtered(program: list[tuple[int, int, int, int]]) -> socket.socket:
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    sockfilter.attach(r, program)
    return r


def replay_pool(live: list[int], floor: int, rng: random.Random) -> list[bytes]:
    """Replays of the last live index's session: counters below its floor."""
    header = b"\x04\x00\x00\x00" + live[-1].to_bytes(4, "little")
    return [header + rng.randrange(floor).to_bytes(8, "little") + bytes(16 * rng.randint(1, 8)) for _ in range(1024)]


def reattach_cost(n: int, count: int) -> float:
    """CPU us per re-attach of a program with ``n`` indices, all with floors, on two sockets."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    live = list(range(1, n + 1))
    start = _cpu()
    for i in range(count):
        program = bpf.wireguard_filter(True, receiver_indices=live, counter_floors={x: 1000 + i for x in live})
        for sock in socks:
            sockfilter.attach(sock, program)
    cost = (_cpu() - start) / count * 1e6
    for sock in socks:
        sock.close()
    return cost


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(1)
    junk = [bytes([rng.choice([0, 5, 0x45, 0xFF])]) + rng.randbytes(rng.randint(0, 200)) for _ in range(1024)]
    unknown = attack.pool_unknown_index(1024, rng)
    rows = {
        "junk, no filter, Python drains": lambda: python_cost(junk, args.count // 4),
        "unknown index, no filter, Python drains": lambda: python_cost(unknown, args.count // 4),
        "junk, filter: header/length": lambda: send_cost(filtered(bpf.wireguard_filter(True)), junk, args.count),
    }
    for n in (4, 64, 200):
        live = [rng.getrandbits(32) for _ in range(n)]
        rows[f"unknown index, filter: index, {n} live"] = (
            lambda live=live: send_cost(filtered(bpf.wireguard_filter(True, receiver_indices=live)), unknown, args.count))
    for n in (4, 64, 200):
        live = [rng.getrandbits(32) for _ in range(n)]
        floors = {index: 1 << 20 for index in live}
        rows[f"replay, filter: floor, {n} live"] = (
            lambda live=live, floors=floors: send_cost(
                filtered(bpf.wireguard_filter(True, receiver_indices=live, counter_floors=floors)),
                replay_pool(live, 1 << 20, rng), args.count))
    for n in (4, 64, 200):
        rows[f"re-attach (build + 2 sockets), {n} indices with floors"] = (
            lambda n=n: reattach_cost(n, max(args.count // 100, 10)))
    results = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():  # interleaved rounds
            results[name].append(fn())
    print(f"python3 tools/bench_prefilter.py --count {args.count} --rounds {args.rounds}  ({os.cpu_count()} CPUs)")
    print("| case | CPU us per datagram, or per re-attach (median) | rounds |")
    print("|---|--:|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
