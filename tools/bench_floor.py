#!/usr/bin/env python3
"""The ceiling of a Python tunnel on this machine, beside upstream wireguard-go (issue 16).

fzpoll's ping RTT and TCP throughput are measured against upstream wireguard-go. This asks how
much of the gap any CPython tunnel must keep: it runs a *minimal forwarder* - no WireGuard
protocol at all, a fixed key per direction, no handshake, no timers, no routing table, no
counters, no logging; libsodium's ChaCha20-Poly1305 through the same cffi call as fzpoll's engine
- between two network namespaces, and, interleaved with it on the same namespaces, upstream
wireguard-go and fzpoll on both sides. The datagrams have WireGuard's sizes (16-byte header,
16-byte tag), so the kernel's work is the same. Two forwarders: ``floor`` (per wakeup one read,
one seal, one sendto; one recv, one open, one write) and ``floor-batch`` (fzpoll's IO shape:
drained TUN reads, UDP GSO sends and GRO reads, coalesced TUN writes).

If a minimal forwarder is slower than wireguard-go, no Python tunnel built of these calls and
this IO reaches wireguard-go on this machine: what is left is the interpreter's own cost.

    python3 tools/bench_floor.py [--rounds 5] [--tests ping,tcp] [--count 20] [--interval 0.05]
                                 [--duration 5] [--impls floor,floor-batch,upstream,fzpoll]

Needs root (namespaces, TUN) and iproute2, ping, wg, iperf3, ss; wrap in `flock
/tmp/fzpoll-bench.lock` on a shared machine. Only addresses inside the two namespaces it creates
are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
UPSTREAM = os.path.join(REPO, "..", "shared", "anchors", "wireguard-go-upstream")
NS = ("fzflA", "fzflB")
VETH = ("fzflvA", "fzflvB")
UNDERLAY = ("10.233.0.1", "10.233.0.2")
OVERLAY = ("100.66.0.1", "100.66.0.2")
IFACE = ("wgflA", "wgflB")
PORT = 51820
MTU = 1420
HEADER = struct.Struct("<IIQ")  # type 4 + reserved, receiver index, counter: WireGuard's sizes
TAG = 16


# ---------------------------------------------------------------------------- the forwarder


def _sockets(tun_fd: int) -> tuple[socket.socket, select.epoll]:
    """A forwarder's UDP socket (non-blocking, on PORT) and its epoll, watching it and ``tun_fd``."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", PORT))
    udp.setblocking(False)
    epoll = select.epoll()
    epoll.register(tun_fd, select.EPOLLIN)
    epoll.register(udp.fileno(), select.EPOLLIN)
    return udp, epoll


def forward_lone(iface: str, peer: tuple[str, int], key_out: bytes, key_in: bytes) -> None:
    """The minimal forwarder (``floor``): per wakeup one packet each way, plain TUN, no batching."""
    sys.path.insert(0, REPO)
    from nacl._sodium import ffi, lib

    from fzpoll.io.tun import TunDevice

    tun = TunDevice(iface)
    udp, epoll = _sockets(tun.fileno())
    seal, open_ = lib.crypto_aead_chacha20poly1305_ietf_encrypt, lib.crypto_aead_chacha20poly1305_ietf_decrypt
    out = ffi.new("unsigned char[]", 65536)
    out_view = ffi.buffer(out)
    null = ffi.NULL
    tun_fd = tun.fileno()
    counter = 0
    print("ready", flush=True)
    while True:
        for fd, _ in epoll.poll():
            if fd == tun_fd:
                packet = os.read(tun_fd, 65536)
                n = len(packet)
                HEADER.pack_into(out_view, 0, 4, 1, counter)
                seal(out + 16, null, packet, n, null, 0, null, b"\0\0\0\0" + counter.to_bytes(8, "little"), key_out)
                counter += 1
                udp.sendto(out_view[0:16 + n + TAG], peer)
            else:
                data = udp.recv(65536)
                _, _, seq = HEADER.unpack_from(data)
                n = len(data) - 16 - TAG
                if n < 0 or open_(out, null, null, data[16:], n + TAG, null, 0,
                                  b"\0\0\0\0" + seq.to_bytes(8, "little"), key_in):
                    continue
                os.write(tun_fd, out_view[0:n])


