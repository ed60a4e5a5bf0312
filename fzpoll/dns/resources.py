"""The IO wiring of DNS resources: the client's and the gateway's sans-IO state in the loop.

Neither side adds a step to the loop. Both use its existing seams:

- a *flusher* (runs at the end of every pass, before the writes) takes the control packets the
  engine decrypted (:meth:`Engine.control_packets_received`) and the packets it decrypted for
  TUN; on a gateway, those to a proxy address go to :class:`~fzpoll.gateway.gateway.Gateway`
  (and come out translated, for TUN), on a client an "administratively prohibited" error from
  the gateway goes to :class:`~fzpoll.gateway.client.ResourceClient`; everything else is queued
  back for TUN unchanged. Then it sends what the sans-IO objects produced: control packets with
  :meth:`Engine.send_to_peer`, packets for the tunnel with :meth:`Engine.send`, packets for TUN
  with :meth:`Datapath.queue_tun`.
- the datapath's *interceptor* for TUN packets (by exact destination): on a client the proxy
  addresses handed out (held until the gateway says Active), on a gateway the tunnel addresses
  of clients with NAT sessions (replies, translated back before encryption). The DNS stub's
  sentinels keep their own interceptor, chained first.
- a *timer source* each, and on a gateway one fresh UDP socket per lookup query
  (:class:`~fzpoll.dns.sockets.QuerySockets`).
"""

from __future__ import annotations

import logging
from typing import Callable

from fzpoll.dns.forwarder import DnsForwarder
from fzpoll.dns.sockets import QuerySockets
from fzpoll.dns.stub import Resource
from fzpoll.errors import LocalError
from fzpoll.gateway.client import ResourceClient
from fzpoll.gateway.control import EventType
from fzpoll.gateway.gateway import Gateway, is_proxy_address
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PublicKey

log = logging.getLogger("fzpoll.dns.resources")

DEFAULT_MAX_LOOKUP_SOCKETS = 512


def _destination(packet: bytes) -> bytes:
    return packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]


