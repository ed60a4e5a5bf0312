"""What tools/bench_flood.py measures around a flood: a process's CPU and memory, the host's
busy time and backlog drops, the CPU of processes outside the benchmark's namespaces (to recognise
a disturbed cell on a shared machine), a namespace's UDP counters, ping and iperf3 through the
tunnel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def softnet_dropped() -> int:
    """Packets the kernel dropped because a CPU's input backlog was full (all CPUs, host-wide:
    veth delivery goes through it, so an attacker can overrun it before any socket is reached)."""
    return sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())


class ForeignCpu:
    """CPU seconds used by processes outside our namespaces (other users of this machine), so a
    noisy cell can be recognised. Kernel threads count as foreign; our own tool does not."""

    def __init__(self, namespaces) -> None:
        self.mine = {os.stat(f"/run/netns/{ns.name}").st_ino for ns in namespaces}
        self.start = self._sample()

    def _sample(self) -> dict[int, float]:
        out = {}
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                if os.stat(f"/proc/{entry.name}/ns/net").st_ino in self.mine:
                    continue
                out[int(entry.name)] = proc_cpu_seconds(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return out

    def seconds(self) -> float:
        end = self._sample()
        return sum(t - self.start.get(pid, 0.0) for pid, t in end.items() if t >= self.start.get(pid, 0.0))


def host_busy(interval: float = 0.5) -> float:
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]), idle

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(max_busy: float = 40.0, timeout: float = 20.0) -> float:
    """Wait (up to ``timeout``) until the host is at most ``max_busy``% busy; the last reading."""
    end = time.monotonic() + timeout
    busy = host_busy()
    while busy > max_busy and time.monotonic() < end:
        busy = host_busy()
    return busy


def udp_counters(ns) -> dict[str, int]:
    lines = [line.split() for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def run_ping(ns, count: int, target: str) -> dict:
    out = ns.run(["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", target], check=False,
                 timeout=count * 0.05 + 20).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (count, 0)

    def quantile(q: float) -> float | None:
        return times[min(len(times) - 1, int(q * len(times)))] if times else None

    return {"ping_sent": sent, "ping_received": received,
            "loss_pct": 100.0 * (sent - received) / sent if sent else 100.0,
            "rtt_p50_ms": quantile(0.50), "rtt_p99_ms": quantile(0.99)}


def run_iperf(ns_a, ns_b, seconds: float, target: str) -> float | None:
    server = ns_b.popen(["iperf3", "-s", "-1", "-B", target], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    try:
        out = ns_a.run(["iperf3", "-c", target, "-t", str(max(1, round(seconds))), "-J",
                        "--connect-timeout", "2000"], check=False, timeout=seconds + 8).stdout
        result = json.loads(out or "{}")
        bps = result.get("end", {}).get("sum_received", {}).get("bits_per_second")
        return None if bps is None else bps / 1e6
    except (json.JSONDecodeError, AssertionError):
        return None
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)


# A legitimate client of the DNS stub during a query flood: ``count`` queries for ``name`` spread
# over ``seconds``, each from a fresh socket (as a stub resolver does), one try with a 0.5 s
# timeout; prints how many were answered (with the query's ID).
_DNS_PROBE = """
import json, random, socket, struct, sys, time
server, name, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
labels = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\\x00"
answered, latencies = 0, []
for i in range(count):
    started = time.monotonic()
    qid = random.getrandbits(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1), (server, 53))
            while True:
                data = s.recv(4096)
                if data[:2] == struct.pack(">H", qid):
                    answered += 1
                    latencies.append(time.monotonic() - started)
                    break
        except OSError:
            pass
    time.sleep(max(0.0, seconds / count - (time.monotonic() - started)))
print(json.dumps({"sent": count, "answered": answered,
                  "p50_ms": 1e3 * sorted(latencies)[len(latencies) // 2] if latencies else None}))
"""


def start_dns_probe(ns, server: str, name: str, count: int, seconds: float) -> subprocess.Popen:
    return ns.popen([sys.executable, "-c", _DNS_PROBE, server, name, str(count), str(seconds)],
                    stdout=subprocess.PIPE, text=True)


def finish_dns_probe(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=60)
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        return {}
