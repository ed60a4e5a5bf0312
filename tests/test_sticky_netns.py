"""Roaming and sticky source addresses end to end: fzpoll against real peers in namespaces.

Our side (fzpoll, namespace "ours") has two addresses of each family on one link, 10.0.0.1 and
10.0.0.2, fd00:aa::1 and fd00:aa::2; the peer (namespace "peer") is 10.0.0.3 / fd00:aa::3.
- Sticky: the peer sets its endpoint to each of our addresses in turn and pings through the
  tunnel; since every peer roams to the source of what it receives, its endpoint stays the
  address it chose only if we answer from that address (the kernel alone would answer from the
  link's preferred address). Then that address is deleted: our next packet cannot go from it, and
  traffic goes on from the remaining one (the peer roams there).
- Roaming: a packet that authenticates but whose inner source belongs to another peer (a more
  specific allowed IP) is not delivered, yet moves the endpoint, as in the kernel and wireguard-go.
"""

from __future__ import annotations

import json
import sys

import pytest

from netns import Fzpoll, Namespace, UpstreamWireguardGo, WireguardGo, genkey, pubkey, transfer, veth_pair

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go")]

PEERS = [
    pytest.param(WireguardGo, id="debian-wireguard-go"),
    pytest.param(UpstreamWireguardGo, id="upstream-wireguard-go", marks=pytest.mark.needs("wireguard-go-upstream")),
    pytest.param(Fzpoll, id="fzpoll"),
]
OUR_PORT, PEER_PORT = 51820, 51821


def ping(ns: Namespace, address: str, source: str | None = None, count: int = 2) -> bool:
    extra = ["-I", source] if source else []
    result = ns.run(["ping", "-c", str(count), "-i", "0.2", "-W", "2", *extra, address], check=False, timeout=20)
    return result.returncode == 0


def endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Bed:
    """fzpoll in ``ours`` (10.0.0.1 and .2, fd00:aa::1 and ::2 on one link) and ``kind`` in
    ``peer`` (10.0.0.3, fd00:aa::3); tunnel addresses 100.64.0.1 (ours) and 100.64.0.2."""

    def __init__(self, ours: Namespace, peer: Namespace, kind: type) -> None:
        self.ns_ours, self.ns_peer = ours, peer
        self.link = veth_pair(ours, peer, "10.0.0.1/24", "10.0.0.3/24", "fd00:aa::1/64", "fd00:aa::3/64")
        ours.ip("addr", "add", "10.0.0.2/24", "dev", self.link.if_a)
        ours.ip("addr", "add", "fd00:aa::2/64", "dev", self.link.if_a, "nodad")
        self.ours, self.peer = Fzpoll(ours).start(), kind(peer).start()
        key_ours, key_peer = genkey(), genkey()
        self.key_ours, self.key_peer = pubkey(key_ours), pubkey(key_peer)
        self.ours.configure(key_ours, OUR_PORT)
        self.peer.configure(key_peer, PEER_PORT)
        self.ours.add_peer(self.key_peer, ["100.64.0.2/32"])  # no endpoint: it learns ours from the peer
        self.peer.add_peer(self.key_ours, ["100.64.0.1/32"], endpoint("10.0.0.1", OUR_PORT))
        for wg, mine, theirs in ((self.ours, "1", "2"), (self.peer, "2", "1")):
            wg.address(f"100.64.0.{mine}/32")
            wg.up()
            wg.route(f"100.64.0.{theirs}/32")

    def peer_sees(self) -> str | None:
        """Our endpoint as the peer's ``wg show`` has it."""
        return self.peer.wg_show_dump().peer(self.key_ours).endpoint

    def we_see(self) -> str | None:
        return self.ours.wg_show_dump().peer(self.key_peer).endpoint

    def logs(self) -> str:
        return f"--- ours ---\n{self.ours.log()[-3000:]}\n--- peer ---\n{self.peer.log()[-3000:]}"


