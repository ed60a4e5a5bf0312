#!/usr/bin/env python3
"""Flood benchmark: what attackers flooding daemon B do to a working tunnel A <-> B, for fzpoll
and for upstream wireguard-go side by side.

Topology (three network namespaces per implementation, created and removed by this script; run
as root)::

    A  vethNa 10.231.N.1 ---- vethNb 10.231.N.2  B  vethMb 10.231.M.2 ---- vethMa 10.231.M.1  X
    A  100.64.0.1  <== tunnel ==>  100.64.0.2  B (UDP 51821)                         attackers

``--impls fzpoll,wireguard-go``: A and B both run fzpoll (A ``fzpoll -f`` configured with wg, B
``fzpoll up CONF`` with a DNS stub: ``DNS =`` X's address, ``[Resource] Name = *.corp.test``), or
both run upstream wireguard-go (/work/shared/anchors/wireguard-go-upstream, ``$WG_GO_UPSTREAM``);
``fzpoll-noindex`` and ``fzpoll-nofilter`` are fzpoll without the kernel's receiver-index check
(FZPOLL_FILTER_INDICES=0) or without the kernel prefilter at all (FZPOLL_DISABLE_FILTER=1);
``fzpoll-nodnslimit`` is fzpoll without the kernel's rate limit on the DNS sentinels
(FZPOLL_DNS_RATE=0, fzpoll/dns/shaper.py).
Both setups stay up for the whole run and the cells alternate between them (flood by flood), so
a disturbance of the shared machine hits both alike. ``--attackers N`` flooding processes (each
``sendmmsg`` of 256 datagrams per call from a pool prepared beforehand, tools/flood_attack.py),
in turn:

  none  no flood (the baseline row);
  a     random junk of varied sizes (1-1400 bytes, mostly small; the sizes defeat GRO), from X;
  b     well-formed transport headers with random receiver indices (32-256 bytes), from X;
  c     handshake initiations with a valid MAC1 from an attacker key B does not know, each from a
        different spoofed source address (raw IPv4 from X, sources random in 10.99.0.0/16, B
        routes its answers back to X): the per-source rate limit cannot help, the under-load
        cookie path and the per-pass shedding must;
  d     replays of real B-bound transport datagrams of the current session (captured with
        AF_PACKET on B's A-facing veth while A pings B), from X;
  e     DNS queries into the tunnel at B's stub (100.100.111.1), from a process in B's namespace:
        half for a resource name the stub answers, half for random names it forwards to an
        upstream that never answers (fzpoll only: wireguard-go has no stub); during the ping a
        legitimate client in B asks for the resource name 20 times (one try, 0.5 s timeout);
  f     the UAPI socket: processes connecting, sending ``get=1``, a bad ``set=1`` or garbage,
        reading the answer, closing, as fast as they can (``--attackers`` of them).

During each flood, through the tunnel from A: ``ping -i 0.01`` (RTT p50/p99 and loss) for half
the cell, then ``iperf3 -c`` (TCP A->B) for the other half. Daemon B's CPU (utime+stime from
/proc/PID/stat over the cell, in % of one core) and peak RSS (VmHWM, reset per cell through
/proc/PID/clear_refs). B's kernel UDP counters (/proc/net/snmp in B's namespace: datagrams
delivered to sockets, receive-buffer drops, InErrors - which counts what B's socket filter
rejected plus the buffer drops), the host's input-backlog drops (/proc/net/softnet_stat), B's top
drop reasons and kernel drops (fzpoll's ``get=fzpoll``).

The machine may be shared: before each cell the script waits (up to 20 s) for the host to be at
most 40% busy, and the "other CPU %" column is the CPU that processes outside these namespaces
used during the cell (in % of one core): a cell with a large value was disturbed.

``--soak S`` instead runs floods c and a for S seconds each and samples B's VmRSS every second
(with a 5/s ping through the tunnel), reporting min/max: memory must stay flat under a long flood.

    sudo python3 tools/bench_flood.py [--seconds 10] [--quick] [--attackers 2] [--attack-pps 0]
                                      [--impls fzpoll,wireguard-go] [--floods a,b,c,d,e,f]
                                      [--rounds 1] [--schedule fair] [--max-wait 20] [--json FILE]
                                      [--keep-logs DIR]
    sudo python3 tools/bench_flood.py --soak 60

Only the namespaces created here receive traffic; every flood stops after its cell (SIGTERM, and
each flooder has a hard deadline of its own).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tools"))

import flood_attack as attack  # noqa: E402
from flood_measure import (  # noqa: E402
    ForeignCpu, finish_dns_probe, proc_cpu_seconds, proc_status_kib, reset_peak_rss, run_iperf, run_ping, softnet_dropped,
    start_dns_probe, udp_counters, wait_quiet,
)
from fzpoll.wireguard.constants import REKEY_AFTER_TIME  # noqa: E402  (the initiator rekeys a session this old)

PORT_A, PORT_B = 51820, 51821
TUN_A, TUN_B = "100.64.0.1", "100.64.0.2"
SENTINEL = "100.100.111.1"
LOCAL_NAME = "app.corp.test"
WG_GO_UPSTREAM = os.environ.get("WG_GO_UPSTREAM", "/work/shared/anchors/wireguard-go-upstream")
ATTACKER = str(REPO / "tools" / "flood_attack.py")
# Implementations (A and B run the same one); the fzpoll variants switch parts of the prefilter off.
IMPL_ENV = {
    "fzpoll": {},
    "fzpoll-noindex": {"FZPOLL_FILTER_INDICES": "0"},  # no receiver-index check in the kernel
    "fzpoll-nofilter": {"FZPOLL_DISABLE_FILTER": "1"},  # no kernel prefilter at all
    "fzpoll-nodnslimit": {"FZPOLL_DNS_RATE": "0"},  # no kernel rate limit on the DNS sentinels
    "wireguard-go": {},
}
FLOODS = {
    "none": "no flood",
    "a": "random junk, 1-1400 B",
    "b": "transport, unknown index",
    "c": "initiations, valid MAC1, spoofed sources",
    "d": "replayed transport",
    "e": "DNS queries at the stub",
    "f": "UAPI connections",
}

# =============================================================================================
# Inside B's namespace: capture B-bound transport datagrams (``bench_flood.py _capture ...``)


def capture_main(argv: list[str]) -> int:
    ifname, port, count, seconds, out_path = argv
    port, count = int(port), int(count)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((ifname, 0))
    s.settimeout(0.2)
    print("ready", flush=True)
    found: list[bytes] = []
    deadline = time.monotonic() + float(seconds)
    while len(found) < count and time.monotonic() < deadline:
        try:
            frame, addr = s.recvfrom(65535)
        except socket.timeout:
            continue
        if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        if ip[9] != 17:
            continue
        udp = ip[(ip[0] & 15) * 4:]
        length = int.from_bytes(udp[4:6], "big")
        payload = udp[8:length]
        if (int.from_bytes(udp[2:4], "big") == port and payload[:1] == b"\x04"
                and len(payload) == length - 8 == len(udp) - 8 and len(payload) <= 1500):
            found.append(bytes(payload))
    attack.write_pool(out_path, found)
    print(len(found), flush=True)
    return 0


def fzpoll_stats(socket_path: Path) -> dict:
    """fzpoll's own counters (``get=fzpoll``), if this daemon answers it; {} otherwise."""
    from fzpoll.show import QueryError, parse_stats, query

    try:
        return parse_stats(query(str(socket_path), b"get=fzpoll\n\n", 3)[0]) or {}
    except QueryError:
        return {}

