#!/usr/bin/env python3
"""Engine microbenchmark: what one fzpoll engine costs per packet and per handshake, in-process.

Two engines (``a`` and ``b``, each the other's only peer) are linked by hand, with a fake clock, after
one handshake. Nothing touches a socket or a TUN device, so no root is needed and the figures are the
protocol engine alone. Measured, each as the median of RUNS timed runs:

- encrypt:    ``a.send(packet, now)`` of SIZE-byte IPv4 packets, taking ``a.datagrams_to_send()``;
- decrypt:    ``b.receive(datagram, addr, now)`` of exactly those datagrams, taking ``b.packets_for_tun()``
              (every decrypted packet is compared with what was sent, outside the timed loop);
- round trip: send, take the datagram, receive, take the packet -- one packet at a time;
- handshakes: full initiation + response + confirmation: the clock jumps past REKEY_AFTER_TIME and
              one small packet from ``a`` makes it rekey (the public-API way to force a handshake);
              the figure includes that packet and the confirming keepalive;
- raw AEAD:   one libsodium ChaCha20-Poly1305 encrypt (and decrypt) of SIZE bytes straight into
              libsodium through pynacl's cffi module, with a preallocated output taken out as
              ``bytes`` (what the engine does), so that
              engine overhead per packet = engine time per packet - that call
              (the ``*_vs_libsodium`` figures); and, for reference, the same through the public
              ``nacl.bindings`` wrapper, whose argument checks cost more than the cipher.

The garbage collector stays on (the daemon runs with it on). ``--seconds`` is the budget of timed
work, split evenly between the measurements; setup and the untimed checks add a little to it.
Exit status 1 if any decrypted packet differs from its input or any packet was dropped.

    python3 tools/bench_engine.py [--seconds S] [--size 1420] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nacl  # noqa: E402
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt as aead_decrypt  # noqa: E402
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt as aead_encrypt  # noqa: E402
from nacl._sodium import ffi  # noqa: E402  (pynacl's cffi module: libsodium without the wrapper)

from fzpoll.wireguard.constants import REKEY_AFTER_TIME, REPLAY_WINDOW_SIZE  # noqa: E402
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.peer import HandshakeCompleted  # noqa: E402
from fzpoll.wireguard.keys import PrivateKey  # noqa: E402
from fzpoll.wireguard import sodium  # noqa: E402

# The libsodium the engines use: FZPOLL_SODIUM=bundled|system picks one, as for the daemon.
AEAD = sodium.choose(os.environ.get("FZPOLL_SODIUM"))

ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
TUN_A = bytes([10, 0, 0, 1])
TUN_B = bytes([10, 0, 0, 2])
BATCH = 256  # packets per timed batch: the IO shell drains outputs about this often
DISTINCT = 64  # distinct packets cycled through, so the output check means something
SHARES = 5  # budget shares: encrypt+decrypt (2), round trip, handshakes, raw AEAD


def ip4(src: bytes, dst: bytes, payload: bytes) -> bytes:
    """An IPv4 header (no checksum: the engine does not check it) followed by ``payload``."""
    total = 20 + len(payload)
    return bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes([0, 0, 0, 0, 64, 17, 0, 0]) + src + dst + payload


class Link:
    """Engines ``a`` and ``b`` with a fake clock; :meth:`deliver` carries datagrams both ways."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.now = 0.0
        key_a = PrivateKey.generate(rng.randbytes)
        key_b = PrivateKey.generate(rng.randbytes)
        self.a = Engine(key_a, random_bytes=rng.randbytes, wall_time=self.wall, aead=AEAD)
        self.b = Engine(key_b, random_bytes=rng.randbytes, wall_time=self.wall, aead=AEAD)
        peer_b = self.a.add_peer(key_b.public_key)
        peer_a = self.b.add_peer(key_a.public_key)
        self.a.add_allowed_ip(peer_b, "10.0.0.2/32")
        self.b.add_allowed_ip(peer_a, "10.0.0.1/32")
        self.a.set_endpoint(peer_b, ADDR_B)
        self.b.set_endpoint(peer_a, ADDR_A)

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def deliver(self) -> None:
        a, b = self.a, self.b
        out_a, out_b = a.datagrams_to_send(), b.datagrams_to_send()
        while out_a or out_b:
            for data, *_ in out_a:
                b.receive(data, ADDR_A, self.now)
            out_b += b.datagrams_to_send()
            for data, *_ in out_b:
                a.receive(data, ADDR_B, self.now)
            out_a, out_b = a.datagrams_to_send(), b.datagrams_to_send()

    def handshake(self) -> None:
        self.a.send(ip4(TUN_A, TUN_B, b"hello"), self.now)
        self.deliver()
        if not self.b.packets_for_tun():
            raise SystemExit("bench_engine: the initial handshake did not complete")

    def drops(self) -> dict[str, int]:
        return {f"{name}:{reason}": n for name, e in (("a", self.a), ("b", self.b)) for reason, n in e.drops.items()}