FAMILIES = {"IPv4": ("10.0.0.1", "10.0.0.2", "10.0.0.3", "/24"),
            "IPv6": ("fd00:aa::1", "fd00:aa::2", "fd00:aa::3", "/64")}


# One family per daemon pair: upstream wireguard-go (f333402) cannot switch an endpoint from
# IPv4 to IPv6 (a reused address buffer in its Send; its own tests/netns.sh stops there too).
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", PEERS)
def test_replies_come_from_the_address_the_peer_used_and_move_when_it_goes(kind, family):
    first, second, theirs, prefix = FAMILIES[family]
    with Namespace("ours") as ours, Namespace("peer") as peer:
        bed = Bed(ours, peer, kind)
        try:
            for address in (first, second, first, second):
                bed.peer.set("peer", bed.key_ours, "endpoint", endpoint(address, OUR_PORT))
                assert ping(peer, "100.64.0.1"), f"no ping through the tunnel via {address}"
                assert bed.peer_sees() == endpoint(address, OUR_PORT), "answered from another address"
            assert bed.we_see() == endpoint(theirs, PEER_PORT)
            transfer(ours, peer, "100.64.0.2", 1 << 20)  # bursts: GSO runs carry the source too
            assert bed.peer_sees() == endpoint(second, OUR_PORT)
            # The address we are sticky to goes: our next packet is sent from the other one.
            ours.ip("addr", "del", second + prefix, "dev", bed.link.if_a)
            assert ping(ours, "100.64.0.2"), f"nothing went through once {second} was deleted"
            assert bed.peer_sees() == endpoint(first, OUR_PORT)
            assert ping(peer, "100.64.0.1") and bed.peer_sees() == endpoint(first, OUR_PORT)
        except AssertionError:
            print(bed.logs())
            raise


def fzpoll_drops(ns: Namespace, ifname: str) -> dict[str, int]:
    out = ns.run([sys.executable, "-m", "fzpoll", "show", ifname, "--json"]).stdout
    (iface,) = json.loads(out)["interfaces"]
    return iface["stats"]["drops"]


@pytest.mark.parametrize("kind", PEERS[:2])
def test_a_packet_refused_by_cryptokey_routing_still_moves_the_endpoint(kind):
    with Namespace("ours") as ours, Namespace("peer") as peer:
        bed = Bed(ours, peer, kind)
        try:
            # A second peer of ours holds 100.64.0.99: the first peer may not send from it.
            bed.ours.add_peer(pubkey(genkey()), ["100.64.0.99/32"])
            bed.peer.address("100.64.0.99/32")
            bed.ours.set("peer", bed.key_peer, "endpoint", endpoint("10.0.0.3", PEER_PORT))
            assert ping(ours, "100.64.0.2")  # the session; the peer answers with data: no keepalive due
            assert bed.we_see() == endpoint("10.0.0.3", PEER_PORT)
            before = fzpoll_drops(ours, bed.ours.ifname).get("not_allowed_source", 0)
            # The peer moves to another address and port; the route's source makes it send from there.
            peer.ip("addr", "add", "10.0.0.4/24", "dev", bed.link.if_b)
            peer.ip("route", "replace", "10.0.0.1/32", "dev", bed.link.if_b, "src", "10.0.0.4")
            bed.peer.set("listen-port", str(PEER_PORT + 100))
            # Its first packets from there carry the other peer's source: dropped, not answered...
            assert not ping(peer, "100.64.0.1", source="100.64.0.99", count=2)
            assert fzpoll_drops(ours, bed.ours.ifname).get("not_allowed_source", 0) - before == 2
            # ...and yet they moved the endpoint.
            assert bed.we_see() == endpoint("10.0.0.4", PEER_PORT + 100)
            assert ping(ours, "100.64.0.2")  # we reach it there
        except AssertionError:
            print(bed.logs())
            raise