def _drops(stats: dict) -> dict[str, int]:
    for key in ("drops", "engine_drops"):
        if isinstance(stats.get(key), dict):
            return stats[key]
    return {}


# =============================================================================================
# The topology


class Setup:
    """Namespaces A, B, X; ``impl`` on A and B; a working tunnel; B routes spoofed sources to X."""

    def __init__(self, impl: str, schedule: str, tmp: Path) -> None:
        import netns

        self.netns = netns
        self.impl = impl
        self.schedule = schedule
        self.namespaces = []
        self.ns_a, self.ns_b, self.ns_x = (self._ns(t) for t in ("a", "b", "x"))
        self.ab = netns.veth_pair(self.ns_a, self.ns_b)
        self.xb = netns.veth_pair(self.ns_x, self.ns_b)
        self.ns_b.ip("route", "add", "default", "via", self.xb.ip_a)  # answers to spoofed sources
        key_a, key_b = netns.genkey(), netns.genkey()
        self.public_a, self.public_b = netns.pubkey(key_a), netns.pubkey(key_b)
        saved = {k: os.environ.get(k) for k in IMPL_ENV[impl]}
        os.environ.update(IMPL_ENV[impl])  # the daemons inherit it
        try:
            self._start(key_a, key_b, tmp)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.ns_a.run(["ping", "-c", "3", "-i", "0.1", "-W", "2", TUN_B], timeout=20)
        self.pid_b = self.b.proc.pid
        self.started = time.monotonic()
        assert self.kind.split("-")[0] in Path(f"/proc/{self.pid_b}/cmdline").read_text(errors="replace")

    @property
    def kind(self) -> str:
        return "wireguard-go" if self.impl == "wireguard-go" else "fzpoll"

    def _start(self, key_a: str, key_b: str, tmp: Path) -> None:
        self.a = self._daemon(self.ns_a).start()
        self.a.configure(key_a, PORT_A)
        self.a.add_peer(self.public_b, [f"{TUN_B}/32"], f"{self.ab.ip_b}:{PORT_B}")
        self.a.address(f"{TUN_A}/32")
        self.a.up()
        self.a.route(f"{TUN_B}/32")
        if self.kind == "fzpoll":
            self.b = self._fzpoll_up(key_b, tmp).start(timeout=15)
            self._wait_route(SENTINEL)
        else:
            self.b = self._daemon(self.ns_b).start()
            self.b.configure(key_b, PORT_B)
            self.b.add_peer(self.public_a, [f"{TUN_A}/32"], f"{self.ab.ip_a}:{PORT_A}")
            self.b.address(f"{TUN_B}/32")
            self.b.up()
            self.b.route(f"{TUN_A}/32")

    def _ns(self, tag: str):
        ns = self.netns.Namespace(tag)
        self.namespaces.append(ns)
        return ns

    def _daemon(self, ns):
        level = os.environ.get("FLOOD_LOG_LEVEL", "warning")
        if self.kind == "wireguard-go":
            class WgGo(self.netns.WireguardGo):
                program = (WG_GO_UPSTREAM, "-f")

            return WgGo(ns, log_level="error")

        class Daemon(self.netns.Fzpoll):
            program = (sys.executable, "-m", "fzpoll", "-f", "--log-level", level, "--schedule", self.schedule)

        return Daemon(ns)

    def _fzpoll_up(self, key_b: str, tmp: Path):
        """B as a Firezone-style client: ``fzpoll up CONF`` with the DNS stub."""
        ifname = f"fzf{random.getrandbits(16):04x}"
        conf = tmp / f"{ifname}.conf"
        conf.write_text(
            f"[Interface]\nPrivateKey = {key_b}\nListenPort = {PORT_B}\nAddress = {TUN_B}/32\n"
            f"DNS = {self.xb.ip_a}\n"
            f"\n[Peer]\nPublicKey = {self.public_a}\nEndpoint = {self.ab.ip_a}:{PORT_A}\nAllowedIPs = {TUN_A}/32\n"
            f"\n[Resource]\nName = *.corp.test\nPeer = {self.public_a}\n")
        conf.chmod(0o600)
        argv = [sys.executable, "-m", "fzpoll", "up", str(conf), "--schedule", self.schedule,
                "--log-level", os.environ.get("FLOOD_LOG_LEVEL", "warning")]

        class Up(self.netns.Fzpoll):
            def argv(self) -> list[str]:
                return argv

        return Up(self.ns_b, ifname)

    def _wait_route(self, address: str) -> None:
        deadline = time.monotonic() + 15
        while not list(self.ns_b.ip_json("route", "show", address)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no route to {address} in B: {self.b.log()[-3000:]}")
            time.sleep(0.05)

    def close(self, log_dir: str | None = None) -> None:
        if log_dir:
            for name, daemon in (("a", self.a), ("b", self.b)):
                Path(log_dir, f"{self.impl}-{name}.log").write_text(daemon.log())
        for ns in reversed(self.namespaces):
            ns.close()

    def latest_handshake_b(self) -> int:
        return self.b.wg_show_dump().peers[0].latest_handshake


def start_flooders(setup: Setup, flood: str, pool: list[bytes], count: int, max_seconds: float,
                   pps: float, tmp: Path) -> list[subprocess.Popen]:
    """``count`` attacker processes for ``flood``: from X at B's UDP port (c: raw, spoofed), in
    B's namespace at the DNS stub (e), or at B's UAPI socket (f)."""
    path = tmp / f"pool-{random.getrandbits(32):08x}"
    attack.write_pool(str(path), pool)
    share = str(pps / count if pps else 0)
    if flood == "c":
        ns, argv = setup.ns_x, ["raw", str(path), setup.xb.ip_b, str(max_seconds), share]
    elif flood == "e":
        ns, argv = setup.ns_b, ["udp", str(path), SENTINEL, "53", str(max_seconds), share]
    elif flood == "f":
        ns, argv = setup.ns_b, ["uapi", str(setup.b.socket_path), str(max_seconds)]
    else:
        ns, argv = setup.ns_x, ["udp", str(path), setup.xb.ip_b, str(PORT_B), str(max_seconds), share]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return [ns.popen([sys.executable, ATTACKER, *argv], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(count)]


def stop_flooders(flooders: list[subprocess.Popen]) -> list[dict]:
    results = []
    for p in flooders:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in flooders:
        try:
            out, _ = p.communicate(timeout=10)
            results.append(json.loads(out.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
            p.kill()
            p.wait()
            results.append({"sent": 0, "seconds": 0.0, "error": "flooder failed"})
    return results


def capture_replays(setup: Setup, count: int, tmp: Path) -> list[bytes]:
    path = tmp / "captured"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cap = setup.ns_b.popen([sys.executable, str(Path(__file__).resolve()), "_capture", setup.ab.if_b,
                            str(PORT_B), str(count), "20", str(path)], stdout=subprocess.PIPE, text=True,
                           env=env)
    assert cap.stdout.readline().strip() == "ready"
    setup.ns_a.run(["ping", "-n", "-q", "-i", "0.002", "-c", str(count + 20), "-W", "1", TUN_B],
                   check=False, timeout=60)
    cap.communicate(timeout=30)
    return attack.read_pool(str(path))


def make_pool(kind: str, setup: Setup, size: int, tmp: Path) -> list[bytes]:
    rng = random.Random(0xF1 ^ ord(kind))
    public_b = base64.b64decode(setup.public_b)
    makers = {
        "a": lambda: attack.pool_junk(size, rng),
        "b": lambda: attack.pool_unknown_index(size, rng),
        "c": lambda: attack.spoofed(attack.pool_initiations(size, public_b), setup.xb.ip_b, PORT_B, rng),
        "d": lambda: capture_replays(setup, min(size, 1000), tmp),
        "e": lambda: attack.pool_dns(size, rng, LOCAL_NAME),
        "f": lambda: [b"-"],
    }
    return makers[kind]()


def applies(impl: str, flood: str) -> bool:
    return not (flood == "e" and impl == "wireguard-go")  # only fzpoll has a DNS stub


def run_cell(setup: Setup, flood: str, args, tmp: Path) -> dict:
    pid = setup.pid_b
    cell: dict = {"impl": setup.impl, "flood": flood, "since_setup_s": round(time.monotonic() - setup.started, 1)}
    flooders: list[subprocess.Popen] = []
    handshake_before = setup.latest_handshake_b()
    stats_before = fzpoll_stats(setup.b.socket_path)
    cell["busy_before_pct"] = wait_quiet(timeout=args.max_wait)
    if flood != "none":
        pool = make_pool(flood, setup, args.pool, tmp)
        cell["pool"] = len(pool)
        flooders = start_flooders(setup, flood, pool, args.attackers, args.seconds + 30, args.attack_pps, tmp)
        time.sleep(0.5)  # let the flood ramp up (and B go under load)
    try:
        reset_peak_rss(pid)
        foreign = ForeignCpu(setup.namespaces)
        backlog0 = softnet_dropped()
        snmp0, cpu0, t0 = udp_counters(setup.ns_b), proc_cpu_seconds(pid), time.monotonic()
        probe = start_dns_probe(setup.ns_b, SENTINEL, LOCAL_NAME, 20, args.seconds / 2) if flood == "e" else None
        cell.update(run_ping(setup.ns_a, int(args.seconds / 2 * 100), TUN_B))
        if probe is not None:
            cell["dns_probe"] = finish_dns_probe(probe)
        cell["tcp_mbps"] = run_iperf(setup.ns_a, setup.ns_b, args.seconds / 2, TUN_B)
        snmp1, cpu1, t1 = udp_counters(setup.ns_b), proc_cpu_seconds(pid), time.monotonic()
        cell["cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        cell["vmhwm_kib"] = proc_status_kib(pid, "VmHWM")
        for key, name in (("udp_in_pps", "InDatagrams"), ("rcvbuf_drop_pps", "RcvbufErrors"),
                          ("in_errors_pps", "InErrors")):
            cell[key] = (snmp1[name] - snmp0[name]) / (t1 - t0)
        cell["backlog_drop_pps"] = (softnet_dropped() - backlog0) / (t1 - t0)
        cell["foreign_cpu_pct"] = 100.0 * foreign.seconds() / (t1 - t0)
    finally:
        results = stop_flooders(flooders)
    sent = sum(r["sent"] for r in results)
    seconds = max((r["seconds"] for r in results), default=0.0)
    cell["attack_pps"] = sent / seconds if seconds else 0.0
    cell["attackers"] = len(results)
    time.sleep(1.0)  # let B drain its socket before the next cell
    cell["alive"] = setup.b.proc.poll() is None
    handshake_after = setup.latest_handshake_b() if cell["alive"] else -1
    # A new handshake is a lost session unless the old one was due for its rekey anyway.
    scheduled = time.time() - handshake_before >= REKEY_AFTER_TIME - 2
    cell["session_kept"] = handshake_after == handshake_before or (handshake_after > 0 and scheduled)
    cell["rekeyed"] = handshake_after != handshake_before
    cell.update(stats_delta(stats_before, fzpoll_stats(setup.b.socket_path)))
    return cell


def stats_delta(before: dict, after: dict) -> dict:
    """B's top drop reasons, kernel drops and DNS stub drops over the cell (fzpoll only)."""
    out: dict = {}
    drops = {k: v - _drops(before).get(k, 0) for k, v in _drops(after).items() if v - _drops(before).get(k, 0)}
    if drops:
        out["drops"] = dict(sorted(drops.items(), key=lambda kv: -kv[1])[:3])
    if isinstance(after.get("kernel"), dict):
        out["kernel_drops"] = after["kernel"]["drops"] - (before.get("kernel") or {}).get("drops", 0)
        out["filter"] = after["kernel"]["filter"]
    dns_before, dns_after = (s.get("dns", {}).get("drops", {}) for s in (before, after))
    dns = {k: v - dns_before.get(k, 0) for k, v in dns_after.items() if v - dns_before.get(k, 0)}
    if dns:
        out["dns_drops"] = dns
    limit_before, limit_after = (s.get("dns", {}).get("kernel") or {} for s in (before, after))
    if limit_after.get("rate"):
        out["dns_kernel_dropped"] = limit_after.get("dropped", 0) - limit_before.get("dropped", 0)
        out["dns_kernel_passed"] = limit_after.get("passed", 0) - limit_before.get("passed", 0)
    return out


# =============================================================================================
# Output


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _median(cells: list[dict], key: str):
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.median(values) if values else None


def print_table(cells: list[dict]) -> None:
    """One row per (flood, implementation): medians over the rounds."""
    print("| flood | impl | rounds | attack kpps | B UDP in kpps | B InErrors kpps | rcvbuf drop kpps "
          "| ping p50 ms | p99 ms | loss % | TCP Mbit/s | B CPU % | B VmHWM MiB | other CPU % |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["flood"], c["impl"]), []).append(c)
    for (flood, impl), group in groups.items():
        m = {k: _median(group, k) for k in ("attack_pps", "udp_in_pps", "in_errors_pps", "rcvbuf_drop_pps",
                                            "rtt_p50_ms", "rtt_p99_ms", "loss_pct", "tcp_mbps", "cpu_pct",
                                            "vmhwm_kib", "foreign_cpu_pct")}
        print(f"| {flood}: {FLOODS[flood]} | {impl} | {len(group)} | {m['attack_pps'] / 1e3:.0f} "
              f"| {m['udp_in_pps'] / 1e3:.1f} | {m['in_errors_pps'] / 1e3:.1f} | {m['rcvbuf_drop_pps'] / 1e3:.1f} "
              f"| {_f(m['rtt_p50_ms'], '.2f')} | {_f(m['rtt_p99_ms'], '.2f')} | {m['loss_pct']:.1f} "
              f"| {_f(m['tcp_mbps'], '.0f')} | {m['cpu_pct']:.0f} | {m['vmhwm_kib'] / 1024:.1f} "
              f"| {m['foreign_cpu_pct']:.0f} |")
    for c in cells:
        notes = []
        if c["flood"] != "none":
            notes.append(("session kept" + (" (rekeyed on schedule)" if c["rekeyed"] else "")
                          if c["session_kept"] else "SESSION LOST (unscheduled handshake, or B died)")
                         + f", {c['ping_received']}/{c['ping_sent']} pings answered")
        if "kernel_drops" in c:
            notes.append(f"kernel drops {c['kernel_drops']} (filter {c['filter']})")
        if c.get("drops"):
            notes.append("top drops " + ", ".join(f"{k} {v}" for k, v in c["drops"].items()))
        if c.get("dns_drops"):
            notes.append("DNS stub drops " + ", ".join(f"{k} {v}" for k, v in c["dns_drops"].items()))
        if c.get("dns_probe"):
            p = c["dns_probe"]
            notes.append(f"a legitimate client's queries for {LOCAL_NAME} during the ping: {p.get('answered')}/{p.get('sent')} "
                         f"answered (p50 {_f(p.get('p50_ms'), '.1f')} ms)")
        if c.get("dns_kernel_passed") is not None:
            notes.append(f"DNS kernel limit passed {c['dns_kernel_passed']}, dropped {c['dns_kernel_dropped']}")
        if notes:
            print(f"- {c['impl']}/{c['flood']}: " + "; ".join(notes))


# =============================================================================================
# Soak


def soak(args, tmp: Path) -> list[dict]:
    out = []
    for impl in args.impls:
        setup = Setup(impl, args.schedule, tmp)
        try:
            for flood in ("c", "a"):
                pool = make_pool(flood, setup, args.pool, tmp)
                flooders = start_flooders(setup, flood, pool, args.attackers, args.soak + 30, args.attack_pps, tmp)
                pinger = setup.ns_a.popen(["ping", "-n", "-q", "-i", "0.2", "-W", "1",
                                           "-c", str(int(args.soak * 5)), TUN_B],
                                          stdout=subprocess.PIPE, text=True)
                samples = []
                try:
                    end = time.monotonic() + args.soak
                    while time.monotonic() < end:
                        time.sleep(1.0)
                        samples.append(proc_status_kib(setup.pid_b, "VmRSS"))
                finally:
                    results = stop_flooders(flooders)
                    ping_out, _ = pinger.communicate(timeout=30)
                sent = sum(r["sent"] for r in results)
                secs = max(r["seconds"] for r in results) or 1.0
                m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
                row = {"impl": impl, "flood": flood, "seconds": args.soak,
                       "attack_kpps": sent / secs / 1e3, "rss_min_kib": min(samples),
                       "rss_max_kib": max(samples), "rss_first_kib": samples[0], "rss_last_kib": samples[-1],
                       "vmhwm_kib": proc_status_kib(setup.pid_b, "VmHWM"),
                       "ping": f"{m.group(2)}/{m.group(1)}" if m else "?",
                       "alive": setup.b.proc.poll() is None}
                out.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(1.0)
        finally:
            setup.close(args.keep_logs)
    print()
    print("| impl | flood | seconds | attack kpps | B VmRSS min MiB | max MiB | first | last | VmHWM MiB | ping replies |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in out:
        print(f"| {r['impl']} | {r['flood']}: {FLOODS[r['flood']]} | {r['seconds']:.0f} | {r['attack_kpps']:.0f} "
              f"| {r['rss_min_kib'] / 1024:.1f} | {r['rss_max_kib'] / 1024:.1f} | {r['rss_first_kib'] / 1024:.1f} "
              f"| {r['rss_last_kib'] / 1024:.1f} | {r['vmhwm_kib'] / 1024:.1f} | {r['ping']} |")
    return out


# =============================================================================================


def run_cells(args, tmp: Path, floods: list[str]) -> list[dict]:
    setups = [Setup(impl, args.schedule, tmp) for impl in args.impls]
    cells: list[dict] = []
    try:
        for _round in range(args.rounds):
            for flood in floods:
                for setup in setups:
                    if applies(setup.impl, flood):
                        cell = run_cell(setup, flood, args, tmp)
                        cells.append(cell)
                        print(json.dumps(cell), file=sys.stderr, flush=True)
    finally:
        for setup in setups:
            setup.close(args.keep_logs)
    return cells


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_capture"]:
        return capture_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each cell (half ping, half iperf3)")
    p.add_argument("--quick", action="store_true", help="4-second cells, smaller pools")
    p.add_argument("--soak", type=float, default=0.0, metavar="S",
                   help="instead: floods c and a for S seconds each, sampling B's RSS every second")
    p.add_argument("--attackers", type=int, default=2, help="attacker processes per flood (default 2)")
    p.add_argument("--attack-pps", type=float, default=0.0, help="cap on the total attack rate (0: none)")
    p.add_argument("--impls", default="fzpoll,wireguard-go", help="comma-separated: " + ", ".join(IMPL_ENV))
    p.add_argument("--max-wait", type=float, default=20.0,
                   help="seconds to wait before a cell for the host to be at most 40%% busy")
    p.add_argument("--schedule", default="fair", choices=["fair", "priority"], help="fzpoll's loop schedule")
    p.add_argument("--floods", default="a,b,c,d,e,f", help="comma-separated subset of " + ",".join(FLOODS))
    p.add_argument("--rounds", type=int, default=1, help="repeat every cell; the table shows medians")
    p.add_argument("--pool", type=int, default=4096, help="distinct datagrams per flood pool")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep-logs", metavar="DIR", help="save the daemons' logs there (level: $FLOOD_LOG_LEVEL, "
                   "default warning)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    if args.quick:
        args.seconds = min(args.seconds, 4.0)
        args.pool = min(args.pool, 1024)
    args.impls = [i for i in args.impls.split(",") if i]
    if "wireguard-go" in args.impls and not os.access(WG_GO_UPSTREAM, os.X_OK):
        p.error(f"no upstream wireguard-go at {WG_GO_UPSTREAM} (set $WG_GO_UPSTREAM)")
    floods = ["none"] + [f for f in args.floods.split(",") if f]
    import netns

    netns.cleanup_stale()
    with tempfile.TemporaryDirectory(prefix="fzflood-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        if args.soak:
            cells = soak(args, tmp)
        else:
            cells = run_cells(args, tmp, floods)
            print(f"\n{' '.join(['python3', 'tools/bench_flood.py', *argv])}  "
                  f"({os.cpu_count()} CPUs, {args.attackers} attacker process(es), {args.seconds:g} s cells, "
                  f"{args.rounds} round(s))\n")
            print_table(cells)
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
