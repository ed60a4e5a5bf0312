#!/usr/bin/env python3
"""Flood benchmark: what an attacker flooding daemon B's UDP port does to a working tunnel A <-> B.

Topology (three network namespaces, created and removed by this script; run as root)::

    A  vethNa 10.231.N.1 ---- vethNb 10.231.N.2  B  vethMb 10.231.M.2 ---- vethMa 10.231.M.1  X
    A  fzpoll 100.64.0.1  <== tunnel ==>  fzpoll 100.64.0.2  (UDP 51821)          attacker

A runs ``fzpoll --schedule fair``; B runs ``--schedule fair`` and then ``--schedule priority``
(Firezone's old strict-priority loop: flush, UDP, TUN, auxiliary, timers). X sends to B's UDP port
as fast as it can, with ``sendmmsg`` (256 datagrams per system call through ctypes, from a pool
prepared beforehand) in ``--attackers`` processes, in turn:

  none  no flood (the baseline row);
  a     random junk: random bytes, 1..256 of them (mostly wrong type / reserved bytes);
  b     well-formed transport headers (type 4) with random receiver indices, 64..256 bytes;
  c     handshake initiations with a valid MAC1 from an attacker key B does not know, built with
        fzpoll's own handshake code (a pool of distinct ones, each with a fresh ephemeral and
        sender index): B must check MAC1, count the load, and under load answer with cookie
        replies instead of doing Diffie-Hellman;
  d     replays of real B-bound transport datagrams of the current session, captured just before
        with an AF_PACKET socket on B's A-facing veth while A pings B (ping traffic, so every
        captured frame is a single datagram, not a GSO batch). B must reject them as replays.

During each flood, through the tunnel from A: ``ping -i 0.01`` (RTT p50/p99 and loss) for half
the cell, then ``iperf3 -c`` (TCP A->B) for the other half. Daemon B's CPU (utime+stime from
/proc/PID/stat over the cell, in % of one core) and peak RSS (VmHWM from /proc/PID/status, reset
at the start of each cell by writing 5 to /proc/PID/clear_refs). Also B's kernel UDP counters
(/proc/net/snmp in B's namespace: datagrams delivered to the socket, receive-buffer drops), the
host's input-backlog drops (/proc/net/softnet_stat), B's top drop reasons (fzpoll's own
``get=fzpoll`` UAPI request, when the daemon answers it) and, for flood c, the cookie replies the
attacker received and whether they decrypt (XChaCha20-Poly1305 under HASH("cookie--" || B's public
key), with the triggering MAC1 as additional data), and whether A's session survived (no new
handshake on B other than the scheduled rekey, and how many pings were answered).

The machine may be shared: before each cell the script waits (up to 20 s) for the host to be at
most 40% busy, and the "other CPU %" column is the CPU that processes outside these namespaces
used during the cell (in % of one core): a cell with a large value was disturbed.

``--soak S`` instead runs floods c and a for S seconds each and samples B's VmRSS every second
(with a 5/s ping through the tunnel), reporting min/max: memory must stay flat under a long flood.

    sudo python3 tools/bench_flood.py [--seconds 10] [--quick] [--attackers 1] [--attack-pps 0]
                                      [--schedules fair,priority] [--floods a,b,c,d] [--json FILE]
                                      [--keep-logs DIR]   (daemon log level: $FLOOD_LOG_LEVEL)
    sudo python3 tools/bench_flood.py --soak 60

Only the namespaces created here receive traffic; every flood stops after its cell (SIGTERM, and
each flooder has a hard deadline of its own).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fzpoll.wireguard.constants import REKEY_AFTER_TIME  # noqa: E402  (the initiator rekeys a session this old)

PORT_A, PORT_B = 51820, 51821
TUN_A, TUN_B = "100.64.0.1", "100.64.0.2"
VLEN = 256  # datagrams per sendmmsg
FLOODS = {
    "none": "no flood",
    "a": "random junk",
    "b": "transport, unknown index",
    "c": "initiations, valid MAC1",
    "d": "replayed transport",
}

# =============================================================================================
# Inside the attacker's namespace: the flooder (``bench_flood.py _flood ...``)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def write_pool(path: str, messages: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(messages)))
        for m in messages:
            f.write(struct.pack("<H", len(m)) + m)


def read_pool(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    (count,) = struct.unpack_from("<I", data)
    out, pos = [], 4
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, pos)
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def _batches(messages: list[bytes]):
    """sendmmsg arrays of VLEN messages each, covering the whole pool (wrapped around to fill the
    last one); the buffers are kept referenced with them."""
    while len(messages) < VLEN:
        messages = messages * 2
    messages = messages + messages[:-len(messages) % VLEN]
    batches = []
    for start in range(0, len(messages) - VLEN + 1, VLEN):
        chunk = messages[start:start + VLEN]
        bufs = [ctypes.create_string_buffer(m, len(m)) for m in chunk]
        iovs = (_IoVec * VLEN)(*[_IoVec(ctypes.cast(b, ctypes.c_void_p), len(m)) for b, m in zip(bufs, chunk)])
        msgs = (_MMsgHdr * VLEN)()
        for i in range(VLEN):
            msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
            msgs[i].msg_hdr.msg_iovlen = 1
        batches.append((msgs, iovs, bufs))
    return batches


def flood_main(argv: list[str]) -> int:
    pool_path, host, port, max_seconds, pps_limit, cookie_key_hex = argv
    messages = read_pool(pool_path)
    mac1_by_sender = {m[4:8]: m[116:132] for m in messages if len(m) == 148 and m[0] == 1}
    cookie_key = bytes.fromhex(cookie_key_hex) if cookie_key_hex != "-" else b""  # HASH("cookie--" || B)
    if cookie_key:
        from fzpoll.wireguard.crypto import xaead_decrypt
    libc = ctypes.CDLL(None, use_errno=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, int(port)))
    fd = sock.fileno()
    batches = _batches(messages)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sent = send_errors = replies = valid = checked = 0
    limit = float(pps_limit)
    start = time.monotonic()
    deadline = start + float(max_seconds)
    while not stop:
        for msgs, _, _ in batches:
            n = libc.sendmmsg(fd, msgs, VLEN, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR, errno.ECONNREFUSED):
                    raise OSError(err, os.strerror(err))
                send_errors += 1
            else:
                sent += n
            if stop:
                break
        now = time.monotonic()
        if now >= deadline:
            break
        if cookie_key:  # drain B's answers: cookie replies prove B is under load (MAC2 required)
            for _ in range(4096):
                try:
                    reply = sock.recv(2048, socket.MSG_DONTWAIT)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(reply) == 64 and reply[0] == 3:
                    replies += 1
                    mac1 = mac1_by_sender.get(reply[4:8])
                    if checked < 200 and mac1 is not None:
                        checked += 1
                        try:
                            xaead_decrypt(cookie_key, reply[8:32], reply[32:64], mac1)
                            valid += 1
                        except Exception:
                            pass
        if limit > 0:
            ahead = sent / limit - (now - start)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": sent, "seconds": elapsed, "send_errors": send_errors,
                      "cookie_replies": replies, "cookie_checked": checked, "cookie_valid": valid}),
          flush=True)
    return 0


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
    write_pool(out_path, found)
    print(len(found), flush=True)
    return 0


# =============================================================================================
# The pools


def pool_junk(n: int, rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randint(1, 256)) for _ in range(n)]


def pool_unknown_index(n: int, rng: random.Random) -> list[bytes]:
    return [b"\x04\x00\x00\x00" + rng.randbytes(4) + rng.randbytes(8) + rng.randbytes(rng.randint(48, 240))
            for _ in range(n)]


def pool_initiations(n: int, responder_public: bytes) -> list[bytes]:
    """Initiations from an attacker key unknown to B, each with a valid MAC1 (B's public key is
    all it takes), built with fzpoll's own handshake code."""
    from fzpoll.wireguard import handshake
    from fzpoll.wireguard.keys import PrivateKey

    attacker = PrivateKey.generate(os.urandom)
    cookies = handshake.CookieGenerator(responder_public)
    now = time.time()
    out = []
    for i in range(n):
        body, _ = handshake.build_initiation(attacker.raw, responder_public, os.urandom(32),
                                             int.from_bytes(os.urandom(4), "little"), now + i * 1e-3)
        out.append(cookies.add_macs(body, 0.0))
    return out


