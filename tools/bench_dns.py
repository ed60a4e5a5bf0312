#!/usr/bin/env python3
"""DNS stub benchmark: queries/s through fzpoll's stub resolver, against dnsmasq alone.

Topology (two network namespaces, created and removed by this script; run as root), as in
tests/test_dns_netns.py::

    client ns: fzpoll up CONF (interface fzbXXXX)          peer ns: dnsmasq on 10.231.N.2:53
               DNS = 10.231.N.2 -> sentinel 100.100.111.1         (hosts file: www.upstream.test)
               [Resource] Name = *.corp.test
               load generator  ---- vethNa 10.231.N.1 ---- vethNb 10.231.N.2

The peer namespace runs no second fzpoll: a DNS answer never needs the resource's peer (the
[Peer] is configured, so proxy addresses are routed to it, but no packet is sent to it).

The load generator is this file run with ``--generate`` inside the client namespace: one
connected UDP socket, a fixed window of ``--window`` queries outstanding (distinct random IDs;
a new query is sent as soon as an answer comes back), each answer checked (ID outstanding,
question echoed, NOERROR, the expected A record), latency per query, a query unanswered after
``--timeout`` seconds counted lost (its ID is not reused for 10 s, so a late answer is never taken
for another query's). Scenarios, each ``--seconds`` long after a short warm-up (0.5 s; 0.2 s with
``--quick``), run in this order:

  local-fixed   A app.corp.test at the sentinel: a resource name answered by the stub itself
                (a proxy address from 100.96.0.0/11, the same one every time);
  recursive     A www.upstream.test at the sentinel: the stub remaps the ID and forwards to
                dnsmasq over the underlay, then maps the answer back (198.51.100.7 expected);
  dnsmasq       A www.upstream.test straight at dnsmasq's address (the baseline, no stub);
  local-new     A app<N>.corp.test, N new for every query: each one allocates a proxy address
                pair and routes it to the resource's peer (the stub's slow local path). Last,
                because the daemon keeps every name for good: the heap it leaves behind (and the
                longer garbage-collector passes) would weigh on any scenario measured after it.

Per scenario: queries/s (answers in the measured window / its length), p50/p99/mean latency,
lost (timeouts), late answers, wrong answers, error rcodes, and the CPU seconds (utime+stime from
/proc/PID/stat) of the fzpoll daemon, of dnsmasq and of the generator itself over the scenario;
the daemon's CPU per answered query; "other CPU": the machine's busy time (/proc/stat) less those
three, i.e. the kernel's softirq work for the packets plus any other job on the machine (a
figure well above a quiet run's means the run shared its CPUs); the stub's own counters (UAPI
``get=fzpoll``) over the scenario. Ratios: recursive, local-fixed and local-new over dnsmasq
queries/s, per generator.

With dnsperf (Debian package ``dnsperf``) the same four scenarios are also run with it (``-q``
window, one socket, one thread pair): a C load generator, as a cross-check of the Python one
(on 2 CPUs it is not faster: its sender and receiver threads compete with dnsmasq for them).
It does not check answers (only their rcodes) and reports the mean latency, not percentiles. ``--dnsperf auto`` (the default) uses it when
installed and, outside ``--quick``, installs it with apt-get when the package is available;
``--quick`` leaves it out unless ``--dnsperf on``.

    sudo python3 tools/bench_dns.py [--seconds 5] [--quick] [--window 200] [--timeout 1]
                                    [--dnsperf auto|on|off] [--json]

Exit status: 0 when every scenario got answers and no answer was wrong or an error, 1 otherwise,
3 when the machine cannot run it (not root, no dnsmasq, no /dev/net/tun: the reason is printed).
Only the namespaces created here receive traffic; every loop has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TOOL = Path(__file__).resolve()

QUERY_FLAGS_COUNTS = struct.pack(">HHHHH", 0x0100, 1, 0, 0, 0)  # RD, one question
ID_QUARANTINE = 10.0  # seconds before the ID of a lost query is used again
UPSTREAM_NAME = "www.upstream.test"
UPSTREAM_A = "198.51.100.7"
FIXED_NAME = "app.corp.test"
NEW_NAME = "app{}.corp.test"
PROXY_NET = "100.96.0.0/11"
SENTINEL = "100.100.111.1"  # the first sentinel: the stub stands for the first DNS server there

# ---------------------------------------------------------------------------------------------
# The load generator (runs inside the client namespace; standard library only)


def question(name: str, qtype: int = 1) -> bytes:
    """The question section for ``name`` (class IN)."""
    labels = name.rstrip(".").encode("ascii").split(b".")
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0" + struct.pack(">HH", qtype, 1)


def _net(cidr: str) -> tuple[int, int]:
    base, bits = cidr.split("/")
    mask = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
    return int.from_bytes(socket.inet_aton(base), "big") & mask, mask


def parse_answer(data: bytes, q: bytes) -> tuple[str, list[bytes]]:
    """("ok", A records) for a NOERROR answer to question ``q``; else ("malformed" | "mismatch" |
    "rcode<N>", [])."""
    if len(data) < 12:
        return "malformed", []
    flags = (data[2] << 8) | data[3]
    if not flags & 0x8000 or (flags >> 11) & 0xF:
        return "malformed", []
    qdcount, ancount = struct.unpack_from(">HH", data, 4)
    if qdcount != 1 or data[12:12 + len(q)].lower() != q.lower():
        return "mismatch", []
    if flags & 0xF:
        return f"rcode{flags & 0xF}", []
    pos, end, addrs = 12 + len(q), len(data), []
    for _ in range(ancount):
        while True:  # the owner name: labels, then a root or a compression pointer
            if pos >= end:
                return "malformed", []
            length = data[pos]
            if length >= 0xC0:
                pos += 2
                break
            pos += 1 + length
            if length == 0:
                break
        if pos + 10 > end:
            return "malformed", []
        rtype, rclass, _ttl, rdlen = struct.unpack_from(">HHIH", data, pos)
        pos += 10
        if pos + rdlen > end:
            return "malformed", []
        if rtype == 1 and rclass == 1 and rdlen == 4:
            addrs.append(bytes(data[pos:pos + 4]))
        else:
            return "unexpected_record", []
        pos += rdlen
    return "ok", addrs


class Checker:
    """Judges answers for one scenario: ``exact`` (these addresses), ``stable`` (one address in
    ``net``, the same every time) or ``unique`` (one address in ``net``, never seen before)."""

    def __init__(self, expect: dict[str, Any]) -> None:
        self.kind = expect["kind"]
        self.exact = sorted(socket.inet_aton(a) for a in expect.get("a", []))
        self.net = _net(expect.get("net", "0.0.0.0/0"))
        self.seen: set[bytes] = set()
        self.reference: bytes | None = None
        self.good_tails: set[bytes] = set()  # answers (after the ID) already judged right
        self.reasons: dict[str, int] = {}

    def _in_net(self, addr: bytes) -> bool:
        return int.from_bytes(addr, "big") & self.net[1] == self.net[0]

    def judge(self, data: bytes, q: bytes) -> str:
        """"ok", "error" (a non-NOERROR rcode) or "wrong"."""
        tail = data[2:]
        if tail in self.good_tails:
            return "ok"
        verdict, addrs = parse_answer(data, q)
        if verdict.startswith("rcode"):
            self.reasons[verdict] = self.reasons.get(verdict, 0) + 1
            return "error"
        if verdict == "ok":
            if self.kind == "exact":
                verdict = "ok" if sorted(addrs) == self.exact else "wrong_address"
            elif len(addrs) != 1 or not self._in_net(addrs[0]):
                verdict = "wrong_address"
            elif self.kind == "stable":
                if self.reference is None:
                    self.reference = addrs[0]
                verdict = "ok" if addrs[0] == self.reference else "address_changed"
            else:  # unique
                verdict = "address_reused" if addrs[0] in self.seen else "ok"
                self.seen.add(addrs[0])
        if verdict == "ok":
            if self.kind != "unique" and len(self.good_tails) < 4096:
                self.good_tails.add(bytes(tail))
            return "ok"
        self.reasons[verdict] = self.reasons.get(verdict, 0) + 1
        return "wrong"


def _percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(p / 100.0 * len(ordered)))]


def _open_socket(spec: dict[str, Any]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt_force, opt in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                           (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt_force or opt, 4 << 20)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    sock.connect((spec["server"], spec.get("port", 53)))
    sock.setblocking(False)
    return sock


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Send one query every 0.1 s until a right answer comes back or ``probe`` seconds pass."""
    import select

    sock = _open_socket(spec)
    checker = Checker(spec["expect"])
    q = question(spec["name"].format(0) if spec["mode"] == "unique" else spec["name"])
    deadline = time.monotonic() + spec["probe"]
    tries = 0
    while time.monotonic() < deadline:
        qid = random.getrandbits(16)
        tries += 1
        try:
            sock.send(qid.to_bytes(2, "big") + QUERY_FLAGS_COUNTS + q)
        except OSError:
            pass
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        stop = min(deadline, time.monotonic() + 0.1)
        while time.monotonic() < stop:
            if not poll.poll(max(1, int((stop - time.monotonic()) * 1000))):
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                continue
            if data[:2] == qid.to_bytes(2, "big"):
                verdict = checker.judge(data, q)
                return {"ready": verdict == "ok", "verdict": verdict, "tries": tries}
    return {"ready": False, "verdict": "timeout", "tries": tries}


