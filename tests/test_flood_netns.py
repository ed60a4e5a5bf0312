"""A real junk flood at a running daemon (in namespaces): the kernel prefilter drops it, so it is
counted as kernel drops in ``fzpoll show --json``, not as engine drops, and the tunnel works on.
With ``FZPOLL_DISABLE_FILTER=1`` the same junk reaches the engine (and is counted there)."""

from __future__ import annotations

import json
import sys
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
