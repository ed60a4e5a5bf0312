#!/usr/bin/env python3
"""Control-plane benchmark: fzpoll beside wireguard-go (Debian's, and upstream's if present).

For each implementation, in namespaces it creates (tests/netns.py: uniquely named, torn down):
the implementation under test in ns A (configured with ``wg``), Debian's wireguard-go in ns B,
a session between them, and a ping every 10 ms from B through the tunnel during every step:

- ``wg addconf`` of 1,000 and 10,000 peers (each with a preshared key and one allowed IP),
- ``wg syncconf`` of the same 10,000-peer config again (nothing changes),
- ``wg show dump`` of 10,000 peers,
- ``wg addconf`` of one peer with 130,560 allowed IPs (wireguard-go's own test: a.b.0.0/16 and
  a::b/128 for a in 1..255, b in 0..255),

and, for fzpoll only, ``fzpoll up`` reloads (SIGHUP) from 1 peer to 3,000 and back, and the
start of ``fzpoll up`` with 10,000 peers (until "interface ready", routes included). Each step
prints its wall time, the ping's losses and its maximum RTT. Timings on a shared 2-core machine
are noisy: run with ``--rounds N`` and quote medians.

    sudo flock /tmp/fzpoll-bench.lock python3 tools/bench_control.py --rounds 3
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UPSTREAM = Path(os.environ.get("WIREGUARD_GO_UPSTREAM", "/work/shared/anchors/wireguard-go-upstream"))
_REPLY = re.compile(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms")


def _peers_conf(path: Path, count: int, psk: str) -> None:
    with open(path, "w") as f:
        for i in range(count):
            key = base64.b64encode((i + 1).to_bytes(4, "big") + bytes(28)).decode()
            f.write(f"[Peer]\nPublicKey = {key}\nPresharedKey = {psk}\n"
                    f"AllowedIPs = 10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}/32\n")


def _big_conf(path: Path, key: str) -> None:
    with open(path, "w") as f:
        f.write(f"[Peer]\nPublicKey = {key}\n")
        for a in range(1, 256):
            f.write("AllowedIPs = " + ", ".join(f"{a}.{b}.0.0/16, {a:x}::{b:x}/128" for b in range(256)) + "\n")


class Ping:
    def __init__(self, ns, address: str) -> None:
        self.proc = ns.popen(["ping", "-n", "-i", "0.01", "-W", "2", address],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, float]:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        replies = {int(s): float(ms) for s, ms in _REPLY.findall(out)}
        if not replies:
            return -1, float("nan")
        lost = sum(1 for s in range(1, max(replies) + 1) if s not in replies)
        return lost, max(replies.values())


def _step(ns_a, ns_b, argv: list[str]) -> tuple[float, int, float]:
    ping = Ping(ns_b, "100.64.0.1")
    time.sleep(0.2)
    started = time.monotonic()
    result = ns_a.run(argv, check=False, timeout=300)
    took = time.monotonic() - started
    lost, worst = ping.stop()
    if result.returncode:
        raise RuntimeError(f"{argv[:3]} failed ({result.returncode}): {result.stderr[-300:]}")
    return took, lost, worst


def bench_wg(netns, kind: type, tmp: Path) -> dict[str, tuple[float, int, float]]:
    """The wg steps against one implementation in ns A."""
    out: dict[str, tuple[float, int, float]] = {}
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        pair = netns.veth_pair(ns_a, ns_b)
        a, _b = netns.wg_pair(ns_a, ns_b, pair, kind_a=kind)
        ns_b.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.1"], timeout=20)
        psk = netns.genkey()
        for count in (1000, 10_000):
            conf = tmp / f"peers{count}.conf"
            _peers_conf(conf, count, psk)
            out[f"addconf {count} peers"] = _step(ns_a, ns_b, ["wg", "addconf", a.ifname, str(conf)])
        # syncconf of the same set: the interface's own key and port, then the 10k peers
        full = tmp / "full.conf"
        dump = ns_a.run(["wg", "showconf", a.ifname], timeout=120).stdout
        full.write_text(dump)
        out["syncconf unchanged 10k"] = _step(ns_a, ns_b, ["wg", "syncconf", a.ifname, str(full)])
        out["show dump 10k peers"] = _step(ns_a, ns_b, ["wg", "show", a.ifname, "dump"])
        big = tmp / "big.conf"
        _big_conf(big, netns.pubkey(netns.genkey()))
        out["addconf 130,560 allowed IPs"] = _step(ns_a, ns_b, ["wg", "addconf", a.ifname, str(big)])
    return out


def bench_reload(netns, tmp: Path) -> dict[str, tuple[float, int, float]]:
    """``fzpoll up`` reloads: 1 -> 3,000 peers -> 1, time until the log says reloaded."""
    out: dict[str, tuple[float, int, float]] = {}
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        pair = netns.veth_pair(ns_a, ns_b)
        key_a = netns.genkey()
        _b, key_b = netns.wireguard_go_peer(ns_b, pair, key_a)
        ifname = f"wgb{os.urandom(2).hex()}"
        conf = tmp / f"{ifname}.conf"
        head = (f"[Interface]\nPrivateKey = {key_a}\nListenPort = 51820\nAddress = 100.64.0.1/32\n\n"
                f"[Peer]\nPublicKey = {netns.pubkey(key_b)}\nEndpoint = {pair.ip_b}:51821\n"
                "AllowedIPs = 100.64.0.2/32\n")
        conf.touch(mode=0o600)
        conf.write_text(head)
        log_path = tmp / "up.log"
        with open(log_path, "wb") as log:
            proc = ns_a.popen([sys.executable, "-m", "fzpoll", "up", str(conf), "--log-level", "info"],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 20
        while ns_a.run(["wg", "show", ifname], check=False).returncode:
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-2000:])
            time.sleep(0.1)
        ns_b.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.1"], timeout=20)
        psk = netns.genkey()
        many = tmp / "many.conf"
        _peers_conf(many, 3000, psk)
        for name, text in (("reload 1 -> 3,001 peers", head + "\n" + many.read_text()), ("reload 3,001 -> 1 peer", head)):
            conf.write_text(text)
            before = log_path.read_text().count("configuration reloaded")
            ping = Ping(ns_b, "100.64.0.1")
            time.sleep(0.2)
            started = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            while log_path.read_text().count("configuration reloaded") == before:
                if time.monotonic() - started > 120:
                    raise RuntimeError(log_path.read_text()[-2000:])
                time.sleep(0.02)
            took = time.monotonic() - started
            out[name] = (took, *ping.stop())
    return out


def bench_up(netns, tmp: Path, peers: int = 10_000) -> dict[str, tuple[float, int, float]]:
    """``fzpoll up`` of a config with ``peers`` peers (a route each): seconds until ready."""
    with netns.Namespace("a") as ns_a:
        ifname = f"wgu{os.urandom(2).hex()}"
        conf = tmp / f"{ifname}.conf"
        conf.touch(mode=0o600)
        conf.write_text(f"[Interface]\nPrivateKey = {netns.genkey()}\nAddress = 100.64.0.1/32\n")
        many = tmp / "up-many.conf"
        _peers_conf(many, peers, netns.genkey())
        conf.write_text(conf.read_text() + "\n" + many.read_text())
        log_path = tmp / "up10k.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = ns_a.popen([sys.executable, "-m", "fzpoll", "up", str(conf), "--log-level", "info"],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
        while "interface ready" not in log_path.read_text():
            if time.monotonic() - started > 120 or proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-2000:])
            time.sleep(0.02)
        took = time.monotonic() - started
        routes = len(ns_a.ip_json("route", "show", "dev", ifname))
        if routes < peers:
            raise RuntimeError(f"only {routes} routes")
        return {f"fzpoll up of {peers:,} peers": (took, 0, float("nan"))}


def bench_inprocess() -> None:
    """The UAPI's own work for the 130,560-prefix request, without sockets: total seconds of
    parse + commit and of the ``get`` answer, and the longest single slice (the server gives one
    slice per client per turn, and at most 2 ms of slices per pass of the loop)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import FakeHost  # noqa: E402

    from fzpoll.uapi.protocol import UapiConnection
    from fzpoll.uapi.server import WORK_SLICE

    tmp_lines = ["set=1", "public_key=" + "0a" * 32]
    for a in range(1, 256):
        tmp_lines += [f"allowed_ip={a}.{b}.0.0/16\nallowed_ip={a:x}::{b:x}/128" for b in range(256)]
    data = ("\n".join(tmp_lines) + "\n\n").encode()
    host = FakeHost()
    for name, request in (("set of 130,560 allowed IPs", data), ("get of 130,560 allowed IPs", b"get=1\n\n")):
        conn = UapiConnection(host)
        worst = 0.0
        started = time.perf_counter()
        for i in range(0, len(request), 65536):
            conn.feed(request[i:i + 65536])
            while True:
                t = time.perf_counter()
                conn.process(0.0, WORK_SLICE)
                worst = max(worst, time.perf_counter() - t)
                if not conn.has_pending:
                    break
        total = time.perf_counter() - started
        print(f"in-process {name:28} total {total:6.3f} s   longest slice {worst * 1000:6.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1, help="rounds, interleaved (medians are printed)")
    p.add_argument("--in-process", action="store_true", help="only the UAPI's own work, no root needed")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.in_process:
        bench_inprocess()
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    import netns  # noqa: E402  (tests/netns.py)

    class Fz(netns.Fzpoll):
        program = (sys.executable, "-m", "fzpoll", "-f", "--log-level", "info")

    class Upstream(netns.WireguardGo):
        program = (str(UPSTREAM), "-f")

    kinds: dict[str, type] = {"fzpoll": Fz, "wireguard-go (Debian)": netns.WireguardGo}
    if UPSTREAM.exists():
        kinds["wireguard-go (upstream)"] = Upstream
    results: dict[str, dict[str, list[tuple[float, int, float]]]] = {}
    for _ in range(args.rounds):
        for name, kind in kinds.items():
            with tempfile.TemporaryDirectory(prefix="fzbench-ctl-") as tmp:
                for step, figures in bench_wg(netns, kind, Path(tmp)).items():
                    results.setdefault(step, {}).setdefault(name, []).append(figures)
        with tempfile.TemporaryDirectory(prefix="fzbench-ctl-") as tmp:
            for step, figures in {**bench_reload(netns, Path(tmp)), **bench_up(netns, Path(tmp))}.items():
                results.setdefault(step, {}).setdefault("fzpoll", []).append(figures)
    print(f"{'step':32} {'implementation':24} {'seconds':>8} {'lost':>5} {'max RTT ms':>10}  (median of {args.rounds})")
    for step, by_kind in results.items():
        for name, runs in by_kind.items():
            took = statistics.median(r[0] for r in runs)
            lost = max(r[1] for r in runs)
            worst = statistics.median(r[2] for r in runs)
            print(f"{step:32} {name:24} {took:8.3f} {lost:5d} {worst:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