# =============================================================================================
# Measurements


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


def run_ping(ns, count: int) -> dict:
    out = ns.run(["ping", "-n", "-i", "0.01", "-c", str(count), "-W", "1", TUN_B], check=False,
                 timeout=count * 0.05 + 20).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (count, 0)

    def quantile(q: float) -> float | None:
        return times[min(len(times) - 1, int(q * len(times)))] if times else None

    return {"ping_sent": sent, "ping_received": received,
            "loss_pct": 100.0 * (sent - received) / sent if sent else 100.0,
            "rtt_p50_ms": quantile(0.50), "rtt_p99_ms": quantile(0.99)}


def run_iperf(ns_a, ns_b, seconds: float) -> float | None:
    server = ns_b.popen(["iperf3", "-s", "-1", "-B", TUN_B], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    time.sleep(0.2)
    try:
        out = ns_a.run(["iperf3", "-c", TUN_B, "-t", str(max(1, round(seconds))), "-J",
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
    """Namespaces A, B, X; fzpoll on A (fair) and B (``schedule``); a working tunnel."""

    def __init__(self, schedule: str) -> None:
        import netns

        self.netns = netns
        self.schedule = schedule
        self.namespaces = []
        self.ns_a, self.ns_b, self.ns_x = (self._ns(t) for t in ("a", "b", "x"))
        self.ab = netns.veth_pair(self.ns_a, self.ns_b)
        self.xb = netns.veth_pair(self.ns_x, self.ns_b)
        self.a = self._daemon(self.ns_a, "fair").start()
        self.b = self._daemon(self.ns_b, schedule).start()
        key_a, key_b = netns.genkey(), netns.genkey()
        self.public_b = netns.pubkey(key_b)
        self.a.configure(key_a, PORT_A)
        self.b.configure(key_b, PORT_B)
        self.a.add_peer(self.public_b, [f"{TUN_B}/32"], f"{self.ab.ip_b}:{PORT_B}")
        self.b.add_peer(netns.pubkey(key_a), [f"{TUN_A}/32"], f"{self.ab.ip_a}:{PORT_A}")
        for d, mine, theirs in ((self.a, TUN_A, TUN_B), (self.b, TUN_B, TUN_A)):
            d.address(f"{mine}/32")
            d.up()
            d.route(f"{theirs}/32")
        self.ns_a.run(["ping", "-c", "3", "-i", "0.1", "-W", "2", TUN_B], timeout=20)
        self.pid_b = self.b.proc.pid
        self.started = time.monotonic()
        assert "fzpoll" in Path(f"/proc/{self.pid_b}/cmdline").read_text(errors="replace")

    def _ns(self, tag: str):
        ns = self.netns.Namespace(tag)
        self.namespaces.append(ns)
        return ns

    def _daemon(self, ns, schedule: str):
        class Daemon(self.netns.Fzpoll):
            program = (sys.executable, "-m", "fzpoll", "-f", "--log-level", os.environ.get("FLOOD_LOG_LEVEL", "warning"),
                       "--schedule", schedule)

        return Daemon(ns)

    def close(self, log_dir: str | None = None) -> None:
        if log_dir:
            for name, daemon in (("a", self.a), ("b", self.b)):
                Path(log_dir, f"{self.schedule}-{name}.log").write_text(daemon.log())
        for ns in reversed(self.namespaces):
            ns.close()

    def latest_handshake_b(self) -> int:
        return self.b.wg_show_dump().peers[0].latest_handshake


def start_flooders(setup: Setup, pool: list[bytes], count: int, max_seconds: float,
                   pps: float, cookie_key: bytes | None, tmp: Path) -> list[subprocess.Popen]:
    path = tmp / f"pool-{random.getrandbits(32):08x}"
    write_pool(str(path), pool)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return [setup.ns_x.popen([sys.executable, str(Path(__file__).resolve()), "_flood", str(path),
                              setup.xb.ip_b, str(PORT_B), str(max_seconds), str(pps / count if pps else 0),
                              cookie_key.hex() if cookie_key else "-"],
                             stdout=subprocess.PIPE, text=True, env=env)
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
            results.append({"sent": 0, "seconds": 0.0, "cookie_replies": 0, "cookie_valid": 0,
                            "cookie_checked": 0, "error": "flooder failed"})
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
    return read_pool(str(path))


def make_pool(kind: str, setup: Setup, size: int, tmp: Path) -> list[bytes]:
    rng = random.Random(0xF1 ^ ord(kind))
    if kind == "a":
        return pool_junk(size, rng)
    if kind == "b":
        return pool_unknown_index(size, rng)
    if kind == "c":
        import base64

        return pool_initiations(size, base64.b64decode(setup.public_b))
    if kind == "d":
        return capture_replays(setup, min(size, 1000), tmp)
    raise ValueError(kind)


def cookie_key_for(setup: Setup) -> bytes:
    import base64

    from fzpoll.wireguard.constants import LABEL_COOKIE
    from fzpoll.wireguard.crypto import hash_

    return hash_(LABEL_COOKIE + base64.b64decode(setup.public_b))


def run_cell(setup: Setup, flood: str, args, tmp: Path) -> dict:
    pid = setup.pid_b
    cell: dict = {"schedule": setup.schedule, "flood": flood,
                  "since_setup_s": round(time.monotonic() - setup.started, 1)}
    flooders: list[subprocess.Popen] = []
    handshake_before = setup.latest_handshake_b()
    stats_before = _drops(fzpoll_stats(setup.b.socket_path))
    cell["busy_before_pct"] = wait_quiet()
    if flood != "none":
        pool = make_pool(flood, setup, args.pool, tmp)
        cell["pool"] = len(pool)
        flooders = start_flooders(setup, pool, args.attackers, args.seconds + 30, args.attack_pps,
                                  cookie_key_for(setup) if flood == "c" else None, tmp)
        time.sleep(0.5)  # let the flood ramp up (and B go under load)
    try:
        reset_peak_rss(pid)
        foreign = ForeignCpu(setup.namespaces)
        backlog0 = softnet_dropped()
        snmp0, cpu0, t0 = udp_counters(setup.ns_b), proc_cpu_seconds(pid), time.monotonic()
        cell.update(run_ping(setup.ns_a, int(args.seconds / 2 * 100)))
        cell["tcp_mbps"] = run_iperf(setup.ns_a, setup.ns_b, args.seconds / 2)
        snmp1, cpu1, t1 = udp_counters(setup.ns_b), proc_cpu_seconds(pid), time.monotonic()
        cell["cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        cell["vmhwm_kib"] = proc_status_kib(pid, "VmHWM")
        cell["vmrss_kib"] = proc_status_kib(pid, "VmRSS")
        cell["udp_in_pps"] = (snmp1["InDatagrams"] - snmp0["InDatagrams"]) / (t1 - t0)
        cell["rcvbuf_drop_pps"] = (snmp1["RcvbufErrors"] - snmp0["RcvbufErrors"]) / (t1 - t0)
        cell["backlog_drop_pps"] = (softnet_dropped() - backlog0) / (t1 - t0)
        cell["foreign_cpu_pct"] = 100.0 * foreign.seconds() / (t1 - t0)
    finally:
        results = stop_flooders(flooders)
    sent = sum(r["sent"] for r in results)
    seconds = max((r["seconds"] for r in results), default=0.0)
    cell["attack_pps"] = sent / seconds if seconds else 0.0
    cell["attackers"] = len(results)
    if flood == "c":
        cell["cookie_replies"] = sum(r["cookie_replies"] for r in results)
        cell["cookie_valid"] = f"{sum(r['cookie_valid'] for r in results)}/{sum(r['cookie_checked'] for r in results)}"
    time.sleep(1.0)  # let B drain its socket before the next cell
    cell["alive"] = setup.b.proc.poll() is None
    handshake_after = setup.latest_handshake_b() if cell["alive"] else -1
    # A new handshake is a lost session unless the old one was due for its rekey anyway.
    scheduled = time.time() - handshake_before >= REKEY_AFTER_TIME - 2
    cell["session_kept"] = handshake_after == handshake_before or (handshake_after > 0 and scheduled)
    cell["rekeyed"] = handshake_after != handshake_before
    cell["handshake_age_s"] = round(time.time() - handshake_after) if handshake_after > 0 else None
    stats_after = _drops(fzpoll_stats(setup.b.socket_path))
    delta = {k: v - stats_before.get(k, 0) for k, v in stats_after.items() if v - stats_before.get(k, 0)}
    if delta:
        cell["drops"] = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:3])
    return cell


# =============================================================================================
# Output


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(cells: list[dict]) -> None:
    head = ("| schedule | flood | attack kpps | B UDP in kpps | rcvbuf drop kpps | backlog drop kpps "
            "| ping p50 ms | p99 ms | loss % | TCP Mbit/s | B CPU % | B VmHWM MiB | other CPU % |")
    print(head)
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for c in cells:
        print(f"| {c['schedule']} | {c['flood']}: {FLOODS[c['flood']]} | {c['attack_pps'] / 1e3:.0f} "
              f"| {c['udp_in_pps'] / 1e3:.1f} | {c['rcvbuf_drop_pps'] / 1e3:.1f} "
              f"| {c['backlog_drop_pps'] / 1e3:.1f} "
              f"| {_f(c['rtt_p50_ms'], '.2f')} | {_f(c['rtt_p99_ms'], '.2f')} | {c['loss_pct']:.1f} "
              f"| {_f(c['tcp_mbps'], '.0f')} | {c['cpu_pct']:.0f} | {c['vmhwm_kib'] / 1024:.1f} "
              f"| {c['foreign_cpu_pct']:.0f} |")
    for c in cells:
        notes = []
        if c["flood"] == "c":
            notes.append(f"cookie replies at the attacker: {c['cookie_replies']} (decrypted {c['cookie_valid']})")
        if c["flood"] != "none":
            notes.append(("session kept" + (" (rekeyed on schedule)" if c["rekeyed"] else "")
                          if c["session_kept"] else "SESSION LOST (unscheduled handshake, or B died)")
                         + f", {c['ping_received']}/{c['ping_sent']} pings answered")
        if "pool" in c:
            notes.append(f"pool {c['pool']}")
        if c.get("drops"):
            notes.append("top drops " + ", ".join(f"{k} {v}" for k, v in c["drops"].items()))
        if notes:
            print(f"- {c['schedule']}/{c['flood']}: " + "; ".join(notes))


# =============================================================================================
# Soak


def soak(args, tmp: Path) -> list[dict]:
    out = []
    for schedule in args.schedules:
        setup = Setup(schedule)
        try:
            for flood in ("c", "a"):
                pool = make_pool(flood, setup, args.pool, tmp)
                flooders = start_flooders(setup, pool, args.attackers, args.soak + 30, args.attack_pps,
                                          cookie_key_for(setup) if flood == "c" else None, tmp)
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
                row = {"schedule": schedule, "flood": flood, "seconds": args.soak,
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
    print("| schedule | flood | seconds | attack kpps | B VmRSS min MiB | max MiB | first | last | VmHWM MiB | ping replies |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in out:
        print(f"| {r['schedule']} | {r['flood']}: {FLOODS[r['flood']]} | {r['seconds']:.0f} | {r['attack_kpps']:.0f} "
              f"| {r['rss_min_kib'] / 1024:.1f} | {r['rss_max_kib'] / 1024:.1f} | {r['rss_first_kib'] / 1024:.1f} "
              f"| {r['rss_last_kib'] / 1024:.1f} | {r['vmhwm_kib'] / 1024:.1f} | {r['ping']} |")
    return out


# =============================================================================================


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_flood"]:
        return flood_main(argv[1:])
    if argv[:1] == ["_capture"]:
        return capture_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each cell (half ping, half iperf3)")
    p.add_argument("--quick", action="store_true", help="4-second cells, smaller pools")
    p.add_argument("--soak", type=float, default=0.0, metavar="S",
                   help="instead: floods c and a for S seconds each, sampling B's RSS every second")
    p.add_argument("--attackers", type=int, default=1, help="flooding processes (default 1)")
    p.add_argument("--attack-pps", type=float, default=0.0, help="cap on the total attack rate (0: none)")
    p.add_argument("--schedules", default=None, help="comma-separated (default fair,priority; soak: fair)")
    p.add_argument("--floods", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    p.add_argument("--pool", type=int, default=4096, help="distinct datagrams per flood pool")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep-logs", metavar="DIR", help="save both daemons' logs there (level: $FLOOD_LOG_LEVEL, "
                   "default warning)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (network namespaces)")
    if args.quick:
        args.seconds = min(args.seconds, 4.0)
        args.pool = min(args.pool, 1024)
    default = "fair" if args.soak else "fair,priority"
    args.schedules = [s for s in (args.schedules or default).split(",") if s]
    floods = ["none"] + [f for f in args.floods.split(",") if f]
    import netns

    netns.cleanup_stale()
    cells: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fzflood-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)
        if args.soak:
            cells = soak(args, tmp)
        else:
            for schedule in args.schedules:
                setup = Setup(schedule)
                try:
                    for flood in floods:
                        cell = run_cell(setup, flood, args, tmp)
                        cells.append(cell)
                        print(json.dumps(cell), file=sys.stderr, flush=True)
                finally:
                    setup.close(args.keep_logs)
            print(f"\n{' '.join(['python3', 'tools/bench_flood.py', *argv])}  "
                  f"({os.cpu_count()} CPUs, {args.attackers} attacker process(es), {args.seconds:g} s cells)\n")
            print_table(cells)
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