def packets(size: int, seed: int) -> list[bytes]:
    if size < 20 or size > 65535:
        raise SystemExit("bench_engine: --size must be 20..65535 (an IPv4 packet)")
    rng = random.Random(seed)
    return [ip4(TUN_A, TUN_B, rng.randbytes(size - 20)) for _ in range(DISTINCT)]


def runs_of(budget: float, runs: int, one_run: Callable[[float], tuple]) -> list[tuple]:
    """``runs`` results of ``one_run(seconds)``, each after a fresh gc.collect()."""
    results = []
    for _ in range(runs):
        gc.collect()
        results.append(one_run(budget / runs))
    return results


class Checks:
    def __init__(self) -> None:
        self.verified = 0
        self.mismatched = 0
        self.datagram_size = 0


def bench_encrypt_decrypt(
    link: Link, pkts: list[bytes], seconds: float, checks: Checks, min_packets: int = 0
) -> tuple[int, float, float]:
    """Timed batches of sends, then timed receives of the datagrams they produced."""
    a, b, now = link.a, link.b, link.now
    send, receive = a.send, b.receive
    batch = [pkts[i % DISTINCT] for i in range(BATCH)]
    count = 0
    t_enc = t_dec = 0.0
    perf = time.perf_counter
    while t_enc + t_dec < seconds or count < min_packets:
        t0 = perf()
        for p in batch:
            send(p, now)
        datagrams = [d for d, *_ in a.datagrams_to_send()]
        t1 = perf()
        for d in datagrams:
            receive(d, ADDR_A, now)
        got = b.packets_for_tun()
        t2 = perf()
        t_enc += t1 - t0
        t_dec += t2 - t1
        count += len(batch)
        checks.datagram_size = len(datagrams[0]) if datagrams else 0
        if got == batch:
            checks.verified += len(got)
        else:
            checks.mismatched += max(len(batch), len(got))
    return count, t_enc, t_dec


def bench_roundtrip(link: Link, pkts: list[bytes], seconds: float, checks: Checks) -> tuple[int, float]:
    """One packet at a time: encrypt, hand the datagram over, decrypt, take the packet."""
    a, b, now = link.a, link.b, link.now
    send, receive, a_out, b_tun = a.send, b.receive, a.datagrams_to_send, b.packets_for_tun
    batch = [pkts[i % DISTINCT] for i in range(BATCH)]
    count = 0
    elapsed = 0.0
    perf = time.perf_counter
    while elapsed < seconds:
        got = []
        t0 = perf()
        for p in batch:
            send(p, now)
            receive(a_out()[0][0], ADDR_A, now)
            got.append(b_tun()[0])
        elapsed += perf() - t0
        count += len(batch)
        if got == batch and not a_out() and not b_tun():
            checks.verified += len(got)
        else:
            checks.mismatched += len(batch)
    return count, elapsed


