"""A real junk flood at a running daemon (in namespaces): the kernel prefilter drops it, so it is
counted as kernel drops in ``fzpoll show --json``, not as engine drops, and the tunnel works on.
With ``FZPOLL_DISABLE_FILTER=1`` the same junk reaches the engine (and is counted there). A flood
of replayed transport datagrams puts counter floors in the filter, which then drops it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import netns

REPO = Path(__file__).resolve().parent.parent
JUNK = 20000
SHAPED = 300  # transport-shaped, unknown receiver index: the filter must let these through

# Junk that can never be WireGuard (wrong type byte, non-zero reserved bytes, wrong lengths: a
# transport datagram under 100 bytes is a multiple of 16), then transport-shaped datagrams with an
# unknown index.
_FLOOD = """
import random, socket, sys
host, port, junk, shaped = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
pool = []
for i in range(512):
    kind = rng.choice([0, 5, 0x45, 0xff, 1, 2, 3, 4])
    body = bytes([kind]) + (b"\\x00\\x01\\x00" if kind in (1, 2, 3, 4) else rng.randbytes(3))
    pool.append(body + rng.randbytes(rng.randint(0, 200)))
pool += [b"\\x04\\x00\\x00\\x00" + rng.randbytes(4) + bytes(8) + bytes(16 * rng.randint(1, 4) + 3) for _ in range(64)]
sent = 0
for i in range(junk):
    while True:
        try:
            s.sendto(pool[i % len(pool)], (host, port)); break
        except BlockingIOError:
            pass
for i in range(shaped):
    s.sendto(b"\\x04\\x00\\x00\\x00" + (0xFFFF0000 + i).to_bytes(4, "little") + bytes(8) + bytes(32), (host, port))
print("done", flush=True)
"""


def _stats(ns: netns.Namespace, ifname: str) -> dict[str, Any]:
    proc = ns.run(["env", f"PYTHONPATH={REPO}", sys.executable, "-W", "error", "-m", "fzpoll",
                   "show", ifname, "--json"], timeout=20)
    (iface,) = json.loads(proc.stdout)["interfaces"]
    assert iface["stats"] is not None, "the daemon answers get=fzpoll"
    return iface["stats"]


def _flood(ns: netns.Namespace, host: str, port: int) -> None:
    ns.run([sys.executable, "-c", _FLOOD, host, str(port), str(JUNK), str(SHAPED)], timeout=60)


@pytest.fixture(params=["indices", "no-indices"])
def pair(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Two fzpoll daemons with a working tunnel; B checks receiver indices in the kernel or not."""
    reason = netns.need_wireguard_go()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("FZPOLL_FILTER_INDICES", "1" if request.param == "indices" else "0")
    netns.cleanup_stale()
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        veth = netns.veth_pair(ns_a, ns_b)
        a, b = netns.wg_pair(ns_a, ns_b, veth, kind_a=netns.Fzpoll, kind_b=netns.Fzpoll)
        ns_a.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
        yield veth, a, b, request.param == "indices"


def _junk_drops(drops: dict[str, int]) -> int:
    return sum(v for k, v in drops.items() if k not in ("unknown_index", "multicast", "no_route"))  # not UDP junk


@pytest.mark.netns
def test_junk_flood_is_dropped_by_the_kernel(pair) -> None:
    veth, a, b, indices = pair
    start = _stats(b.ns, b.ifname)
    assert start["kernel"]["filter"] in ("gro", "exact")
    assert start["kernel"]["receiver_indices_checked"] is indices
    # Good traffic first: full-size (MTU-capped, so not padded to 16) and GSO-coalesced transport.
    netns.transfer(a.ns, b.ns, "100.64.0.2", 4_000_000)
    # A new session (A forgets B and meets it again): B's new receiver index must be let in.
    a.set("peer", b.public_key(), "remove")
    a.add_peer(b.public_key(), ["100.64.0.2/32"], f"{veth.ip_b}:51821")
    a.ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
    before = _stats(b.ns, b.ifname)
    if indices:
        assert before["kernel"]["filter_updates"] > start["kernel"]["filter_updates"]
    assert before["kernel"]["drops"] == start["kernel"]["drops"], "the filter dropped good traffic"
    _flood(a.ns, veth.ip_b, 51821)
    a.ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)  # still works
    after = _stats(b.ns, b.ifname)
    kernel = after["kernel"]["drops"] - before["kernel"]["drops"]
    engine = {k: v - before["drops"].get(k, 0) for k, v in after["drops"].items()}
    assert _junk_drops(engine) == 0, engine  # no bad_type / too_short / ... reached Python
    if indices:  # unknown receiver indices are dropped in the kernel too
        assert kernel >= JUNK + SHAPED and engine.get("unknown_index", 0) == 0, (kernel, engine)
    else:  # what can be WireGuard reaches the engine
        assert kernel >= JUNK and engine.get("unknown_index", 0) == SHAPED, (kernel, engine)