def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load: ``window`` queries outstanding for ``warmup`` + ``seconds`` seconds."""
    import select

    if spec.get("probe"):
        return probe(spec)
    window, timeout = int(spec["window"]), float(spec["timeout"])
    unique = spec["mode"] == "unique"
    template = spec["name"]
    fixed_q = None if unique else question(template)
    next_name = int(spec.get("first", 0))
    checker = Checker(spec["expect"])
    sock = _open_socket(spec)
    send, recv = sock.send, sock.recv
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    rng = random.Random()
    ids = deque(rng.sample(range(65536), 65536))
    quarantine: deque[tuple[float, int]] = deque()
    outstanding: OrderedDict[int, tuple[float, bytes]] = OrderedDict()
    header = QUERY_FLAGS_COUNTS
    sent = lost = late = wrong = errors = verified = send_errors = recv_errors = 0
    answered = 0
    latencies: list[float] = []
    cpu0 = os.times()
    t0 = time.monotonic()
    t_measure = t0 + float(spec["warmup"])
    t_end = t_measure + float(spec["seconds"])
    measuring = False
    window_start = window_stop = t_measure
    draining = False
    hard_stop = t_end + timeout + 0.5
    while True:
        now = time.monotonic()
        if not measuring and not draining and now >= t_measure:
            measuring, answered, latencies, window_start = True, 0, [], now
        if measuring and now >= t_end:
            measuring, draining, window_stop = False, True, now
        if draining and (not outstanding or now >= hard_stop):
            break
        # expire: the front of the (send-ordered) table is the oldest query
        limit = now - timeout
        while outstanding:
            qid, (t_sent, _q) = next(iter(outstanding.items()))
            if t_sent > limit:
                break
            del outstanding[qid]
            lost += 1
            quarantine.append((now + ID_QUARANTINE, qid))
        while quarantine and quarantine[0][0] <= now:
            ids.append(quarantine.popleft()[1])
        # send up to the window
        blocked = False
        while not draining and len(outstanding) < window and ids:
            qid = ids.popleft()
            if unique:
                q = question(template.format(next_name))
                next_name += 1
            else:
                q = fixed_q
            try:
                send(qid.to_bytes(2, "big") + header + q)
            except BlockingIOError:
                ids.appendleft(qid)
                blocked = True
                break
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                send_errors += 1
                ids.append(qid)
                blocked = True
                break
            outstanding[qid] = (now, q)
            sent += 1
        poll.poll(1 if blocked else 5)
        now = time.monotonic()
        for _ in range(1024):
            try:
                data = recv(4096)
            except BlockingIOError:
                break
            except OSError:
                recv_errors += 1
                continue
            if len(data) < 2:
                wrong += 1
                continue
            qid = (data[0] << 8) | data[1]
            entry = outstanding.pop(qid, None)
            if entry is None:
                late += 1
                continue
            ids.append(qid)
            verified += 1
            verdict = checker.judge(data, entry[1])
            if verdict == "wrong":
                wrong += 1
            elif verdict == "error":
                errors += 1
            if measuring:
                answered += 1
                latencies.append(now - entry[0])
    lost += len(outstanding)
    cpu1 = os.times()
    elapsed = max(window_stop - window_start, 1e-9)
    latencies.sort()
    result = {
        "qps": answered / elapsed,
        "answered": answered,
        "measured_seconds": elapsed,
        "sent": sent,
        "verified": verified,
        "lost": lost,
        "late": late,
        "wrong": wrong,
        "errors": errors,
        "reasons": checker.reasons,
        "send_errors": send_errors,
        "recv_errors": recv_errors,
        "p50_ms": _percentile(latencies, 50) * 1e3,
        "p99_ms": _percentile(latencies, 99) * 1e3,
        "mean_ms": (sum(latencies) / len(latencies) * 1e3) if latencies else 0.0,
        "max_ms": (latencies[-1] * 1e3) if latencies else 0.0,
        "generator_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 3),
        "wall_s": time.monotonic() - t0,
    }
    if checker.kind == "stable" and checker.reference is not None:
        result["address"] = socket.inet_ntoa(checker.reference)
    if checker.kind == "unique":
        result["distinct_addresses"] = len(checker.seen)
    return result


# ---------------------------------------------------------------------------------------------
# The orchestrator (host side, root)


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of ``pid`` in seconds (None if unknown or gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; /proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else round(after - before, 3)


def need() -> str | None:
    """Why this machine cannot run the benchmark (None if it can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, a TUN device)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for command, package in (("ip", "iproute2"), ("dnsmasq", "dnsmasq-base")):
        if shutil.which(command) is None:
            return f"needs {command} (Debian package {package}; bash tools/install-deps.sh installs it)"
    return None


