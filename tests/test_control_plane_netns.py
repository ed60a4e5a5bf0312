"""The control plane at scale, in namespaces with the real ``wg`` and wireguard-go (issue 13).

While a big configuration is applied, a ping every 10 ms through the tunnel must lose nothing
and never wait more than 50 ms (a generous bound: the data plane must not stall); 64 busy UAPI
clients must not lock the operator's ``wg show`` out; a reload that fails must change nothing.
Only addresses inside the namespaces the tests create are used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import netns

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
MAX_RTT_MS = 50.0
_REPLY = re.compile(r"icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms")


@pytest.fixture(autouse=True)
def _need_root() -> None:
    reason = netns.need_root() or netns.need_wireguard_go()
    if reason:
        pytest.skip(reason)
    netns.cleanup_stale()


class FzpollInfo(netns.Fzpoll):
    """``fzpoll -f IFNAME`` at info level (debug logging of 10,000 peers is not the point)."""

    program = (sys.executable, "-m", "fzpoll", "-f", "--log-level", "info")


class Pinger:
    """``ping -i 0.01`` in the background; :meth:`stop` returns (replies, lost, max RTT ms).

    Lost = sequence numbers up to the last reply that never got one (the tail still in flight
    when it is stopped is not counted: it was waited for 0.5 s)."""

    def __init__(self, ns: netns.Namespace, address: str) -> None:
        self.proc = ns.popen(["ping", "-n", "-i", "0.01", "-W", "2", address],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.started = time.monotonic()

    def stop(self) -> tuple[int, int, float]:
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        replies = {int(seq): float(ms) for seq, ms in _REPLY.findall(out)}
        assert replies, out
        last = max(replies)
        lost = sum(1 for seq in range(1, last + 1) if seq not in replies)
        return len(replies), lost, max(replies.values())


def _overloaded() -> bool:
    """Other processes keep every CPU busy (other test suites or benchmarks on a shared host)."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def no_stall(ns: netns.Namespace, work: Callable[[], float], what: str) -> float:
    """Run ``work()`` (returns its seconds) while pinging 100.64.0.1 every 10 ms from ``ns``:
    nothing may be lost and no RTT may exceed MAX_RTT_MS. Only when the RTT bound fails while the
    host is overloaded by others is the (repeatable) work tried once more, and then it must pass.
    Returns the seconds the work took."""
    for attempt in (1, 2):
        pinger = Pinger(ns, "100.64.0.1")
        took = work()
        replies, lost, worst = pinger.stop()
        figures = f"{what}: {took:.2f} s, ping every 10 ms: {replies} replies, {lost} lost, max RTT {worst:.1f} ms"
        print(figures)
        assert lost == 0, figures
        assert replies >= took / 0.1, figures  # the pings really ran across the work
        if worst <= MAX_RTT_MS:
            return took
        if attempt == 1 and _overloaded():
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: once more")
            continue
        raise AssertionError(figures)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def tunnel() -> Iterator[tuple[netns.Namespace, netns.Namespace, Any, Any, str]]:
    """fzpoll (wg-configured, as wireguard-go) in ns A, wireguard-go in ns B, a session up."""
    netns.cleanup_stale()
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b, \
            tempfile.TemporaryDirectory(prefix="fzt-ctl-") as tmp:
        pair = netns.veth_pair(ns_a, ns_b)
        a, b = netns.wg_pair(ns_a, ns_b, pair, kind_a=FzpollInfo)
        ns_b.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.1"], timeout=20)
        yield ns_a, ns_b, a, b, tmp