@pytest.mark.netns
def test_filter_off_lets_junk_reach_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = netns.need_root()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("FZPOLL_DISABLE_FILTER", "1")
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        veth = netns.veth_pair(ns_a, ns_b)
        b = netns.Fzpoll(ns_b).start()
        b.configure(netns.genkey(), 51821)
        assert _stats(ns_b, b.ifname)["kernel"]["filter"] == "off"
        _flood(ns_a, veth.ip_b, 51821)
        after = _stats(ns_b, b.ifname)
        assert sum(after["drops"].values()) + after["kernel"]["drops"] >= JUNK
        assert _junk_drops(after["drops"]) > 0


# Captures, on B's veth, the first COUNT B-bound transport datagrams (as A sends them) into OUT.
_CAPTURE = """
import socket, sys
ifname, port, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((ifname, 0)); s.settimeout(20)
print("ready", flush=True)
found = []
while len(found) < count:
    frame, addr = s.recvfrom(65535)
    ip = frame[14:]
    if addr[2] == socket.PACKET_OUTGOING or ip[9] != 17:
        continue
    udp = ip[(ip[0] & 15) * 4:]
    if int.from_bytes(udp[2:4], "big") == port and udp[8:9] == b"\\x04":
        found.append(udp[8:int.from_bytes(udp[4:6], "big")])
open(out, "w").write("\\n".join(d.hex() for d in found))
print(len(found), flush=True)
"""

# Sends the captured datagrams round robin to HOST:PORT for SECONDS; prints how many it sent.
_REPLAY = """
import socket, sys, time
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
pool = [bytes.fromhex(line) for line in open(path).read().split()]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
sent, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    for datagram in pool:
        s.sendto(datagram, (host, port))
    sent += len(pool)
print(sent, flush=True)
"""
# The flood lasts FLOOD_SECONDS whatever the machine's speed: the floors come on within a
# sampling period or two (50 ms each), so most of it must meet them.
CAPTURED, FLOOD_SECONDS = 50, 1.5


def _capture_replays(veth, a, b, path: Path) -> list[str]:
    """B-bound transport datagrams of the current session: the first CAPTURED of 150 pings, so
    the session's newest counter is ~100 ahead of the last captured one."""
    cap = b.ns.popen([sys.executable, "-c", _CAPTURE, veth.if_b, "51821", str(CAPTURED), str(path)],
                     stdout=subprocess.PIPE, text=True)
    assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
    a.ns.run(["ping", "-n", "-q", "-c", "150", "-i", "0.01", "-W", "2", "100.64.0.2"], timeout=30)
    out, _ = cap.communicate(timeout=20)
    assert out.strip() == str(CAPTURED)
    return path.read_text().split()


def _kernel_and_replayed(stats: dict[str, Any]) -> tuple[int, int]:
    return stats["kernel"]["drops"], stats["drops"].get("replayed", 0)