def bench_handshakes(link: Link, seconds: float) -> tuple[int, float, int]:
    """Forced re-handshakes: each jump past REKEY_AFTER_TIME makes the next send initiate."""
    small = ip4(TUN_A, TUN_B, b"")
    count = completed = 0
    elapsed = 0.0
    perf = time.perf_counter
    a, b = link.a, link.b
    while elapsed < seconds:
        link.now += REKEY_AFTER_TIME + 1.0
        a.take_events()
        b.take_events()
        t0 = perf()
        a.send(small, link.now)
        link.deliver()
        elapsed += perf() - t0
        b.packets_for_tun()
        count += 1
        done_a = sum(1 for event in a.take_events() if isinstance(event, HandshakeCompleted))
        done_b = sum(1 for event in b.take_events() if isinstance(event, HandshakeCompleted))
        completed += done_a == 1 and done_b == 1
    return count, elapsed, completed


def bench_raw(size: int, seconds: float) -> tuple[int, float, float, float, float]:
    """AEAD alone, SIZE bytes: through nacl.bindings, then straight into libsodium via cffi."""
    rng = random.Random(7)
    key, nonce, message = rng.randbytes(32), bytes(12), rng.randbytes(size)
    sealed = aead_encrypt(message, None, nonce, key)
    if aead_decrypt(sealed, None, nonce, key) != message:
        raise SystemExit("bench_engine: libsodium round trip failed")
    out = ffi.new("unsigned char[]", size + 16)
    view = ffi.buffer(out)
    seal, open_, null = AEAD.seal, AEAD.open, ffi.NULL
    seal(out, null, message, size, null, 0, null, nonce, key)
    if view[0:size + 16] != sealed or open_(out, null, null, sealed, size + 16, null, 0, nonce, key) or view[0:size] != message:
        raise SystemExit("bench_engine: direct libsodium call disagrees with nacl.bindings")
    rounds = range(BATCH)
    count = 0
    t_enc = t_dec = t_lib_enc = t_lib_dec = 0.0
    perf = time.perf_counter
    while t_enc + t_dec + t_lib_enc + t_lib_dec < seconds:
        t0 = perf()
        for _ in rounds:
            aead_encrypt(message, None, nonce, key)
        t1 = perf()
        for _ in rounds:
            aead_decrypt(sealed, None, nonce, key)
        t2 = perf()
        for _ in rounds:
            seal(out, null, message, size, null, 0, null, nonce, key)
            view[0:size + 16]
        t3 = perf()
        for _ in rounds:
            open_(out, null, null, sealed, size + 16, null, 0, nonce, key)
            view[0:size]
        t4 = perf()
        t_enc += t1 - t0
        t_dec += t2 - t1
        t_lib_enc += t3 - t2
        t_lib_dec += t4 - t3
        count += BATCH
    return count, t_enc, t_dec, t_lib_enc, t_lib_dec