def forward_batch(iface: str, peer: tuple[str, int], key_out: bytes, key_in: bytes) -> None:
    """The minimal forwarder with fzpoll's IO (``floor-batch``).

    It has fzpoll's IO shape, so that its TCP figure is the ceiling of that shape: a wakeup drains
    up to 64 packets from TUN and sends their datagrams in one UDP GSO sendmsg; a UDP GRO read
    gives a run of datagrams, whose packets go to TUN coalesced (fzpoll.io.vnet.coalesce, with
    virtio-net headers). A lone packet costs one more read than in the loop above: the one that
    ends in EAGAIN."""
    sys.path.insert(0, REPO)
    from nacl._sodium import ffi, lib

    from fzpoll.io.tun import TunDevice
    from fzpoll.io.udp import SOL_UDP, UDP_GRO, UDP_SEGMENT, gso_run
    from fzpoll.io.vnet import VNET_HDR_LEN, coalesce

    tun = TunDevice(iface, offload=True, segmentation=False)
    if not tun.vnet_hdr:
        raise SystemExit("bench_floor: this kernel's TUN has no virtio-net headers")
    udp, epoll = _sockets(tun.fileno())
    udp.setsockopt(SOL_UDP, UDP_GRO, 1)
    seal, open_ = lib.crypto_aead_chacha20poly1305_ietf_encrypt, lib.crypto_aead_chacha20poly1305_ietf_decrypt
    out = ffi.new("unsigned char[]", 65536)
    out_view = ffi.buffer(out)
    null = ffi.NULL
    tun_fd = tun.fileno()
    space = socket.CMSG_SPACE(4)
    counter = 0
    print("ready", flush=True)
    while True:
        for fd, _ in epoll.poll():
            if fd == tun_fd:
                sealed = []
                try:
                    while len(sealed) < 64:
                        packet = os.read(tun_fd, 65536)[VNET_HDR_LEN:]
                        n = len(packet)
                        HEADER.pack_into(out_view, 0, 4, 1, counter)
                        seal(out + 16, null, packet, n, null, 0, null, b"\0\0\0\0" + counter.to_bytes(8, "little"),
                             key_out)
                        counter += 1
                        sealed.append((out_view[0:16 + n + TAG], peer, None))
                except BlockingIOError:
                    pass
                start = 0
                while start < len(sealed):  # runs as fzpoll's UDP sends cut them
                    end = gso_run(sealed, start, len(sealed))
                    size = len(sealed[start][0])
                    segment = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))] if end - start > 1 else []
                    udp.sendmsg([data for data, _, _ in sealed[start:end]], segment, 0, peer)
                    start = end
            else:
                data, ancillary, _, _ = udp.recvmsg(65536, space)
                size = len(data)
                for _, kind, value in ancillary:
                    if kind == UDP_GRO:
                        size = int.from_bytes(value[:4], "little")
                plain = []
                for offset in range(0, len(data), size):
                    datagram = data[offset:offset + size]
                    _, _, seq = HEADER.unpack_from(datagram)
                    n = len(datagram) - 16 - TAG
                    if n < 0 or open_(out, null, null, datagram[16:], n + TAG, null, 0,
                                      b"\0\0\0\0" + seq.to_bytes(8, "little"), key_in):
                        continue
                    plain.append(out_view[0:n])
                for frame in coalesce(plain, authenticated=True):
                    try:
                        os.write(tun_fd, frame)
                    except OSError:  # the kernel's own IPv6 multicast, which fzpoll drops as MULTICAST
                        pass


# ---------------------------------------------------------------------------- the namespaces