def dnsperf_version(path: str) -> str:
    try:
        out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "dnsperf"
    m = re.search(r"Version (\S+)", out.stdout + out.stderr)
    return f"dnsperf {m.group(1)}" if m else "dnsperf"


def ensure_dnsperf(mode: str, quick: bool) -> tuple[str | None, str]:
    """(path of dnsperf or None, a note saying why). ``auto`` installs it with apt-get outside
    --quick when Debian has the package; ``on`` requires it; ``off`` never uses it."""
    if mode == "off" or (mode == "auto" and quick):
        return None, "no dnsperf rows (" + ("--quick" if mode == "auto" else "--dnsperf off") + ")"
    path = shutil.which("dnsperf")
    if path:
        return path, f"dnsperf rows: {dnsperf_version(path)}"
    if shutil.which("apt-get") is None:
        return None, "dnsperf not installed and no apt-get"
    try:
        policy = subprocess.run(["apt-cache", "policy", "dnsperf"], capture_output=True, text=True, timeout=30)
        candidate = re.search(r"Candidate:\s*(\S+)", policy.stdout)
        if not candidate or candidate.group(1) == "(none)":
            return None, "dnsperf: no Debian package candidate (apt-get update first?)"
        print(f"installing dnsperf {candidate.group(1)} with apt-get ...", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "dnsperf"],
                              capture_output=True, text=True, timeout=300, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"dnsperf install failed: {exc}"
    path = shutil.which("dnsperf")
    if path:
        return path, f"dnsperf rows: {dnsperf_version(path)}, installed by this run (apt-get)"
    return None, "dnsperf install failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]