def measure(seconds: float, size: int, runs: int) -> dict:
    started = time.perf_counter()
    share = seconds / SHARES
    pkts = packets(size, seed=2)
    checks = Checks()

    data_link = Link(seed=1)
    data_link.handshake()
    # Warm up untimed until the receiver's replay window is full (its steady state).
    warmup = bench_encrypt_decrypt(data_link, pkts, 0.0, checks, min_packets=REPLAY_WINDOW_SIZE + BATCH)[0]
    encdec = runs_of(2 * share, runs, lambda s: bench_encrypt_decrypt(data_link, pkts, s, checks))
    roundtrip = runs_of(share, runs, lambda s: bench_roundtrip(data_link, pkts, s, checks))
    data_drops = data_link.drops()

    hs_link = Link(seed=3)
    hs_link.handshake()
    hs = runs_of(share, runs, lambda s: bench_handshakes(hs_link, s))
    raw = runs_of(share, runs, lambda s: bench_raw(size, s))

    med = statistics.median
    enc_pps = [n / te for n, te, _ in encdec]
    dec_pps = [n / td for n, _, td in encdec]
    rt_pps = [n / t for n, t in roundtrip]
    hs_ps = [n / t for n, t, _ in hs]
    raw_enc_us = [r[1] / r[0] * 1e6 for r in raw]
    raw_dec_us = [r[2] / r[0] * 1e6 for r in raw]
    lib_enc_us = [r[3] / r[0] * 1e6 for r in raw]
    lib_dec_us = [r[4] / r[0] * 1e6 for r in raw]

    r: dict = {
        "tool": "tools/bench_engine.py",
        "size": size,
        "datagram_size": checks.datagram_size,
        "seconds": seconds,
        "runs": runs,
        "encrypt_pps": med(enc_pps),
        "decrypt_pps": med(dec_pps),
        "roundtrip_pps": med(rt_pps),
        "roundtrip_mbps": med(rt_pps) * size * 8 / 1e6,
        "handshakes_per_s": med(hs_ps),
        "raw_encrypt_us": med(raw_enc_us),
        "raw_decrypt_us": med(raw_dec_us),
        "libsodium_encrypt_us": med(lib_enc_us),
        "libsodium_decrypt_us": med(lib_dec_us),
    }
    r["engine_encrypt_us"] = 1e6 / r["encrypt_pps"]
    r["engine_decrypt_us"] = 1e6 / r["decrypt_pps"]
    r["engine_roundtrip_us"] = 1e6 / r["roundtrip_pps"]
    r["handshake_us"] = 1e6 / r["handshakes_per_s"]
    for name, engine_us, raw_us in (
        ("encrypt", r["engine_encrypt_us"], r["raw_encrypt_us"]),
        ("decrypt", r["engine_decrypt_us"], r["raw_decrypt_us"]),
        ("roundtrip", r["engine_roundtrip_us"], r["raw_encrypt_us"] + r["raw_decrypt_us"]),
    ):
        r[f"{name}_overhead_us"] = engine_us - raw_us
        r[f"{name}_overhead_fraction"] = (engine_us - raw_us) / engine_us
    for name, engine_us, raw_us in (
        ("encrypt", r["engine_encrypt_us"], r["libsodium_encrypt_us"]),
        ("decrypt", r["engine_decrypt_us"], r["libsodium_decrypt_us"]),
        ("roundtrip", r["engine_roundtrip_us"], r["libsodium_encrypt_us"] + r["libsodium_decrypt_us"]),
    ):
        r[f"{name}_overhead_vs_libsodium_us"] = engine_us - raw_us
        r[f"{name}_overhead_vs_libsodium_fraction"] = (engine_us - raw_us) / engine_us
    r["samples"] = {
        "encrypt_pps": enc_pps, "decrypt_pps": dec_pps, "roundtrip_pps": rt_pps,
        "handshakes_per_s": hs_ps, "raw_encrypt_us": raw_enc_us, "raw_decrypt_us": raw_dec_us,
        "libsodium_encrypt_us": lib_enc_us, "libsodium_decrypt_us": lib_dec_us,
    }
    r["packets_encrypted"] = warmup + sum(n for n, _, _ in encdec) + sum(n for n, _ in roundtrip)
    r["packets_verified"] = checks.verified
    r["packets_mismatched"] = checks.mismatched
    r["decrypt_matches_input"] = checks.mismatched == 0 and checks.verified == r["packets_encrypted"]
    r["handshakes"] = sum(n for n, _, _ in hs)
    r["handshakes_completed"] = sum(c for _, _, c in hs)
    r["drops"] = {**data_drops, **hs_link.drops()}
    r["wall_seconds"] = time.perf_counter() - started
    r["machine"] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynacl": nacl.__version__,
        "libsodium": AEAD.describe(),
    }
    return r


