"""fzpoll as a daemon in network namespaces, against wireguard-go and against itself.

Each side is started as `PROGRAM -f IFNAME` and configured only with `wg`, as wireguard-go's own
interop script does. Checks ping (the first one too: handshake on demand) and a TCP transfer both
ways, IPv4 and IPv6 inside the tunnel.
"""

from __future__ import annotations


import json
import sys

import pytest

from helpers import skip_unless
from netns import (Fzpoll, FzpollNoOffload, FzpollSodiumBundled, FzpollSodiumSystem, FzpollTso, Namespace,
                   UpstreamWireguardGo, WireguardGo, transfer, veth_pair, wg_pair)

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go")]



def daemon_stats(daemon: Fzpoll) -> dict:
    """What an fzpoll daemon says of itself (``fzpoll show --json``)."""
    out = daemon.ns.run([sys.executable, "-m", "fzpoll", "show", "--json", daemon.ifname]).stdout
    return json.loads(out)["interfaces"][0]["stats"]["daemon"]


def tun_offloads(daemon: Fzpoll) -> list[str]:
    """The TUN offloads an fzpoll daemon reports."""
    return daemon_stats(daemon)["tun_offloads"]


def ping(ns: Namespace, address: str, count: int = 3) -> None:
    flag = ["-6"] if ":" in address else []
    result = ns.run(["ping", *flag, "-c", str(count), "-i", "0.2", "-W", "3", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


# TUN offloads (issue 16): fzpoll with them (coalesced writes) against Debian's wireguard-go (no
# offloads), itself, upstream wireguard-go (TSO/USO too); fzpoll reading TSO super-packets against
# upstream and against fzpoll with TUN offloads switched off.
KINDS = {
    "fzpoll-wggo": (Fzpoll, WireguardGo),
    "fzpoll-fzpoll": (Fzpoll, Fzpoll),
    "fzpoll-upstream": (Fzpoll, UpstreamWireguardGo),
    "tso-upstream": (FzpollTso, UpstreamWireguardGo),
    "tso-nooffload": (FzpollTso, FzpollNoOffload),
    # which libsodium seals (FZPOLL_SODIUM): the shared system one against PyNaCl's own
    "sodium-system-bundled": (FzpollSodiumSystem, FzpollSodiumBundled),
}


@pytest.mark.parametrize("kinds", list(KINDS.values()), ids=list(KINDS))
def test_tunnel_ping_and_tcp_both_ways(kinds):
    if UpstreamWireguardGo in kinds:
        skip_unless("wireguard-go-upstream")
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b = wg_pair(ns_a, ns_b, pair, kind_a=kinds[0], kind_b=kinds[1])
        assert a.vnet_hdr() is (kinds[0] is not FzpollNoOffload)  # offloads on unless switched off
        assert b.vnet_hdr() is (kinds[1] not in (WireguardGo, FzpollNoOffload))
        if kinds[0] is FzpollTso:  # the kernel was asked for TSO: reads are super-packets to split
            assert "tso4" in tun_offloads(a)
        if kinds[0] is FzpollSodiumSystem:  # as asked, whether PyNaCl links it (Debian) or not (PyPI)
            assert daemon_stats(a)["sodium"]["kind"] == "system"
            assert daemon_stats(b)["sodium"]["via"] == "pynacl"
        try:
            ping(ns_a, "100.64.0.2", count=1)  # the very first ping: handshake on demand
            ping(ns_b, "100.64.0.1")
            ping(ns_a, "fd00:64::2")
            ping(ns_b, "fd00:64::1")
            transfer(ns_a, ns_b, "100.64.0.2", 2 << 20)
            transfer(ns_b, ns_a, "100.64.0.1", 2 << 20)
            transfer(ns_a, ns_b, "fd00:64::2", 1 << 20)
            transfer(ns_b, ns_a, "fd00:64::1", 1 << 20)
            dump = a.wg_show_dump()
            (peer,) = dump.peers
            assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0
        except AssertionError:
            print("--- a log ---\n" + a.log()[-4000:] + "\n--- b log ---\n" + b.log()[-4000:])
            raise
