"""Interface configuration over rtnetlink (pyroute2): MTU, up, addresses, peer routes.

These run at start-up and when the peer set changes, never per packet, so each call opens and
closes its own ``IPRoute`` socket: no netlink state to keep consistent with the loop. (pyroute2
0.9 drives each request with a private asyncio loop, so do not call these from inside a running
asyncio loop.)

Every failure becomes a :class:`~fzpoll.errors.LocalError` naming the interface and the value.
Adding what is already there (a route of a peer's allowed IPs, an address) is not an error, so a
reconfiguration can simply re-apply the whole set; removing what is absent is not an error either.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import Any, Iterator

from pyroute2 import IPRoute, NetlinkError

from fzpoll.errors import LocalError
from fzpoll.io.linkwatch import NLMSG_ERROR, netlink_messages

_MAIN_TABLE = 254  # RT_TABLE_MAIN


def _index(ipr: IPRoute, ifname: str) -> int:
    """The ifindex of ``ifname``; LocalError if there is no such interface."""
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LocalError(f"no network interface named {ifname!r}")
    return int(found[0])


def _fail(what: str, exc: NetlinkError) -> LocalError:
    reason = errno.errorcode.get(exc.code, str(exc.code))
    hint = " (needs CAP_NET_ADMIN)" if exc.code in (errno.EPERM, errno.EACCES) else ""
    return LocalError(f"{what}: {reason} {exc.args[-1] if exc.args else ''}{hint}".rstrip())


def _family(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def link_exists(ifname: str) -> bool:
    """Whether an interface of that name exists in this network namespace."""
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def set_mtu(ifname: str, mtu: int) -> None:
    """Set the interface MTU (the TUN MTU must leave room for WireGuard's 32-80 B overhead)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        try:
            ipr.link("set", index=index, mtu=int(mtu))
        except NetlinkError as exc:
            raise _fail(f"cannot set MTU {mtu} on {ifname}", exc) from None


def set_up(ifname: str) -> None:
    """Bring the interface administratively up."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        try:
            ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            raise _fail(f"cannot bring {ifname} up", exc) from None


def add_address(ifname: str, cidr: str) -> None:
    """Add an IPv4 or IPv6 address such as ``100.64.0.1/32`` or ``fd00::1/128``; idempotent.

    IPv6 addresses are added with NODAD: on a point-to-point tunnel there is no one to collide
    with, and DAD would leave the address unusable ("tentative") for about a second.
    """
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise LocalError(f"invalid address {cidr!r}: expected ADDRESS/PREFIXLEN") from None
    kwargs: dict[str, Any] = {}
    if iface.version == 6:
        kwargs["flags"] = 0x02  # IFA_F_NODAD
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        try:
            ipr.addr(
                "add",
                index=index,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                family=_family(iface.network),
                **kwargs,
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(f"cannot add address {cidr} to {ifname}", exc) from None



def del_address(ifname: str, cidr: str) -> None:
    """Remove an address added by :func:`add_address`; a missing address is not an error."""
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise LocalError(f"invalid address {cidr!r}: expected ADDRESS/PREFIXLEN") from None
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        try:
            ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                     family=_family(iface.network))
        except NetlinkError as exc:
            if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                raise _fail(f"cannot remove address {cidr} from {ifname}", exc) from None

def _parse_net(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A route destination; host bits are cleared as wg-quick does (10.0.0.1/24 -> 10.0.0.0/24)."""
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise LocalError(f"invalid route {cidr!r}: expected NETWORK/PREFIXLEN") from None


def route_table(route: Any) -> int:
    """A route's table: RTA_TABLE (the header field says 252 for tables above 255)."""
    return int(route.get_attr("RTA_TABLE") or route["table"])


def route_oifs(ipr: IPRoute, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
               table: int = _MAIN_TABLE) -> set[int]:
    """Output interfaces of the routes for exactly ``net`` in ``table``.

    Attributes are read by their netlink names with ``get_attr``: ``msg.get("dst")`` (and
    ``msg.get("RTA_DST")``) resolve them on the pyroute2 of PyPI (0.9) but return None on Debian
    12's 0.7.2. A route without ``RTA_DST`` is the default route; a multipath one has no ``RTA_OIF``.
    """
    oifs: set[int] = set()
    for route in ipr.route("dump", table=table, family=_family(net)):
        if route_table(route) != table:
            continue
        dst = route.get_attr("RTA_DST") or ("0.0.0.0" if net.version == 4 else "::")
        if route["dst_len"] == net.prefixlen and ipaddress.ip_address(dst) == net.network_address:
            oif = route.get_attr("RTA_OIF")
            if oif is not None:
                oifs.add(int(oif))
    return oifs


def add_route(ifname: str, cidr: str) -> None:
    """Route ``cidr`` (a peer's allowed IPs) through ``ifname``, IPv4 or IPv6.

    An identical route already present is fine. A route for the same prefix through another
    interface is an error rather than silently replaced: it usually means a second VPN or a
    misconfigured allowed-IPs. The link must be up first (the kernel answers ENETDOWN).
    """
    net = _parse_net(cidr)
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        try:
            ipr.route("add", dst=str(net), oif=index, family=_family(net))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(f"cannot add route {net} via {ifname}", exc) from None
            if index not in route_oifs(ipr, net):
                raise LocalError(
                    f"cannot add route {net} via {ifname}: a route for it already exists "
                    "through another interface"
                ) from None


def del_route(ifname: str, cidr: str) -> None:
    """Remove the route of ``cidr`` through ``ifname``; a missing route or link is fine."""
    net = _parse_net(cidr)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return  # the link is gone and its routes with it
        try:
            ipr.route("del", dst=str(net), oif=int(found[0]), family=_family(net))
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise _fail(f"cannot delete route {net} via {ifname}", exc) from None


def delete_link(ifname: str) -> None:
    """Delete the interface; one that is already gone is fine (this is a cleanup path)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return
        try:
            ipr.link("del", index=int(found[0]))
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise _fail(f"cannot delete interface {ifname}", exc) from None


# ---------------------------------------------------------------------------------------------
# Routes in batches: one netlink round trip per ROUTE_BATCH routes (pyroute2 costs ~1 ms each,
# 10 s for 10,000 peers). Raw rtnetlink (linux/rtnetlink.h), the messages `ip route` sends.

NETLINK_ROUTE = 0
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
RTA_DST, RTA_OIF, RTA_TABLE = 1, 4, 15
RTPROT_BOOT, RT_SCOPE_LINK, RT_SCOPE_NOWHERE, RTN_UNICAST = 3, 253, 255, 1
ROUTE_BATCH = 256  # ~7 ms a round trip on a small machine


def _rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def _route_message(kind: int, seq: int, table: int, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                   index: int) -> bytes:
    """RTM_NEWROUTE / RTM_DELROUTE of ``net`` through ``index`` in ``table``, as ``ip route``
    sends them (scope link for IPv4 device routes; the table also as RTA_TABLE, for > 255)."""
    add = kind == RTM_NEWROUTE
    flags = NLM_F_REQUEST | NLM_F_ACK | ((NLM_F_CREATE | NLM_F_EXCL) if add else 0)
    scope = RT_SCOPE_NOWHERE if not add else (RT_SCOPE_LINK if net.version == 4 else 0)
    body = struct.pack("=BBBBBBBBI", _family(net), net.prefixlen, 0, 0, table if table < 256 else 0,
                       RTPROT_BOOT if add else 0, scope, RTN_UNICAST if add else 0, 0)
    body += _rtattr(RTA_DST, net.network_address.packed) + _rtattr(RTA_OIF, struct.pack("=I", index))
    body += _rtattr(RTA_TABLE, struct.pack("=I", table))
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _round_trip(sock: socket.socket, messages: list[bytes], first_seq: int) -> dict[int, int]:
    """Send ``messages`` in one write, return {seq: errno (0 = ok)} from the kernel's acks."""
    sock.send(b"".join(messages))
    results: dict[int, int] = {}
    while len(results) < len(messages):
        data = sock.recv(1 << 20)
        for kind, seq, body, end in netlink_messages(data):
            if kind == NLMSG_ERROR and first_seq <= seq < first_seq + len(messages) and end - body >= 4:
                results[seq] = -struct.unpack_from("=i", data, body)[0]
    return results


Route = tuple  # (table, network)


def change_routes(ifname: str, add: list[Route], remove: list[Route]) -> None:
    """Remove, then add, routes ``(table, network)`` through ``ifname``, one netlink round trip
    per ROUTE_BATCH (in the order given). A route to remove that is gone is fine; one to add that
    exists is checked as :func:`fzpoll.up.rules.add_route` does (fine through ``ifname``, an
    error naming the conflict through another interface). Raises LocalError at the first failure.
    """
    for _ in iter_change_routes(ifname, add, remove):
        pass


def iter_change_routes(ifname: str, add: list[Route], remove: list[Route]) -> Iterator[None]:
    """:func:`change_routes` one batch (round trip) per step, so a loop can do one per pass."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    if not found:
        if add:
            raise LocalError(f"no network interface named {ifname!r}")
        return
    index = int(found[0])
    existed: list[Route] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        for kind, routes in ((RTM_DELROUTE, remove), (RTM_NEWROUTE, add)):
            for start in range(0, len(routes), ROUTE_BATCH):
                batch = routes[start:start + ROUTE_BATCH]
                messages = [_route_message(kind, start + i + 1, table, net, index)
                            for i, (table, net) in enumerate(batch)]
                results = _round_trip(sock, messages, start + 1)
                yield
                for i, (table, net) in enumerate(batch):
                    code = results.get(start + i + 1, 0)
                    if kind == RTM_NEWROUTE and code == errno.EEXIST:
                        existed.append((table, net))
                    elif code and not (kind == RTM_DELROUTE and code == errno.ESRCH):
                        verb = "add" if kind == RTM_NEWROUTE else "delete"
                        hint = " (needs CAP_NET_ADMIN)" if code in (errno.EPERM, errno.EACCES) else ""
                        raise LocalError(f"cannot {verb} route {net} dev {ifname} table {table}: "
                                         f"{errno.errorcode.get(code, code)}{hint}")
    from fzpoll.up import rules

    for table, net in existed:  # rare: each is checked with a dump
        rules.add_route(ifname, net, table)
