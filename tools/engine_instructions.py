#!/usr/bin/env python3
"""Instructions per packet of the engine's hot path, counted by valgrind (callgrind).

Timings on a shared 2-core machine are noisy; an instruction count is not: the same code and
input give the same count whatever else the machine does. This runs a fixed workload (a handshake,
then N round trips of SIZE-byte IPv4 packets: a.send, hand the datagram over, b.receive, take the
packet) twice under callgrind, with N and 2N packets, and prints the difference per packet, so
start-up and the handshake cancel out.

    python3 tools/engine_instructions.py [--packets 2000] [--size 1420] [--repo PATH]

``--repo`` measures another checkout (e.g. the commit before a change) with the same workload.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOAD = r"""
import random, sys
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PrivateKey

n, size, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(1)
ka, kb = PrivateKey.generate(rng.randbytes), PrivateKey.generate(rng.randbytes)
a = Engine(ka, random_bytes=rng.randbytes, wall_time=lambda: 1.7e9)
b = Engine(kb, random_bytes=rng.randbytes, wall_time=lambda: 1.7e9)
pb, pa = a.add_peer(kb.public_key), b.add_peer(ka.public_key)
A, B = ("192.0.2.1", 51820), ("192.0.2.2", 51820)
a.add_allowed_ip(pb, "10.0.0.2/32"); b.add_allowed_ip(pa, "10.0.0.1/32")
a.set_endpoint(pb, B); b.set_endpoint(pa, A)
take_a, take_b = a.datagrams_to_send, b.datagrams_to_send
packet = bytes([0x45, 0]) + size.to_bytes(2, "big") + bytes(8) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + bytes(size - 20)
a.send(packet, 0.0)
for _ in range(4):  # the handshake, and b's confirmation
    for d, *_ in take_a():
        b.receive(d, A, 0.0)
    for d, *_ in take_b():
        a.receive(d, B, 0.0)
assert b.packets_for_tun() == [packet], "handshake failed"
send, receive, tun = a.send, b.receive, b.packets_for_tun
if not batch:
    for _ in range(n):
        send(packet, 1.0)
        receive(take_a()[0][0], A, 1.0)
        assert tun()[0] == packet
    sys.exit(0)
packets = [packet] * batch
if hasattr(a, "send_batch"):
    send_batch, receive_batch = a.send_batch, b.receive_batch
else:  # before the batch entry points: the datapath's per-packet loops (Datapath._send, _receive)
    def send_batch(packets, now, failures):
        drops = []
        for packet in packets:
            try:
                reason = send(packet, now)
                if reason is not None:
                    drops.append(reason)
            except Exception as exc:
                failures.append(exc)
        return drops
    def receive_batch(datagrams, now, failures):
        drops = []
        for data, addr, local in datagrams:
            try:
                reason = receive(data, addr, now, local)
                if reason is not None:
                    drops.append(reason)
            except Exception as exc:
                failures.append(exc)
        return drops
failures = []
for _ in range(n // batch):
    send_batch(packets, 1.0, failures)
    receive_batch(take_a(), 1.0, failures)
    assert tun() == packets and not failures
"""


def count(repo: Path, packets: int, size: int, batch: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ, PYTHONPATH=str(repo), PYTHONHASHSEED="0")
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c", WORKLOAD,
             str(packets), str(size), str(batch)],
            env=env, cwd=repo, capture_output=True, text=True, check=False,  # cwd: '-c' puts it first
        )
        if result.returncode != 0:
            raise SystemExit(f"engine_instructions: the workload failed:\n{result.stderr[-2000:]}")
        match = re.search(r"(?:Collected\s*:|I\s+refs:)\s*([\d,]+)", result.stderr)
        if match is None:
            raise SystemExit(f"engine_instructions: no count from callgrind:\n{result.stderr[-2000:]}")
        return int(match.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=2000, help="round trips in the smaller run (default 2000)")
    parser.add_argument("--size", type=int, default=1420, help="IPv4 packet size in bytes (default 1420)")
    parser.add_argument("--batch", type=int, default=0,
                        help="packets per send_batch/receive_batch (default 0: one send and one receive per packet)")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="checkout to measure (default: this one)")
    args = parser.parse_args()
    if args.packets < 1 or not 28 <= args.size <= 65535 or args.batch < 0 or args.packets % max(args.batch, 1):
        parser.error("--packets must be >= 1 (a multiple of --batch), --size within 28..65535")
    small = count(args.repo, args.packets, args.size, args.batch)
    large = count(args.repo, 2 * args.packets, args.size, args.batch)
    per_packet = (large - small) / args.packets
    how = f"in batches of {args.batch}" if args.batch else "one at a time"
    print(f"{args.repo}: {per_packet:,.0f} instructions per round trip (send + receive) of a "
          f"{args.size}-byte packet, {how} (callgrind, {args.packets} vs {2 * args.packets} packets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
