#!/usr/bin/env python3
"""Footprint benchmark: idle RSS and start-up time of fzpoll and wireguard-go, side by side, and
RSS with 1,000 and 10,000 peers. Run as root (each daemon runs in a network namespace of ours).

Start-up: from just before exec (``nsenter --net=... PROGRAM -f IFNAME``: nsenter execs the
daemon, no extra fork) to the first complete answer to a UAPI ``get=1`` on
/var/run/wireguard/IFNAME.sock (the socket is polled every millisecond). Besides that wall time,
the CPU time the daemon had used by then (/proc/PID/schedstat), which a loaded machine does not
inflate. Idle RSS: VmRSS from /proc/PID/status after 2 s idle with one interface and one peer
(private key, peer, allowed IP, endpoint set over the UAPI), and USS (Private_Clean +
Private_Dirty of /proc/PID/smaps_rollup: what the daemon costs beyond the shared libraries).
Peers: the same after one ``set`` that adds N peers (random keys, a /32 and an endpoint each).

Rounds are interleaved (fzpoll, wireguard-go, upstream wireguard-go, fzpoll, ...) and medians
printed. fzpoll runs as its console script does (``from fzpoll.cli import main``) under each
``--python`` (default: this interpreter, plus Debian's /usr/bin/python3 if it can import the
runtime dependencies), from this checkout with its bytecode compiled first (``compileall``), as
pip and apt install it: PYTHONDONTWRITEBYTECODE would otherwise make every start compile fzpoll's
sources (~110 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SOCKET_DIR = Path("/var/run/wireguard")
UPSTREAM = Path(__file__).resolve().parents[1].parent / "shared" / "anchors" / "wireguard-go-upstream"
UPSTREAM_DEFAULT = UPSTREAM if UPSTREAM.exists() else Path("/work/shared/anchors/wireguard-go-upstream")
FZPOLL_MAIN = "import sys; from fzpoll.cli import main; sys.exit(main())"
REPO = str(Path(__file__).resolve().parents[1])
IDLE_SECONDS = 2.0
PEERS_PER_SET = 1000


def _uapi(path: Path, request: bytes, timeout: float = 30.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request)
        buf = b""
        while not (b"errno=" in buf and buf.endswith(b"\n\n")):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode()


def _memory(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    uss = sum(int(line.split()[1]) for line in open(f"/proc/{pid}/smaps_rollup")
              if line.startswith(("Private_Clean:", "Private_Dirty:")))
    return rss / 1024, uss / 1024


def _cpu_seconds(pid: int) -> float:
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9


class Impl:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.env = name, argv, env or {}


class Run:
    """One daemon in namespace ``ns``, started and timed to its first UAPI answer."""

    def __init__(self, impl: Impl, ns: str) -> None:
        self.ifname = f"fzfp{secrets.token_hex(2)}"
        self.sock = SOCKET_DIR / f"{self.ifname}.sock"
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error",
                   WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", **impl.env)
        start = time.perf_counter()
        self.proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", *impl.argv, self.ifname], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if "errno=0" in _uapi(self.sock, b"get=1\n\n", timeout=5):
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - start > 30:
                raise RuntimeError(f"{impl.name} did not start (exit {self.proc.returncode})")
            time.sleep(0.001)
        self.startup = time.perf_counter() - start
        self.startup_cpu = _cpu_seconds(self.proc.pid)

    def configure(self, peers: int) -> None:
        """A private key, then ``peers`` peers in requests of PEERS_PER_SET (a UAPI request is
        bounded: fzpoll takes 1 MiB)."""
        self._set([f"private_key={secrets.token_hex(32)}", "listen_port=0"])
        for start in range(0, peers, PEERS_PER_SET):
            lines = []
            for i in range(start, min(peers, start + PEERS_PER_SET)):
                lines += [f"public_key={secrets.token_hex(32)}",
                          f"endpoint=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:51820",
                          f"allowed_ip=100.{64 + (i >> 16)}.{i >> 8 & 255}.{i & 255}/32"]
            self._set(lines)

    def _set(self, lines: list[str]) -> None:
        answer = _uapi(self.sock, ("set=1\n" + "\n".join(lines) + "\n\n").encode(), timeout=120)
        if "errno=0" not in answer:
            raise RuntimeError(f"set failed: {answer.strip()}")

    def memory(self) -> tuple[float, float]:
        return _memory(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.sock.unlink(missing_ok=True)


def _debian_python_usable() -> bool:
    python = "/usr/bin/python3"
    if not os.path.exists(python) or os.path.realpath(python) == os.path.realpath(sys.executable):
        return False
    return subprocess.run([python, "-c", "import nacl, pyroute2"], capture_output=True).returncode == 0


def implementations(args: argparse.Namespace) -> list[Impl]:
    pythons = args.python or [sys.executable] + (["/usr/bin/python3"] if _debian_python_usable() else [])
    for python in pythons:
        subprocess.run([python, "-m", "compileall", "-q", os.path.join(REPO, "fzpoll")], check=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    impls = [Impl(f"fzpoll ({p})", [p, "-c", FZPOLL_MAIN, "-f"], {"PYTHONPATH": REPO}) for p in pythons]
    if shutil.which("wireguard-go"):
        impls.append(Impl("wireguard-go (Debian)", [shutil.which("wireguard-go"), "-f"]))  # type: ignore[list-item]
    if args.upstream and Path(args.upstream).exists():
        impls.append(Impl("wireguard-go (upstream)", [str(args.upstream), "-f"]))
    return impls


def _one(impl: Impl, ns: str, peers: int) -> dict[str, float]:
    """Start, configure ``peers`` peers, idle, measure, stop; {} (and a line on stderr) if it failed."""
    try:
        run = Run(impl, ns)
    except RuntimeError as exc:
        print(f"{impl.name}: {exc}", file=sys.stderr)
        return {}
    try:
        run.configure(peers)
        time.sleep(IDLE_SECONDS)
        rss, uss = run.memory()
    except (OSError, RuntimeError) as exc:
        print(f"{impl.name} with {peers} peers: {exc}", file=sys.stderr)
        return {}
    finally:
        run.stop()
    return {"startup_ms": run.startup * 1e3, "startup_cpu_ms": run.startup_cpu * 1e3,
            "idle_rss_mib": rss, "idle_uss_mib": uss}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ns = f"fzfp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    impls = implementations(args)
    results: dict[str, dict[str, list[float]]] = {i.name: {} for i in impls}
    try:
        for _ in range(args.rounds):
            for impl in impls:
                figures = _one(impl, ns, 1)
                for key, value in figures.items():
                    results[impl.name].setdefault(key, []).append(value)
        for peers in args.peers:
            for _ in range(args.peer_rounds):
                for impl in impls:
                    rss = _one(impl, ns, peers).get("idle_rss_mib")
                    if rss is not None:
                        results[impl.name].setdefault(f"rss_{peers}_peers_mib", []).append(rss)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return {"rounds": args.rounds, "peer_rounds": args.peer_rounds, "results": results}


def _table(data: dict[str, Any]) -> str:
    results = data["results"]
    keys = list(next(iter(results.values())).keys()) if results else []
    labels = {"startup_ms": "start-up to first UAPI answer, ms", "startup_cpu_ms": "CPU used by then, ms",
              "idle_rss_mib": "idle RSS, MiB", "idle_uss_mib": "idle USS (private), MiB"}
    names = list(results)
    out = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        label = labels.get(key) or key.replace("rss_", "RSS with ").replace("_peers_mib", " peers, MiB")
        cells = []
        for name in names:
            values = results[name].get(key, [])
            cells.append(f"{statistics.median(values):.1f}" if values else "-")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="start-up/idle rounds per implementation (default 5)")
    parser.add_argument("--peers", type=int, nargs="*", default=[1000, 10000], help="peer counts (default 1000 10000)")
    parser.add_argument("--peer-rounds", type=int, default=3, help="rounds per peer count (default 3)")
    parser.add_argument("--python", action="append", help="interpreter for fzpoll (repeatable)")
    parser.add_argument("--upstream", default=str(UPSTREAM_DEFAULT), help="upstream wireguard-go binary")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_footprint: needs root (network namespaces, /dev/net/tun)", file=sys.stderr)
        return 1
    data = measure(args)
    print(_table(data))
    if args.json:
        print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
