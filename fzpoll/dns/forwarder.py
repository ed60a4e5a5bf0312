"""The IO shell of the DNS stub: its upstream sockets, served by the same loop as the tunnel.

The sans-IO :class:`~fzpoll.dns.stub.StubResolver` decides everything; this module only moves bytes:
queries to sentinels are intercepted from the TUN batch, recursive queries go out each from its
own fresh UDP socket, i.e. a random source port (:mod:`fzpoll.dns.sockets`; answers are "DNS
server replies", a source of the loop), truncated answers are retried over non-blocking TCP, and answers go back to TUN in the
same pass. Proxy addresses handed out for resources are routed to the resource's peer.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket

from typing import Callable

from fzpoll.dns.shaper import DnsRateLimit
from fzpoll.dns.sockets import QuerySockets
from fzpoll.dns.tcpserver import TcpDnsServer
from fzpoll.dns.stub import Resource, StubResolver, UpstreamQuery
from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PublicKey
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop

log = logging.getLogger("fzpoll.dns.stub")

# Under a sustained query flood (more than DNS_OVERLOAD_QUERIES reached the stub in the last
# DNS_OVERLOAD_WINDOW seconds), the stub parses only MAX_QUERIES_PER_PASS queries per pass and the
# rest are dropped (counted dns_shed) until a window brings fewer. A query costs ~60 us (dnslib)
# against ~2 us to drop it. Queries share the TUN device's ring (txqueuelen packets) with the
# tunnel's traffic, and shedding here comes after the ring: what keeps a local flood from filling
# it is the kernel's rate limit on the sentinels (fzpoll.dns.shaper, 1,000 queries/s); this
# shedding is the fallback where the kernel cannot. A burst (an application's 1000 queries at
# once) is answered whole; a client that sustains more than 4,000 queries/s is shed.
MAX_QUERIES_PER_PASS = 8
DNS_OVERLOAD_WINDOW = 0.5
DNS_OVERLOAD_QUERIES = 2000
MAX_TCP_ANSWER = 65535
_PROTO_TCP = 6


class _TcpQuery:
    """One recursive query retried over TCP: connect, write the framed query, read the answer."""

    __slots__ = ("query", "sock", "out", "inbuf")

    def __init__(self, query: UpstreamQuery, sock: socket.socket) -> None:
        self.query = query
        self.sock = sock
        self.out = memoryview(query.data)
        self.inbuf = bytearray()


class DnsForwarder:
    """Plugs a StubResolver into a Loop and a Datapath and routes proxy addresses through its Engine."""

    def __init__(self, stub: StubResolver, loop: Loop, datapath: Datapath) -> None:
        self.stub = stub
        self.loop = loop
        self.datapath = datapath
        self.engine = datapath.engine
        self._udp = QuerySockets(loop, on_reply=self._on_udp_reply, is_pending=stub.is_pending)
        # Called with (name, resource, proxy addresses) for every answer to a resource name.
        self.on_resource_answer: Callable[[str, Resource, tuple, float], None] | None = None
        self._tcp: dict[int, _TcpQuery] = {}  # fd -> query
        self._sentinels = frozenset(s.packed for s in stub.sentinels)
        self._queries = 0  # intercepted in this pass
        self._window_queries = 0  # intercepted since _window_start
        self._window_start = 0.0
        self.shedding = False
        self.kernel_limit: DnsRateLimit | None = None  # the daemon's (fzpoll.dns.shaper), for the stats
        datapath.set_intercept(self._intercept,
                               frozenset(s.packed for s in stub.sentinels if s.version == 4),
                               frozenset(s.packed for s in stub.sentinels if s.version == 6))
        loop.add_flusher(self.flush)
        loop.add_timer_source(stub.next_deadline, self._on_timer)
        self.tcp_server = TcpDnsServer()
        loop.add_timer_source(self.tcp_server.next_deadline, self.tcp_server.handle_timer)

    def set_kernel_limit(self, ifname: str, rate: int, problem: str | None) -> None:
        """What the configuration child did about the kernel's limit on the sentinels."""
        self.kernel_limit = DnsRateLimit(ifname, rate, problem)

    def stats(self) -> dict:
        """The stub's counters for ``get=fzpoll``, with the kernel limit's (``kernel``)."""
        stub, tcp = self.stub, self.tcp_server
        out = {"in_flight": stub.in_flight, "drops": dict(stub.drops + tcp.drops),
               "stats": dict(stub.stats + tcp.stats), "tcp_connections": len(tcp)}
        if self.kernel_limit is not None:
            out["kernel"] = self.kernel_limit.stats()
        return out

    def _intercept(self, packet: bytes, now: float) -> bool:
        """A TUN packet to one of our addresses: ours (True) only if it is to a sentinel; the
        DNS resources chain their proxy addresses through here, and their traffic is neither
        counted as queries nor shed."""
        v4 = packet[0] >> 4 == 4
        if (packet[16:20] if v4 else packet[24:40]) not in self._sentinels:
            return False
        self._queries += 1
        self._window_queries += 1
        if self.shedding and self._queries > MAX_QUERIES_PER_PASS:
            self.stub.count_drop(D.DNS_SHED)
            return True
        if packet[9 if v4 else 6] == _PROTO_TCP:
            self.tcp_server.handle_segment(packet, now)
            return True
        return self.stub.handle_packet(packet, now)

    def _end_pass(self, now: float) -> None:
        self._queries = 0
        if now - self._window_start >= DNS_OVERLOAD_WINDOW:
            self.shedding = self._window_queries > DNS_OVERLOAD_QUERIES
            self._window_queries = 0
            self._window_start = now

    # ------------------------------------------------------------------ recursive queries out

    def flush(self, now: float) -> None:
        self._end_pass(now)
        stub, tcp = self.stub, self.tcp_server
        if tcp.queries:
            queries, tcp.queries = tcp.queries, []
            for ident, message, client, sentinel in queries:
                port = tcp.client_port(ident)
                if port is not None:
                    stub.handle_tcp_query(ident, message, client, port, sentinel, now)
        if stub.tcp_answers:
            answers, stub.tcp_answers = stub.tcp_answers, []
            for ident, message in answers:
                tcp.send_answer(ident, message, now)
        if tcp.to_tun:
            packets, tcp.to_tun = tcp.to_tun, []
            self.datapath.queue_tun(packets)
        if stub.udp_queries:
            queries, stub.udp_queries = stub.udp_queries, []
            for query in queries:
                self._send_udp(query, now)
        if stub.tcp_queries:
            queries, stub.tcp_queries = stub.tcp_queries, []
            for query in queries:
                self._start_tcp(query, now)
        if stub.expired_proxies:
            expired, stub.expired_proxies = stub.expired_proxies, []
            for address in expired:
                self.engine.remove_allowed_ip(ipaddress.ip_network(address))
        if stub.new_proxies:
            proxies, stub.new_proxies = stub.new_proxies, []
            for address, resource in proxies:
                self._route_proxy(address, resource)
        if stub.resource_answers:
            answers, stub.resource_answers = stub.resource_answers, []
            if self.on_resource_answer is not None:
                for name, resource, addresses in answers:
                    self.on_resource_answer(name, resource, addresses, now)
        if stub.to_tun:
            packets, stub.to_tun = stub.to_tun, []
            self.datapath.queue_tun(packets)

    def _send_udp(self, query: UpstreamQuery, now: float) -> None:
        # EAGAIN included: a query that cannot leave now fails now rather than waiting unbounded
        if not self._udp.send(query.query_id, query.data, query.server):
            self.stub.upstream_failed(query.query_id, now)

    def _on_udp_reply(self, data: bytes, addr: tuple, now: float) -> None:
        self.stub.handle_upstream_reply(data, now, source=addr)

    # ------------------------------------------------------------------ TCP fallback

    def _start_tcp(self, query: UpstreamQuery, now: float) -> None:
        host, port = query.server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.stub.upstream_failed(query.query_id, now)
            return
        tcp = _TcpQuery(query, sock)
        self._tcp[sock.fileno()] = tcp
        self.loop.add_writer(sock.fileno(), lambda now, t=tcp: self._tcp_writable(t, now))

    def _tcp_writable(self, tcp: _TcpQuery, now: float) -> None:
        try:
            sent = tcp.sock.send(tcp.out)
        except BlockingIOError:
            return
        except OSError:
            self._tcp_done(tcp, now, None)
            return
        tcp.out = tcp.out[sent:]
        if not tcp.out:
            fd = tcp.sock.fileno()
            self.loop.remove_writer(fd)
            self.loop.add_reader(fd, lambda now, t=tcp: self._tcp_readable(t, now))

    def _tcp_readable(self, tcp: _TcpQuery, now: float) -> None:
        try:
            chunk = tcp.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._tcp_done(tcp, now, None)
            return
        if not chunk:
            self._tcp_done(tcp, now, None)
            return
        tcp.inbuf += chunk
        if len(tcp.inbuf) >= 2:
            need = int.from_bytes(tcp.inbuf[:2], "big")
            if len(tcp.inbuf) >= 2 + need:
                self._tcp_done(tcp, now, bytes(tcp.inbuf[2 : 2 + need]))

    def _tcp_done(self, tcp: _TcpQuery, now: float, answer: bytes | None) -> None:
        self._close_tcp(tcp)
        if answer is None:
            self.stub.upstream_failed(tcp.query.query_id, now)
        else:
            self.stub.handle_upstream_reply(answer, now, via_tcp=True)

    def _on_timer(self, now: float) -> None:
        self.stub.handle_timer(now)
        self._udp.sweep()
        for tcp in list(self._tcp.values()):
            if not self.stub.is_pending(tcp.query.query_id):  # timed out: SERVFAIL already sent
                self._close_tcp(tcp)

    def _close_tcp(self, tcp: _TcpQuery) -> None:
        """Take the query's socket out of the loop, then close it."""
        fd = tcp.sock.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self._tcp.pop(fd, None)
        tcp.sock.close()

    # ------------------------------------------------------------------ routing proxies

    def _route_proxy(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, resource: Resource) -> None:
        try:
            peer = self.engine.get_peer(PublicKey.from_text(resource.peer_key))
        except LocalError:
            peer = None
        if peer is None:
            log.warning("resource peer not configured", extra={"fields": {"resource": resource.pattern}})
            return
        self.engine.add_allowed_ip(peer, ipaddress.ip_network(address))

    def reroute_proxies(self) -> None:
        """Route every proxy address handed out to its resource's peer again (a reload replaced
        the peers' allowed IPs with the file's, which does not list them)."""
        for address, resource in self.stub.proxy_routes():
            self._route_proxy(address, resource)

    def close(self) -> None:
        for tcp in list(self._tcp.values()):
            self._close_tcp(tcp)
        self._udp.close()
        self._tcp.clear()