def parse_dnsperf(text: str) -> dict[str, Any]:
    """The figures of dnsperf's "Statistics:" block."""
    def num(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    codes = dict((code, int(n)) for code, n in re.findall(r"([A-Z]+) (\d+) \(", text.split("Response codes:", 1)[-1].split("\n", 1)[0]))
    completed = num(r"Queries completed:\s+(\d+)")
    return {
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "answered": int(completed) if completed is not None else None,
        "sent": int(num(r"Queries sent:\s+(\d+)") or 0),
        "lost": int(num(r"Queries lost:\s+(\d+)") or 0),
        "mean_ms": (num(r"Average Latency \(s\):\s+([\d.]+)") or 0.0) * 1e3,
        "max_ms": (num(r"Average Latency \(s\):.*max ([\d.]+)") or 0.0) * 1e3,
        "stddev_ms": (num(r"Latency StdDev \(s\):\s+([\d.]+)") or 0.0) * 1e3,
        "rcodes": codes,
        "errors": sum(n for code, n in codes.items() if code != "NOERROR"),
        "measured_seconds": num(r"Run time \(s\):\s+([\d.]+)"),
    }


class Bench:
    """The namespaces, dnsmasq and the fzpoll daemon; :meth:`run` measures one scenario."""

    def __init__(self, netns: Any, tmp: Path, client: Any, peer_ns: Any) -> None:
        self.netns, self.tmp, self.client, self.peer_ns = netns, tmp, client, peer_ns
        self.ifname = f"fzb{os.getpid() % 0xFFFF:04x}{random.getrandbits(8):02x}"[:15]
        self.daemon_pid: int | None = None
        self.dnsmasq_pid: int | None = None
        self.next_name = 0

    def start(self) -> None:
        from fzpoll.wireguard.keys import PrivateKey

        pair = self.netns.veth_pair(self.client, self.peer_ns)
        self.upstream = pair.ip_b
        hosts = self.tmp / "hosts"
        hosts.write_text(f"{UPSTREAM_A} {UPSTREAM_NAME}\n2001:db8::7 {UPSTREAM_NAME}\n")
        hosts.chmod(0o644)
        dnsmasq = self.peer_ns.popen(
            ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
             f"--addn-hosts={hosts}", f"--listen-address={pair.ip_b}", "--bind-interfaces",
             "--port=53", "--pid-file="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.dnsmasq_pid = dnsmasq.pid  # `ip netns exec` execs the command: same process
        key_c, key_p = PrivateKey.generate(os.urandom), PrivateKey.generate(os.urandom)
        conf = self.tmp / f"{self.ifname}.conf"
        conf.write_text(
            "[Interface]\n"
            f"PrivateKey = {key_c.base64()}\nListenPort = 51820\nAddress = 100.64.9.1/32\n"
            f"DNS = {pair.ip_b}\n"
            "\n[Peer]\n"
            f"PublicKey = {key_p.public_key.base64()}\nEndpoint = {pair.ip_b}:51821\n"
            "AllowedIPs = 100.64.9.2/32\n"
            "\n[Resource]\n"
            f"Name = *.corp.test\nPeer = {key_p.public_key.base64()}\n"
        )
        conf.chmod(0o600)
        self.log_path = self.tmp / "daemon.log"
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
        self.daemon = self.client.popen([sys.executable, "-m", "fzpoll", "up", str(conf), "--log-level", "info"],
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.daemon_pid = self.daemon.pid
        deadline = time.monotonic() + 15
        while self.ifname not in self.client.ip("link", "show", check=False).stdout or \
                not list(self.client.ip_json("route", "show", SENTINEL)):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fzpoll did not come up: {self.log_tail(3000)}")
            time.sleep(0.05)
        stats = self.stats()
        if stats and isinstance(stats.get("daemon", {}).get("pid"), int):
            self.daemon_pid = stats["daemon"]["pid"]
        for name, spec in (("dnsmasq", self.spec("dnsmasq")), ("stub", self.spec("recursive"))):
            result = self.generator(dict(spec, probe=10.0), timeout=20)
            if not result.get("ready"):
                raise RuntimeError(f"{name} does not answer {UPSTREAM_NAME}: {result} {self.log_tail(3000)}")

    def log_tail(self, size: int = 20000) -> str:
        """The end of the daemon's log, from a line start."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if len(text) <= size else text[-size:].split("\n", 1)[-1]

    def close(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()

    def stats(self) -> dict[str, Any] | None:
        """The daemon's ``get=fzpoll`` counters (None if it cannot be asked)."""
        from fzpoll.show import QueryError, parse_stats, query
        from fzpoll.uapi.protocol import SOCKET_DIR, STATS_REQUEST

        try:
            return parse_stats(query(os.path.join(SOCKET_DIR, f"{self.ifname}.sock"), STATS_REQUEST)[0])
        except QueryError:
            return None

    def spec(self, scenario: str) -> dict[str, Any]:
        if scenario == "local-fixed":
            return {"server": SENTINEL, "mode": "fixed", "name": FIXED_NAME,
                    "expect": {"kind": "stable", "net": PROXY_NET}}
        if scenario == "local-new":
            return {"server": SENTINEL, "mode": "unique", "name": NEW_NAME, "first": self.next_name,
                    "expect": {"kind": "unique", "net": PROXY_NET}}
        server = SENTINEL if scenario == "recursive" else self.upstream
        return {"server": server, "mode": "fixed", "name": UPSTREAM_NAME,
                "expect": {"kind": "exact", "a": [UPSTREAM_A]}}

    def generator(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self.client.run([sys.executable, str(TOOL), "--generate", json.dumps(spec)], check=False,
                               timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(proc.stdout)

    def _dns_counters(self) -> dict[str, int]:
        stats = self.stats() or {}
        dns = stats.get("dns") or {}
        counters = dict(dns.get("stats") or {})
        counters.update({f"drop:{k}": v for k, v in (dns.get("drops") or {}).items()})
        counters.update({f"engine_drop:{k}": v for k, v in (stats.get("drops") or {}).items()})
        return counters

    def run(self, scenario: str, seconds: float, warmup: float, window: int, timeout: float,
            dnsperf: str | None = None) -> dict[str, Any]:
        spec = dict(self.spec(scenario), seconds=seconds, warmup=warmup, window=window, timeout=timeout)
        counters0 = self._dns_counters()
        daemon0, dnsmasq0 = cpu_seconds(self.daemon_pid), cpu_seconds(self.dnsmasq_pid)
        host0 = host_busy_seconds()
        if dnsperf is None:
            result = self.generator(spec, timeout=warmup + seconds + timeout + 30)
            if scenario == "local-new":
                self.next_name += result["sent"] + 1
            result["engine"] = "python"
        else:
            result = self.run_dnsperf(dnsperf, scenario, spec)
        daemon1, dnsmasq1 = cpu_seconds(self.daemon_pid), cpu_seconds(self.dnsmasq_pid)
        host1 = host_busy_seconds()
        counters1 = self._dns_counters()
        result.update(scenario=scenario, server=spec["server"], window=window,
                      daemon_cpu_s=_delta(daemon1, daemon0),
                      dnsmasq_cpu_s=_delta(dnsmasq1, dnsmasq0),
                      stub_counters={k: v - counters0.get(k, 0) for k, v in counters1.items()
                                     if v - counters0.get(k, 0)})
        # Everything else the machine did meanwhile: the kernel's softirq work for these packets,
        # dnsperf, Python start-up of the generator, and any other job sharing the machine.
        known = sum(x for x in (result["daemon_cpu_s"], result["dnsmasq_cpu_s"], result.get("generator_cpu_s"))
                    if x is not None)
        result["host_busy_s"] = round(host1 - host0, 3)
        result["other_cpu_s"] = round(host1 - host0 - known, 3)
        answered = result.get("answered") or 0
        if result["daemon_cpu_s"] is not None and answered and scenario != "dnsmasq":
            result["daemon_cpu_us_per_query"] = result["daemon_cpu_s"] / answered * 1e6
        return result

    def run_dnsperf(self, path: str, scenario: str, spec: dict[str, Any]) -> dict[str, Any]:
        data = self.tmp / f"dnsperf-{scenario}.txt"
        if spec["mode"] == "unique":
            count = int(min(1_000_000, max(20_000, 60_000 * (spec["seconds"] + spec["warmup"]))))
            first = self.next_name
            data.write_text("".join(f"{NEW_NAME.format(first + i)} A\n" for i in range(count)))
            self.next_name += count
        else:
            data.write_text(f"{spec['name']} A\n")
        seconds = spec["seconds"] + spec["warmup"]  # dnsperf has no warm-up: it measures it all
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = self.client.run([path, "-s", spec["server"], "-d", str(data), "-l", f"{seconds:g}",
                                "-q", str(spec["window"]), "-t", f"{spec['timeout']:g}", "-c", "1", "-T", "1"],
                               check=False, timeout=seconds + spec["timeout"] + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"dnsperf failed ({proc.returncode}): {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # `ip netns exec` execs dnsperf: one child
        result = parse_dnsperf(proc.stdout)
        result.update(engine="dnsperf", wrong=None, late=None,
                      generator_cpu_s=round(usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime, 3))
        return result


SCENARIOS = ("local-fixed", "recursive", "dnsmasq", "local-new")  # the order they run in
LABELS = {
    "local-fixed": f"local, fixed name ({FIXED_NAME})",
    "local-new": "local, new name each (appN.corp.test)",
    "recursive": f"recursive via stub ({UPSTREAM_NAME})",
    "dnsmasq": "dnsmasq direct, no stub (baseline)",
}


def machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    dnsmasq_version = ""
    try:
        out = subprocess.run(["dnsmasq", "--version"], capture_output=True, text=True, timeout=5).stdout
        dnsmasq_version = out.split("\n", 1)[0].replace("Dnsmasq version ", "").split()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "dnsmasq": dnsmasq_version, "loadavg_1m": load,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    import netns  # noqa: E402  (tests/netns.py: uniquely named namespaces, always torn down)

    netns.cleanup_stale()
    host = machine()  # before the run: its load average says what else was running
    dnsperf, dnsperf_note = ensure_dnsperf(args.dnsperf, args.quick)
    if args.dnsperf == "on" and dnsperf is None:
        raise RuntimeError(f"--dnsperf on: {dnsperf_note}")
    wall0 = time.monotonic()
    rows: list[dict[str, Any]] = []
    final_stats: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fzbench-dns-") as tmpdir, \
            netns.Namespace("c") as client, netns.Namespace("p") as peer_ns:
        tmp = Path(tmpdir)
        tmp.chmod(0o755)  # dnsmasq reads the hosts file
        bench = Bench(netns, tmp, client, peer_ns)
        try:
            bench.start()
            setup_s = time.monotonic() - wall0
            # local-new last: the names it adds stay in the daemon for good (more memory, longer
            # garbage-collector passes), which would weigh on every scenario measured after it.
            for scenario in SCENARIOS:
                for engine in ("python", "dnsperf") if dnsperf else ("python",):
                    rows.append(bench.run(scenario, args.seconds, args.warmup, args.window, args.timeout,
                                          dnsperf=dnsperf if engine == "dnsperf" else None))
            final_stats = bench.stats()
            daemon_alive = bench.daemon.poll() is None
        finally:
            bench.close()
        log_tail = bench.log_tail()
    by = {(r["engine"], r["scenario"]): r for r in rows}
    ratios: dict[str, Any] = {}
    for engine in ("python", "dnsperf"):
        base = by.get((engine, "dnsmasq"), {}).get("qps")
        for scenario in ("recursive", "local-fixed", "local-new"):
            rate = by.get((engine, scenario), {}).get("qps")
            if base and rate is not None:
                ratios[f"{engine}:{scenario}/dnsmasq"] = rate / base
    python_rows = [r for r in rows if r["engine"] == "python"]
    ok = (daemon_alive and all(r["answered"] and r["qps"] > 0 for r in rows)
          and all(r["wrong"] == 0 and r["errors"] == 0 for r in python_rows)
          and all(r["errors"] == 0 for r in rows))
    warnings = []
    for line in log_tail.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"severity": "error", "message": line}  # not a log line: a traceback, say
        if isinstance(entry, dict) and entry.get("severity") in ("warning", "error", "critical"):
            warnings.append(f"{entry.get('severity')}: {entry.get('message')}")
    return {
        "ok": ok,
        "seconds": args.seconds, "warmup": args.warmup, "window": args.window, "timeout": args.timeout,
        "quick": args.quick, "dnsperf": dnsperf_note,
        "machine": host,
        "scenarios": rows,
        "ratios": ratios,
        "wrong_total": sum(r["wrong"] for r in python_rows),
        "errors_total": sum(r["errors"] or 0 for r in rows),
        "daemon_alive": daemon_alive,
        "daemon_dns_stats_final": (final_stats or {}).get("dns"),
        "daemon_log_warnings": warnings[-10:],
        "setup_s": setup_s,
        "wall_s": time.monotonic() - wall0,
    }


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"fzpoll DNS stub, {r['seconds']:g} s per scenario after {r['warmup']:g} s warm-up, "
        f"window {r['window']} queries outstanding, loss timeout {r['timeout']:g} s; "
        f"{m['nproc']} CPUs, kernel {m['kernel']}, Python {m['python']}, dnsmasq {m['dnsmasq']}, "
        f"{m['date']}, load average {_fmt(m['loadavg_1m'], '.2f')} at the start",
        "",
        f"{'scenario':<40} {'gen':<7} {'queries/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'lost':>6} "
        f"{'wrong':>5} {'err':>4} {'fzpoll CPU s':>12} {'us/query':>8} {'dnsmasq CPU s':>13} {'gen CPU s':>9} "
        f"{'other CPU s':>11}",
        "-" * 154,
    ]
    for row in r["scenarios"]:
        p50 = row.get("p50_ms") if row["engine"] == "python" else row.get("mean_ms")
        p99 = row.get("p99_ms")
        lines.append(
            f"{LABELS[row['scenario']]:<40} {row['engine']:<7} {_fmt(row['qps'], ',.0f'):>10} "
            f"{_fmt(p50, '.2f') + ('*' if row['engine'] != 'python' else ''):>7} {_fmt(p99, '.2f'):>7} "
            f"{row['lost']:>6} {_fmt(row.get('wrong'), 'd'):>5} {_fmt(row.get('errors'), 'd'):>4} "
            f"{_fmt(row['daemon_cpu_s'], '.2f'):>12} {_fmt(row.get('daemon_cpu_us_per_query'), '.1f'):>8} "
            f"{_fmt(row['dnsmasq_cpu_s'], '.2f'):>13} {_fmt(row.get('generator_cpu_s'), '.2f'):>9} "
            f"{_fmt(row.get('other_cpu_s'), '.2f'):>11}")
    lines.append("")
    for key, value in r["ratios"].items():
        engine, what = key.split(":", 1)
        lines.append(f"ratio {what:<28} {value:6.3f}   ({engine} generator)")
    lines.append("")
    if any(row["engine"] != "python" for row in r["scenarios"]):
        lines.append("* dnsperf reports the mean latency, not p50, and no p99; it does not check answers.")
    lines.append(f"checked: {sum(row.get('verified', 0) for row in r['scenarios'])} answers verified, "
                 f"{r['wrong_total']} wrong, {r['errors_total']} error rcodes; {r['dnsperf']}; "
                 f"setup {r['setup_s']:.1f} s, wall {r['wall_s']:.1f} s"
                 + ("" if r["ok"] else "  ** FAILED **"))
    if r["daemon_log_warnings"]:
        lines.append("daemon warnings: " + " | ".join(r["daemon_log_warnings"][-3:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per scenario (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 s per scenario, no dnsperf: under ~15 s in all")
    parser.add_argument("--window", type=int, default=200, help="queries outstanding (default 200; 1 = unloaded latency)")
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds before a query counts as lost (default 1)")
    parser.add_argument("--dnsperf", choices=["auto", "on", "off"], default="auto",
                        help="also run the scenarios with dnsperf (auto: if installed or installable; not with --quick)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--generate", metavar="SPEC", help=argparse.SUPPRESS)  # internal: the load generator
    args = parser.parse_args(argv)
    if args.generate:
        print(json.dumps(generate(json.loads(args.generate))))
        return 0
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 5.0
    args.warmup = 0.2 if args.quick else 0.5
    if not args.seconds > 0 or not 1 <= args.window <= 1000 or not args.timeout > 0:
        parser.error("--seconds and --timeout must be > 0, --window 1..1000")
    reason = need()
    if reason:
        print(f"bench_dns: {reason}", file=sys.stderr)
        return 3
    try:
        r = measure(args)
    except RuntimeError as exc:
        print(f"bench_dns: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=1) if args.json else table(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