def sh(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


def in_ns(side: int, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", NS[side], *argv]


def setup() -> None:
    cleanup()
    for side in (0, 1):
        sh("ip", "netns", "add", NS[side])
        sh(*in_ns(side, "ip", "link", "set", "lo", "up"))
    sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    for side in (0, 1):
        sh(*in_ns(side, "ip", "addr", "add", f"{UNDERLAY[side]}/24", "dev", VETH[side]))
        sh(*in_ns(side, "ip", "link", "set", VETH[side], "up"))


def cleanup() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)


def bring_up_tunnel(side: int) -> None:
    """Address, MTU and route on the side's interface, once the daemon has made it."""
    for _ in range(200):
        if sh(*in_ns(side, "ip", "link", "show", IFACE[side]), check=False).returncode == 0:
            break
        time.sleep(0.02)
    else:
        raise SystemExit(f"bench_floor: {IFACE[side]} did not appear in {NS[side]}")
    sh(*in_ns(side, "ip", "addr", "add", f"{OVERLAY[side]}/32", "peer", f"{OVERLAY[1 - side]}/32", "dev", IFACE[side]))
    sh(*in_ns(side, "ip", "link", "set", IFACE[side], "mtu", str(MTU), "up"))


FORWARDERS = {"floor": "lone", "floor-batch": "batch"}
KINDS = ("floor", "floor-batch", "upstream", "fzpoll")


def start(impl: str, side: int, keys: dict, workdir: str) -> subprocess.Popen:
    """Start ``impl`` on ``side`` and configure it; the caller stops it."""
    kind = impl.partition("@")[0]
    if kind in FORWARDERS:
        argv = [sys.executable, os.path.abspath(__file__), "--forward", FORWARDERS[kind], IFACE[side],
                UNDERLAY[1 - side], keys["floor"][side].hex(), keys["floor"][1 - side].hex()]
    elif kind == "upstream":
        argv = [UPSTREAM, "-f", IFACE[side]]
    else:
        argv = [sys.executable, "-m", "fzpoll", "-f", IFACE[side]]
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1", PYTHONPATH=REPO)
    env.update(variant_env(impl))
    proc = subprocess.Popen(in_ns(side, *argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kind not in FORWARDERS:
        sock = f"/var/run/wireguard/{IFACE[side]}.sock"
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        else:
            proc.kill()
            raise SystemExit(f"bench_floor: {impl} made no UAPI socket {sock}")
        private = os.path.join(workdir, f"key{side}")
        sh("wg", "set", IFACE[side], "private-key", private, "listen-port", str(PORT), "peer", keys["public"][1 - side],
           "allowed-ips", f"{OVERLAY[1 - side]}/32", "endpoint", f"{UNDERLAY[1 - side]}:{PORT}")
    bring_up_tunnel(side)
    return proc


def variant_env(impl: str) -> dict[str, str]:
    """``fzpoll@NAME=VALUE+NAME=VALUE``: fzpoll with these environment variables."""
    _, _, spec = impl.partition("@")
    return dict(item.split("=", 1) for item in spec.split("+") if "=" in item)


def ping(count: int, interval: float) -> float | None:
    """Average RTT in ms of ``count`` pings from A to B's tunnel address, after a warm-up."""
    sh(*in_ns(0, "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", OVERLAY[1]), check=False)
    out = sh(*in_ns(0, "ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", OVERLAY[1]),
             check=False).stdout
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return float(m.group(1)) if m and " 0% packet loss" in out else None


def tcp(seconds: float) -> float | None:
    """Mbit/s received by iperf3 in B from one TCP stream from A, through the tunnel."""
    server = subprocess.Popen(in_ns(1, "iperf3", "-s", "-1", "-B", OVERLAY[1]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if OVERLAY[1] in sh(*in_ns(1, "ss", "-ltnH"), check=False).stdout:
                break
            time.sleep(0.05)
        out = sh(*in_ns(0, "iperf3", "-c", OVERLAY[1], "-t", str(seconds), "-J"), check=False,
                 timeout=seconds + 30).stdout
        received = json.loads(out)["end"]["sum_received"]["bits_per_second"]
        return received / 1e6
    except (ValueError, KeyError, subprocess.TimeoutExpired):
        return None
    finally:
        server.kill()
        server.wait()


def measure(impl: str, keys: dict, workdir: str, args: argparse.Namespace) -> dict[str, float | None]:
    procs = []
    try:
        for side in (0, 1):
            procs.append(start(impl, side, keys, workdir))
        result = {}
        if "ping" in args.tests:
            result["ping"] = ping(args.count, args.interval)
        if "tcp" in args.tests:
            result["tcp"] = tcp(args.duration)
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"bench_floor: {impl} exited with status {proc.returncode} during the test")
        return result
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def make_keys(workdir: str) -> dict:
    public = []
    for side in (0, 1):
        private = sh("wg", "genkey").stdout.strip()
        with open(os.path.join(workdir, f"key{side}"), "w") as f:
            f.write(private + "\n")
        public.append(sh("wg", "pubkey", input=private + "\n").stdout.strip())
    return {"public": public, "floor": (os.urandom(32), os.urandom(32))}


UNITS = {"ping": "ping RTT avg, ms", "tcp": "TCP 1 stream, Mbit/s received"}


def report(results: dict[str, dict[str, list[float]]], tests: list[str], rounds: int) -> None:
    for test in tests:
        print(f"\n{UNITS[test]}: medians of {rounds} interleaved rounds")
        base = results["upstream"][test] if "upstream" in results else []
        base_median = statistics.median(base) if base else None
        for impl, by_test in results.items():
            values = by_test[test]
            if not values:
                print(f"{impl:14} no result")
                continue
            median = statistics.median(values)
            ratio = f"  {median / base_median:.2f}x upstream" if base_median else ""
            print(f"{impl:14} {median:9.3f}{ratio}   ({', '.join(f'{v:.3f}' for v in values)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tests", default="ping", help="comma-separated: ping, tcp")
    parser.add_argument("--count", type=int, default=20, help="pings per measurement (the harness: 20)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between pings (the harness: 0.05)")
    parser.add_argument("--duration", type=float, default=5, help="seconds of the TCP test (the harness: 5)")
    parser.add_argument("--impls", default="floor,upstream,fzpoll",
                        help="comma-separated, run in this order each round: " + ", ".join(KINDS) +
                             "; fzpoll@NAME=VALUE+NAME=VALUE runs fzpoll with these environment variables")
    parser.add_argument("--forward", nargs=5, metavar=("KIND", "IFACE", "PEER", "KEY_OUT", "KEY_IN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward:
        kind, iface, peer, key_out, key_in = args.forward
        run = forward_lone if kind == "lone" else forward_batch
        run(iface, (peer, PORT), bytes.fromhex(key_out), bytes.fromhex(key_in))
        return 0
    impls = [i for i in args.impls.split(",") if i]
    unknown = {i.partition("@")[0] for i in impls} - set(KINDS)
    if unknown:
        parser.error(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    args.tests = [t for t in args.tests.split(",") if t]
    if not args.tests or set(args.tests) - set(UNITS):
        parser.error("--tests: a comma-separated subset of ping, tcp")
    if os.geteuid() != 0:
        raise SystemExit("bench_floor: needs root (network namespaces, TUN)")
    for tool in ("ip", "ping", "wg", "iperf3", "ss"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench_floor: {tool} not found")
    if "upstream" in impls and not os.access(UPSTREAM, os.X_OK):
        raise SystemExit(f"bench_floor: no upstream wireguard-go at {UPSTREAM} (leave it out with --impls)")
    results = {impl: {test: [] for test in args.tests} for impl in impls}
    with tempfile.TemporaryDirectory() as workdir:
        keys = make_keys(workdir)
        try:
            setup()
            for r in range(args.rounds):
                for impl in impls:
                    got = measure(impl, keys, workdir, args)
                    print(f"round {r + 1}/{args.rounds} {impl}: {got}", flush=True)
                    for test, value in got.items():
                        if value is not None:
                            results[impl][test].append(value)
        finally:
            cleanup()
    report(results, args.tests, args.rounds)
    return 0 if all(v for by_test in results.values() for v in by_test.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