def upstreams_from(dns: list[str] | tuple, resolv_conf: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The configured DNS servers, else the nameservers of resolv.conf."""
    servers = [str(ip) for ip in dns]
    if not servers:
        try:
            with open(resolv_conf) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0] == "nameserver":
                        servers.append(parts[1].split("%")[0])
        except OSError:
            pass
    return [(server, 53) for server in servers]


def make_stub(dns: list, resources: list[Resource], resolv_conf: str = "/etc/resolv.conf") -> StubResolver:
    upstreams = upstreams_from(dns, resolv_conf)
    if not upstreams:
        raise LocalError("DNS stub: no upstream servers (set DNS = in the config)")
    return StubResolver(upstreams, resources)




def write_resolv_conf(stub: StubResolver, path: str, search: tuple[str, ...] | list[str] = ()) -> None:
    """Write the sentinels, and the config's search domains (``DNS =`` entries that are not
    addresses), as a resolv.conf file: what wg-quick hands ``resolvconf -a IFACE -m 0 -x``."""
    with open(path, "w") as f:
        f.write("# written by fzpoll: DNS through the tunnel's stub resolver\n")
        for sentinel in stub.sentinels:
            f.write(f"nameserver {sentinel}\n")
        if search:
            f.write(f"search {' '.join(search)}\n")