@pytest.mark.netns
def test_replay_flood_is_dropped_by_the_counter_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary traffic never switches the floors on nor loses a datagram to them; a flood of
    replays does, and then most of it is dropped by the kernel, the rest by the engine
    (``replayed``), while the tunnel works on; after the flood the floors go."""
    reason = netns.need_root()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("FZPOLL_FILTER_INDICES", "1")
    netns.cleanup_stale()
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        veth = netns.veth_pair(ns_a, ns_b)
        a, b = netns.wg_pair(ns_a, ns_b, veth, kind_a=netns.Fzpoll, kind_b=netns.Fzpoll)
        ns_a.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
        netns.transfer(ns_a, ns_b, "100.64.0.2", 4_000_000)
        replays = _capture_replays(veth, a, b, tmp_path / "captured")
        before = _stats(ns_b, b.ifname)
        assert before["kernel"]["drops"] == 0 and before["drops"].get("replayed", 0) == 0
        assert before["kernel"]["replay_floods"] == 0 and not before["kernel"]["replay_floors"]
        sent = int(ns_a.run([sys.executable, "-c", _REPLAY, veth.ip_b, "51821", str(tmp_path / "captured"),
                             str(FLOOD_SECONDS)], timeout=60).stdout)
        assert sent >= len(replays) and sent % len(replays) == 0
        ns_a.run(["ping", "-c", "5", "-i", "0.05", "-W", "3", "100.64.0.2"], timeout=20)  # all answered
        during = _stats(ns_b, b.ifname)
        kernel, replayed = (x - y for x, y in zip(_kernel_and_replayed(during), _kernel_and_replayed(before)))
        assert during["kernel"]["replay_floods"] >= 1
        assert kernel + replayed >= sent, (kernel, replayed, sent)  # every replay dropped somewhere
        assert kernel >= sent // 2, (kernel, replayed, sent)  # most of them in the kernel
        deadline = time.monotonic() + 20
        while _stats(ns_b, b.ifname)["kernel"]["replay_floors"]:  # off REPLAY_FLOOD_HOLD after the flood
            assert time.monotonic() < deadline, "the counter floors stayed on after the flood"
            ns_a.run(["ping", "-c", "5", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
        after = _stats(ns_b, b.ifname)
        netns.transfer(ns_a, ns_b, "100.64.0.2", 4_000_000)
        assert _stats(ns_b, b.ifname)["kernel"]["drops"] == after["kernel"]["drops"]


# 200 sessions under a replay flood, in a namespace whose optmem_max is OPTMEM: the floors come
# on, the sessions move on, the floors are refreshed; prints what passes the refreshed program.
_REFRESH = """
import socket, time
from fzpoll.io import sockfilter
optmem = int(open("/proc/sys/net/core/optmem_max").read())
assert optmem == OPTMEM, optmem

class Engine:
    def __init__(self):
        self.indices = {0x9E3779B9 * (i + 1) & 0xFFFFFFFF: 10_000 for i in range(sockfilter.MAX_FILTER_INDICES)}
        self.drops = {}
    def receive_counters(self): return dict(self.indices)
    def live_indices(self): return frozenset(self.indices)
    def index_generation(self): return 0
    def is_under_load(self, now): return False

def counted(index, counter):
    return b"\\x04\\x00\\x00\\x00" + index.to_bytes(4, "little") + counter.to_bytes(8, "little") + bytes(32)

engine = Engine()
control = sockfilter.PrefilterControl(engine, gro=True, check_indices=True)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(("127.0.0.1", 0)); r.setblocking(False)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(r.getsockname())
assert control.set_sockets([r], gro=True)
control(1.0)
engine.drops["replayed"] = 10_000
control(1.05)
assert control.replay.active
engine.indices = dict.fromkeys(engine.indices, 50_000)
control(1.1)
first = next(iter(engine.indices))
for counter in (20_000, 50_000):
    s.send(counted(first, counter))
time.sleep(0.1)
got = []
while True:
    try:
        got.append(int.from_bytes(r.recv(2048)[8:16], "little"))
    except BlockingIOError:
        break
print(control.attached, got)
"""
OPTMEM_OLD_DEFAULT = 20480  # net.core.optmem_max before kernels raised it to 128 KiB


@pytest.mark.netns
def test_floors_refresh_within_an_old_kernels_optmem_max() -> None:
    """The kernel charges the old and the new program to the socket together while it replaces
    one (optmem_max): with 200 floors two programs do not fit in the old default, one does. The
    refresh must still land, not leave the previous floors (and indices) behind."""
    reason = netns.need_root()
    if reason:
        pytest.skip(reason)
    with netns.Namespace("optmem") as ns:
        ns.run(["sysctl", "-q", "-w", f"net.core.optmem_max={OPTMEM_OLD_DEFAULT}"])
        out = ns.python(_REFRESH.replace("OPTMEM", str(OPTMEM_OLD_DEFAULT)), timeout=30).stdout
        assert out.split() == ["True", "[50000]"], out
