"""``fzpoll demo``: a working tunnel between two network namespaces, measured, then removed.

Creates two namespaces joined by a veth pair, writes a config with fresh keys for each side, runs
``fzpoll up`` in each, pings through the tunnel and moves data over TCP through it, prints what it
did with the measured RTT and throughput, and removes everything it created, also when interrupted.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from fzpoll.wireguard.keys import PrivateKey

NS = ("fzdemo-a", "fzdemo-b")
IFACES = ("fzdemoa", "fzdemob")
UNDERLAY = ("10.231.250.1", "10.231.250.2")
TUNNEL = ("100.64.250.1", "100.64.250.2")
TUNNEL6 = ("fd00:64:250::1", "fd00:64:250::2")
PORT = 51820

_RECEIVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 16)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - (t0 or time.perf_counter()), flush=True)
"""

_SENDER = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5201), timeout=10)
buf = b"\\0" * (1 << 16); end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end: s.sendall(buf)
s.close()
"""


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def _say(text: str) -> None:
    print(text, flush=True)


def _config(private: PrivateKey, peer_public: str, side: int) -> str:
    other = 1 - side
    return (
        "[Interface]\n"
        f"PrivateKey = {private.base64()}\n"
        f"ListenPort = {PORT}\n"
        f"Address = {TUNNEL[side]}/32, {TUNNEL6[side]}/128\n"
        "\n[Peer]\n"
        f"PublicKey = {peer_public}\n"
        f"Endpoint = {UNDERLAY[other]}:{PORT}\n"
        f"AllowedIPs = {TUNNEL[other]}/32, {TUNNEL6[other]}/128\n"
    )


def cleanup() -> None:
    """Remove whatever a demo (this one, or an interrupted earlier one) created."""
    for ns in NS:
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        _run("ip", "netns", "del", ns, check=False)
    for name in IFACES:
        try:
            os.unlink(f"/var/run/wireguard/{name}.sock")
        except FileNotFoundError:
            pass


def _preflight() -> str | None:
    if os.geteuid() != 0:
        return "fzpoll demo needs root (it creates network namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "fzpoll demo needs /dev/net/tun"
    if shutil.which("ip") is None or shutil.which("ping") is None:
        return "fzpoll demo needs iproute2 and ping (bash tools/install-deps.sh installs them)"
    return None


LOCK_PATH = "/run/fzpoll-demo.lock"
LOCK_WAIT = 120.0  # seconds a demo waits for another one to finish


def _take_lock() -> int | None:
    """One demo at a time on a host (they share the namespace and interface names): wait for a
    running one to finish rather than tear its namespaces down."""
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.2)


def demo(seconds: float = 3.0) -> int:
    problem = _preflight()
    if problem:
        print(f"fzpoll: {problem}", file=sys.stderr)
        return 1
    lock = _take_lock()
    if lock is None:
        print(f"fzpoll: another fzpoll demo has been running for {LOCK_WAIT:.0f} s; try again later", file=sys.stderr)
        return 1
    try:
        return _demo_locked(seconds)
    finally:
        os.close(lock)


def _demo_locked(seconds: float) -> int:
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C cleans up even when started from a script in the background (where SIGINT arrives
    # ignored, and Python would keep ignoring it).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = tempfile.mkdtemp(prefix="fzpoll-demo-")
    daemons: list[subprocess.Popen] = []
    try:
        cleanup()
        return _demo(seconds, workdir, daemons)
    except KeyboardInterrupt:
        _say("interrupted: cleaning up")
        return 130
    except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
        print(f"fzpoll demo failed: {exc}", file=sys.stderr)
        for i, d in enumerate(daemons):
            log = os.path.join(workdir, f"{IFACES[i]}.log")
            if os.path.exists(log):
                print(f"--- log of {IFACES[i]} ---\n" + open(log).read()[-3000:], file=sys.stderr)
        return 1
    finally:
        for d in daemons:
            if d.poll() is None:
                d.terminate()
                try:
                    d.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    d.kill()
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        _say("removed the namespaces, interfaces and sockets the demo created")


def _demo(seconds: float, workdir: str, daemons: list[subprocess.Popen]) -> int:
    for ns in NS:
        _run("ip", "netns", "add", ns)
    _run("ip", "link", "add", "fzdemo-va", "netns", NS[0], "type", "veth", "peer", "fzdemo-vb", "netns", NS[1])
    for ns, veth, addr in ((NS[0], "fzdemo-va", UNDERLAY[0]), (NS[1], "fzdemo-vb", UNDERLAY[1])):
        _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
        _run("ip", "-n", ns, "link", "set", veth, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
    _say(f"created namespaces {NS[0]} and {NS[1]} joined by a veth pair ({UNDERLAY[0]} <-> {UNDERLAY[1]})")
    keys = [PrivateKey.generate(os.urandom) for _ in NS]
    for side in (0, 1):
        path = os.path.join(workdir, f"{IFACES[side]}.conf")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(_config(keys[side], keys[1 - side].public_key.base64(), side))
        log = open(os.path.join(workdir, f"{IFACES[side]}.log"), "w")
        daemons.append(subprocess.Popen(
            ["ip", "netns", "exec", NS[side], sys.executable, "-m", "fzpoll", "up", path],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        ))
    for side in (0, 1):
        _wait_for(lambda s=side: os.path.exists(f"/var/run/wireguard/{IFACES[s]}.sock")
                  and TUNNEL[s] in _run("ip", "-n", NS[s], "addr", "show", IFACES[s], check=False).stdout,
                  f"{IFACES[side]} to come up", daemons)
    _say(f"started two fzpoll daemons with fresh keys: {IFACES[0]} {TUNNEL[0]} <-> {IFACES[1]} {TUNNEL[1]}")
    ping = _run("ip", "netns", "exec", NS[0], "ping", "-c", "5", "-i", "0.2", "-W", "2", TUNNEL[1], check=False)
    first = re.search(r"icmp_seq=1 .*time=([\d.]+) ms", ping.stdout)
    summary = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", ping.stdout)
    received = re.search(r"(\d+) received", ping.stdout)
    if ping.returncode != 0 or not summary:
        raise RuntimeError("ping through the tunnel failed:\n" + ping.stdout + ping.stderr)
    _say(f"ping {TUNNEL[1]} through the tunnel: {received.group(1) if received else '?'}/5 replies, "
         f"first (with handshake) {first.group(1) if first else '?'} ms, "
         f"rtt min/avg/max {summary.group(1)}/{summary.group(2)}/{summary.group(3)} ms")
    ping6 = _run("ip", "netns", "exec", NS[0], "ping", "-6", "-c", "2", "-i", "0.2", "-W", "2", TUNNEL6[1], check=False)
    _say(f"ping {TUNNEL6[1]} (IPv6 inside the tunnel): {'ok' if ping6.returncode == 0 else 'FAILED'}")
    receiver = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-c", _RECEIVER, TUNNEL[1]],
                                stdout=subprocess.PIPE, text=True)
    try:
        if receiver.stdout is None or receiver.stdout.readline().strip() != "listening":
            raise RuntimeError("TCP receiver did not start")
        _run("ip", "netns", "exec", NS[0], sys.executable, "-c", _SENDER, TUNNEL[1], str(seconds),
             timeout=seconds + 30)
        out, _ = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    nbytes, elapsed = out.split()
    mbits = int(nbytes) * 8 / max(float(elapsed), 1e-9) / 1e6
    _say(f"TCP through the tunnel: {int(nbytes) / 1e6:.1f} MB in {float(elapsed):.2f} s = {mbits:.0f} Mbit/s")
    ok = ping6.returncode == 0 and int(nbytes) > 0
    _say("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def _wait_for(condition, what: str, daemons: list[subprocess.Popen], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        if any(d.poll() is not None for d in daemons):
            raise RuntimeError(f"a daemon exited while waiting for {what}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")