def _addconf(ns: netns.Namespace, ifname: str, path: Path) -> float:
    started = time.monotonic()
    result = ns.run(["wg", "addconf", ifname, str(path)], check=False, timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, (result.returncode, result.stderr[-500:])
    return took


def test_64_busy_uapi_clients_do_not_lock_the_operator_out(tunnel) -> None:
    ns_a, ns_b, a, b, tmp = tunnel
    counts = {}
    for name, ns, wg in (("fzpoll", ns_a, a), ("wireguard-go", ns_b, b)):
        load = ns.popen([sys.executable, "-c", _CLIENTS, str(wg.socket_path), "64", "5"],
                        stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        shows = []
        while load.poll() is None:
            started = time.monotonic()
            result = ns.run(["wg", "show", wg.ifname], check=False, timeout=20)
            shows.append((result.returncode, time.monotonic() - started))
            time.sleep(0.3)
        out, _ = load.communicate(timeout=30)
        answered, refused = map(int, out.split())
        counts[name] = (answered, refused, shows)
        assert shows and all(code == 0 for code, _ in shows), (name, shows)
    print("64 clients x 5 s, get=1 answered/refused: " + ", ".join(
        f"{n} {c[0]}/{c[1]} (wg show max {max(t for _, t in c[2]):.2f} s)" for n, c in counts.items()))
    assert counts["fzpoll"][1] == 0 and counts["fzpoll"][0] > 64


_CLIENTS = """
import socket, sys, threading, time
path, n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + seconds
answered = refused = 0
lock = threading.Lock()
def client():
    global answered, refused
    while time.monotonic() < end:
        try:
            s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path)
            s.sendall(b"get=1\\n\\n"); buf = b""
            while not buf.endswith(b"\\n\\n"):
                chunk = s.recv(65536)
                if not chunk: break
                buf += chunk
            s.close()
            ok = buf.endswith(b"errno=0\\n\\n")
        except OSError:
            ok = False
        with lock:
            if ok: answered += 1
            else: refused += 1
threads = [threading.Thread(target=client) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(answered, refused)
"""


def test_addconf_130560_allowed_ips_without_stalling(tunnel) -> None:
    ns_a, ns_b, a, b, tmp = tunnel
    peer = netns.pubkey(netns.genkey())
    path = Path(tmp) / "big.conf"
    with open(path, "w") as f:
        f.write(f"[Peer]\nPublicKey = {peer}\n")
        for x in range(1, 256):
            f.write("AllowedIPs = " + ", ".join(f"{x}.{y}.0.0/16, {x:x}::{y:x}/128" for y in range(256)) + "\n")
    no_stall(ns_b, lambda: _addconf(ns_a, a.ifname, path), "wg addconf of 130,560 allowed IPs")
    shown = ns_a.run(["wg", "show", a.ifname, "allowed-ips"], timeout=60).stdout
    line = next(l for l in shown.splitlines() if l.startswith(peer))
    ips = line.split("\t")[1].split()
    assert len(ips) == 130_560 and "255.255.0.0/16" in ips and "ff::ff/128" in ips
    ns_a.run(["wg", "set", a.ifname, "peer", peer, "remove"], timeout=30)


def test_addconf_40_peers_with_52_allowed_ips_each(tunnel) -> None:
    ns_a, ns_b, a, b, tmp = tunnel
    path = Path(tmp) / "forty.conf"
    keys = [netns.pubkey(netns.genkey()) for _ in range(40)]
    with open(path, "w") as f:
        for i, key in enumerate(keys):
            f.write(f"[Peer]\nPublicKey = {key}\nAllowedIPs = "
                    + ", ".join(f"10.{i}.{j}.0/24" for j in range(52)) + "\n")
    no_stall(ns_b, lambda: _addconf(ns_a, a.ifname, path), "wg addconf of 40 peers x 52 allowed IPs")
    dump = a.wg_show_dump()
    assert sum(1 for p in dump.peers if p.public_key in keys and len(p.allowed_ips) == 52) == 40


def test_addconf_10000_peers_with_psks_then_show(tunnel) -> None:
    ns_a, ns_b, a, b, tmp = tunnel
    path = Path(tmp) / "many.conf"
    psk = netns.genkey()
    with open(path, "w") as f:
        for i in range(10_000):
            raw = (i + 1).to_bytes(4, "big") + bytes(28)
            key = __import__("base64").b64encode(raw).decode()
            f.write(f"[Peer]\nPublicKey = {key}\nPresharedKey = {psk}\n"
                    f"AllowedIPs = 10.{100 + i // 256 // 256}.{i // 256 % 256}.{i % 256}/32\n")
    no_stall(ns_b, lambda: _addconf(ns_a, a.ifname, path), "wg addconf of 10,000 peers with PSKs")
    dumps = []

    def show() -> float:
        started = time.monotonic()
        dumps.append(a.wg_show_dump())
        return time.monotonic() - started

    no_stall(ns_b, show, "wg show of 10,001 peers")
    assert len(dumps[-1].peers) >= 10_001


# ---------------------------------------------------------------------------------------------
# Reloads of `fzpoll up` that fail change nothing


def _write(path: Path, private: str, port: int, peers: list[tuple[str, str | None, list[str]]]) -> None:
    text = f"[Interface]\nPrivateKey = {private}\nListenPort = {port}\nAddress = 100.64.0.1/32\n"
    for key, endpoint, allowed in peers:
        text += f"\n[Peer]\nPublicKey = {key}\nAllowedIPs = {', '.join(allowed)}\n"
        if endpoint:
            text += f"Endpoint = {endpoint}\n"
    path.touch(mode=0o600)
    path.write_text(text)


@pytest.fixture
def up_tunnel() -> Iterator[dict[str, Any]]:
    """``fzpoll up`` in ns A (its own resolv.conf), wireguard-go in ns B, a session up."""
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b, \
            tempfile.TemporaryDirectory(prefix="fzt-reload-") as tmp:
        etc = Path("/etc/netns") / ns_a.name
        etc.mkdir(parents=True, exist_ok=True)
        ns_a.on_close(lambda: shutil.rmtree(etc, ignore_errors=True))
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # refused at once
        pair = netns.veth_pair(ns_a, ns_b)
        key_a = netns.genkey()
        _b, key_b = netns.wireguard_go_peer(ns_b, pair, key_a)
        ifname = f"wgt{os.urandom(2).hex()}"
        conf = Path(tmp) / f"{ifname}.conf"
        peers = [(netns.pubkey(key_b), f"{pair.ip_b}:51821", ["100.64.0.2/32"])]
        _write(conf, key_a, 51820, peers)
        log_path = Path(tmp) / "a.log"
        with open(log_path, "wb") as log:
            proc = ns_a.popen([sys.executable, "-m", "fzpoll", "up", str(conf), "--log-level", "info"],
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT)
        sock = netns.WG_SOCKET_DIR / f"{ifname}.sock"
        end = time.monotonic() + 15
        while not (sock.exists() and ns_a.run(["wg", "show", ifname], check=False).returncode == 0):
            assert proc.poll() is None and time.monotonic() < end, log_path.read_text()
            time.sleep(0.1)
        ns_b.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.1"], timeout=20)
        yield dict(ns_a=ns_a, ns_b=ns_b, pair=pair, proc=proc, conf=conf, ifname=ifname, key=key_a,
                   peers=peers, log=log_path, etc=etc)


def _state(t: dict[str, Any]) -> tuple[str, list[str]]:
    dump = t["ns_a"].run(["wg", "show", t["ifname"], "dump"]).stdout
    interface = dump.splitlines()[0]
    peers = sorted(line.split("\t")[0] + " " + line.split("\t")[3] for line in dump.splitlines()[1:])
    routes = sorted(str(r.get("dst")) for r in t["ns_a"].ip_json("route", "show", "dev", t["ifname"]))
    return interface, peers + routes


def _reload_and_wait(t: dict[str, Any], marker: str, timeout: float = 15.0) -> float:
    before = t["log"].read_text().count(marker)
    started = time.monotonic()
    t["proc"].send_signal(signal.SIGHUP)
    while t["log"].read_text().count(marker) == before:
        assert time.monotonic() - started < timeout, t["log"].read_text()[-3000:]
        time.sleep(0.05)
    return time.monotonic() - started


def test_reload_with_a_taken_port_and_a_new_key_changes_nothing(up_tunnel) -> None:
    t = up_tunnel
    before = _state(t)
    holder = t["ns_a"].popen([sys.executable, "-c", "import socket,time\n"
                              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',51999))\n"
                              "print('ok',flush=True);time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ok"
    _write(t["conf"], netns.genkey(), 51999, t["peers"] + [(netns.pubkey(netns.genkey()), None, ["10.5.0.0/16"])])
    no_stall(t["ns_b"], lambda: _reload_and_wait(t, "reload failed"), "reload with a taken port")
    assert "cannot listen on UDP port 51999" in t["log"].read_text()
    assert _state(t) == before
    holder.kill()


def test_reload_with_an_unresolvable_endpoint_among_new_peers_changes_nothing(up_tunnel) -> None:
    t = up_tunnel
    before = _state(t)
    new = [(netns.pubkey(netns.genkey()), None, ["10.6.0.0/16"]),
           (netns.pubkey(netns.genkey()), "no-such-host.invalid:51820", ["10.7.0.0/16"])]
    _write(t["conf"], t["key"], 51820, t["peers"] + new)
    no_stall(t["ns_b"], lambda: _reload_and_wait(t, "reload failed"), "reload with an unresolvable endpoint")
    assert "no-such-host.invalid" in t["log"].read_text()
    assert _state(t) == before
    # the same change without the bad peer succeeds, keeping the session
    _write(t["conf"], t["key"], 51820, t["peers"] + new[:1])
    _reload_and_wait(t, "configuration reloaded")
    assert "10.6.0.0/16" in " ".join(_state(t)[1])
    t["ns_b"].run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "100.64.0.1"], timeout=10)


def test_reload_with_a_dead_nameserver_never_freezes_the_loop(up_tunnel) -> None:
    t = up_tunnel
    # a "name server" in ns B that reads queries and never answers
    dead = t["ns_b"].popen([sys.executable, "-c", "import socket,time\n"
                            "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',53))\n"
                            "print('ok',flush=True)\nwhile True: s.recv(4096)"], stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "ok"
    (t["etc"] / "resolv.conf").write_text(f"nameserver {t['pair'].ip_b}\noptions timeout:3 attempts:3\n")
    before = _state(t)
    _write(t["conf"], t["key"], 51820, t["peers"] + [(netns.pubkey(netns.genkey()), "peer.example:51820", ["10.8.0.0/16"])])
    took = no_stall(t["ns_b"], lambda: _reload_and_wait(t, "reload failed"), "reload with a dead name server")
    assert "timed out" in t["log"].read_text() and 4.0 <= took <= 10.0
    assert _state(t) == before


# ---------------------------------------------------------------------------------------------
# Small UAPI differences, checked against Debian's wireguard-go side by side

_UAPI_PROBE = """
import socket, sys
def ask(path, data, half_close):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path); s.sendall(data)
    if half_close:
        s.shutdown(socket.SHUT_WR)
    out = b""
    while not out.endswith(b"\\n\\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return out
path = sys.argv[1]
peer = "0a" * 32
print(ask(path, b"set=1\\nlisten_port=4444\\nfwmark=12", True))
print(ask(path, f"set=1\\npublic_key={peer}\\nendpoint=[fe80::1%eth0]:5\\n\\n".encode(), False))
print(ask(path, f"set=1\\npublic_key={peer}\\nendpoint=[fe80::1%lo]:5\\n\\n".encode(), False))
print(ask(path, f"set=1\\npublic_key={peer}\\nendpoint=[fe80::2%1]:6\\n\\n".encode(), False))
print(ask(path, b"get=1\\n\\n", False))
"""


def test_half_closed_set_and_endpoint_zones_as_wireguard_go() -> None:
    with netns.Namespace("u") as ns:
        answers = []
        for kind in (netns.WireguardGo, FzpollInfo):
            wg = kind(ns).start()
            out = ns.run([sys.executable, "-c", _UAPI_PROBE, str(wg.socket_path)], timeout=30).stdout
            answers.append(out)
            wg.stop()
        go, ours = answers
        assert ours == go, (go, ours)
        lines = go.splitlines()
        # the last line without newline is applied; a zone naming no interface is EINVAL
        assert lines[:4] == ["b'errno=0\\n\\n'", "b'errno=-22\\n\\n'", "b'errno=0\\n\\n'", "b'errno=0\\n\\n'"]
        assert "fwmark=12" in lines[4] and "listen_port=4444" in lines[4] and "endpoint=[fe80::2]:6" in lines[4]