class ResourcesIO:
    """Runs a :class:`ResourceClient` (if ``client``) and a :class:`Gateway` (if ``gateway``)
    on ``loop`` and ``datapath`` (and its engine); ``dns`` is the stub's forwarder on a client."""

    def __init__(self, loop: Loop, datapath: Datapath, *, dns: DnsForwarder | None = None,
                 client: ResourceClient | None = None, gateway: Gateway | None = None) -> None:
        self.loop = loop
        self.datapath = datapath
        self.engine: Engine = datapath.engine
        self.dns = dns
        self.client = client
        self.gateway = gateway
        self._sentinel_intercept: Callable[[bytes, float], bool] | None = datapath.intercept
        self._v4: set[bytes] = set(datapath.intercept_v4)
        self._v6: set[bytes] = set(datapath.intercept_v6)
        # sets, not frozensets: they grow as proxy addresses and NAT clients appear
        datapath.set_intercept(self._intercept, self._v4, self._v6)  # type: ignore[arg-type]
        loop.add_flusher(self.flush)
        self._lookup_sockets: QuerySockets | None = None
        if client is not None:
            if dns is None:
                raise LocalError("DNS resources on a client need the DNS stub")
            dns.on_resource_answer = self._on_resource_answer
            loop.add_timer_source(client.next_deadline, client.handle_timer)
        if gateway is not None:
            self._lookup_sockets = QuerySockets(
                loop, on_reply=lambda data, addr, now: gateway.handle_lookup_reply(data, addr, now),
                is_pending=gateway.lookups.is_pending, max_sockets=DEFAULT_MAX_LOOKUP_SOCKETS)
            loop.add_timer_source(gateway.next_deadline, self._gateway_timer)

    # ----------------------------------------------------------------------------- client

    def _on_resource_answer(self, name: str, resource: Resource, addresses: tuple, now: float) -> None:
        assert self.client is not None
        self.client.on_query(name, resource.pattern, resource.peer_key, tuple(addresses), now)
        for address in addresses:
            (self._v4 if address.version == 4 else self._v6).add(address.packed)

    # ----------------------------------------------------------------------------- TUN -> us

    def _intercept(self, packet: bytes, now: float) -> bool:
        """A TUN packet to an address of ours (see the module doc); True if consumed."""
        sentinel = self._sentinel_intercept
        if sentinel is not None and sentinel(packet, now):
            return True
        client, gateway = self.client, self.gateway
        if client is not None:
            dst = _destination(packet)
            if client.is_proxy(dst):
                ready = client.handle_outgoing(packet, dst, now)
                if ready is not None:
                    self.engine.send(ready, now)
                return True
        if gateway is not None:
            translated = gateway.handle_from_tun(packet, now)
            if translated is not None:
                self.engine.send(translated, now)
                return True
        return False

    # ----------------------------------------------------------------------------- each pass

    def flush(self, now: float) -> None:
        engine = self.engine
        for key, packet in engine.control_packets_received():
            peer = key.base64()
            to_client = len(packet) > 40 and packet[40] == EventType.DOMAIN_STATUS
            if self.client is not None and (to_client or self.gateway is None):
                self.client.handle_control(peer, packet, now)
            elif self.gateway is not None:
                self.gateway.handle_control(peer, packet, now)
        if self.gateway is not None or self.client is not None:
            self._filter_decrypted(now)
        self._send_outputs(now)

    def _filter_decrypted(self, now: float) -> None:
        packets = self.engine.packets_for_tun()
        if not packets:
            return
        kept: list[bytes] = []
        gateway, client = self.gateway, self.client
        for packet in packets:
            if gateway is not None and is_proxy_address(_destination(packet)):
                src = packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]
                peer = self.engine.peer_for(src)  # the engine checked it is the sender
                if peer is not None:
                    gateway.handle_from_peer(peer.public_key.base64(), packet, now)
                    (self._v4 if len(src) == 4 else self._v6).add(src)  # its replies come back
                continue
            if client is not None and client.handle_incoming(packet, now):
                continue
            kept.append(packet)
        self.datapath.queue_tun(kept)

    def _send_outputs(self, now: float) -> None:
        engine = self.engine
        if self.gateway is not None:
            self._send_lookups()
        for side in (self.client, self.gateway):
            if side is None:
                continue
            if side.to_peers:
                out, side.to_peers = side.to_peers, []
                for peer_key, packet in out:
                    self._send_control(peer_key, packet, now)
            if side.to_tunnel:
                out, side.to_tunnel = side.to_tunnel, []
                for packet in out:
                    engine.send(packet, now)
            if side.to_tun:
                out, side.to_tun = side.to_tun, []
                self.datapath.queue_tun(out)

    def _send_control(self, peer_key: str, packet: bytes, now: float) -> None:
        try:
            peer = self.engine.get_peer(PublicKey.from_text(peer_key))
        except LocalError:
            peer = None
        if peer is None:
            log.warning("control packet for a peer that is not configured")
            return
        self.engine.send_to_peer(peer, packet, now)

    # ----------------------------------------------------------------------------- gateway lookups

    def _send_lookups(self) -> None:
        gateway, sockets = self.gateway, self._lookup_sockets
        assert gateway is not None and sockets is not None
        lookups = gateway.lookups
        while lookups.queries:
            queries, lookups.queries = lookups.queries, []
            for query in queries:
                if not sockets.send(query.query_id, query.data, query.server):
                    gateway.lookup_failed(query.query_id)
        sockets.sweep()

    def _gateway_timer(self, now: float) -> None:
        assert self.gateway is not None
        self.gateway.handle_timer(now)
        self._send_outputs(now)

    def stats(self) -> dict:
        """Counters for ``fzpoll show``."""
        out: dict = {}
        if self.client is not None:
            out["client"] = {"drops": dict(self.client.drops), "stats": dict(self.client.stats)}
        if self.gateway is not None:
            gateway = self.gateway
            out["gateway"] = {
                "drops": dict(gateway.drops + gateway.nat.drops + gateway.lookups.drops),
                "stats": dict(gateway.stats + gateway.lookups.stats),
                "nat_sessions": len(gateway.nat),
                "lookups_in_flight": gateway.lookups.in_flight,
            }
        return out

    def close(self) -> None:
        if self._lookup_sockets is not None:
            self._lookup_sockets.close()