def table(r: dict) -> str:
    def spread(key: str) -> str:
        s = r["samples"][key]
        return f"{min(s):,.0f} .. {max(s):,.0f}" if s[0] > 100 else f"{min(s):.2f} .. {max(s):.2f}"

    rows = [
        ("encrypt (a.send)", f"{r['encrypt_pps']:,.0f} pkt/s", f"{r['engine_encrypt_us']:.2f} us", spread("encrypt_pps")),
        ("decrypt (b.receive)", f"{r['decrypt_pps']:,.0f} pkt/s", f"{r['engine_decrypt_us']:.2f} us", spread("decrypt_pps")),
        ("round trip (send+receive)", f"{r['roundtrip_pps']:,.0f} pkt/s", f"{r['engine_roundtrip_us']:.2f} us",
         spread("roundtrip_pps")),
        ("  payload throughput", f"{r['roundtrip_mbps']:,.0f} Mbit/s", "", ""),
        ("handshakes (init+resp+confirm)", f"{r['handshakes_per_s']:,.0f} /s", f"{r['handshake_us']:.0f} us",
         spread("handshakes_per_s")),
        ("AEAD encrypt via nacl.bindings (ref.)", "", f"{r['raw_encrypt_us']:.2f} us", spread("raw_encrypt_us")),
        ("AEAD decrypt via nacl.bindings (ref.)", "", f"{r['raw_decrypt_us']:.2f} us", spread("raw_decrypt_us")),
        ("libsodium encrypt (cffi, no wrapper)", "", f"{r['libsodium_encrypt_us']:.2f} us",
         spread("libsodium_encrypt_us")),
        ("libsodium decrypt (cffi, no wrapper)", "", f"{r['libsodium_decrypt_us']:.2f} us",
         spread("libsodium_decrypt_us")),
    ]
    # The engine calls libsodium through pynacl's cffi module, so its own overhead is what it
    # spends beyond that call; the nacl.bindings rows show what the public wrapper would cost.
    for name, what in (("encrypt", "send"), ("decrypt", "receive"), ("roundtrip", "round trip")):
        rows.append((f"engine overhead, {name.replace('roundtrip', 'round trip')}",
                     f"{r[f'{name}_overhead_vs_libsodium_fraction']:.0%} of {what}",
                     f"{r[f'{name}_overhead_vs_libsodium_us']:.2f} us", ""))
    m = r["machine"]
    head = (f"fzpoll engine, {r['size']}-byte IPv4 packets ({r['datagram_size']}-byte datagrams), median of "
            f"{r['runs']} runs, {r['seconds']:g} s budget; Python {m['python']}, pynacl {m['pynacl']}, "
            f"libsodium {m['libsodium']}, "
            f"{m['nproc']} CPUs, kernel {m['kernel']}")
    header = ("measurement", "rate", "per op", f"range of {r['runs']} runs")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    lines = [head, ""]
    for row in [header, tuple("-" * w for w in widths)] + rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    ok = "all equal to their inputs" if r["decrypt_matches_input"] else "MISMATCH"
    lines += ["", f"checked: {r['packets_verified']:,} of {r['packets_encrypted']:,} decrypted packets {ok}; "
                  f"{r['handshakes_completed']} of {r['handshakes']} handshakes completed; "
                  f"drops: {r['drops'] or 'none'}; wall {r['wall_seconds']:.1f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="budget of timed work (default 6)")
    parser.add_argument("--size", type=int, default=1420, help="IPv4 packet size in bytes (default 1420)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.runs < 1:
        parser.error("--seconds must be > 0 and --runs >= 1")
    r = measure(args.seconds, args.size, args.runs)
    print(json.dumps(r, indent=1) if args.json else table(r))
    ok = r["decrypt_matches_input"] and not r["drops"] and r["handshakes_completed"] == r["handshakes"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
