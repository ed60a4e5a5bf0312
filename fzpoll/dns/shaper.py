"""A kernel rate limit on the DNS stub's sentinel addresses, in the TUN device's qdisc.

Queries to the sentinels reach us through the TUN device, in the same kernel ring (txqueuelen
packets) as every other packet the tunnel carries. The TUN driver (drivers/net/tun.c, checked on
6.18) never stops its netdev queue: when the ring is full it drops (``tx_dropped``) whatever comes,
so a qdisc before it holds nothing and a fair one (fq_codel, if the kernel had it) cannot help. A
local process flooding the stub kept the ring full and the tunnel's own packets (echo replies to a
peer's pings) were dropped before the daemon could read them; shedding in Python comes too late.

So the flood is kept out of the ring: the root qdisc (the kernel's default; one a user or another
tool set is left alone, with a warning) becomes HTB (handle ``53:``), whose
unclassified traffic goes through its direct queue unshaped, and a u32 filter per family puts
packets to the sentinel ranges into a class (``53:53``) limited to :data:`DNS_QUERY_RATE` packets/s
(HTB counts every packet as at least :data:`DNS_MPU` bytes, so its byte rate is a packet rate for
queries) with a bucket of :data:`DNS_QUERY_BURST` queries (a burst of a thousand at once passes
whole, as before). Under it, :data:`SOURCE_BUCKETS` classes by the low bits of the source port,
each with its share of the rate, the whole rate when the others are idle, and a fifo of
:data:`DNS_QUEUE` packets: a flood from a few sockets fills only its own buckets, and other
clients' queries (a stub resolver asks from a fresh port each time) still get through. Beyond
that the kernel drops in the flooding process's own send, counted in the classes (read back by
:func:`read_class_stats` without pyroute2, for ``fzpoll show``). A flood from many ports gets the
rate and no more: the tunnel's own packets are safe either way.

:func:`install` runs in the configuration child (pyroute2, see :mod:`fzpoll.up.forked`) that
routes the sentinels, the first time it does; a kernel without HTB or u32 gets a warning and the
stub works as without the limit (its own shedding, fzpoll.dns.forwarder, is then all there is). Nothing needs removing: the qdisc goes with the
TUN device, which the kernel deletes when the daemon closes it (``fzpoll down``, exit, a failed
start; a persistent device keeps it, and the next daemon's install replaces it). ``FZPOLL_DNS_RATE=0`` turns it off (benchmarks), another value replaces the rate.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from typing import Any, Iterable

from fzpoll.io.linkwatch import NLMSG_DONE, NLMSG_ERROR, netlink_messages, rtattrs

log = logging.getLogger("fzpoll.dns.shaper")

DNS_QUERY_RATE = 1000  # packets/s to the sentinels: far above a host's resolver, far below a flood
DNS_QUERY_BURST = 1000  # queries passed at once after a quiet second (an application's burst)
DNS_QUEUE = 8  # packets per source bucket waiting for the rate (at most 128 ms in all); more are dropped
DNS_MPU = 512  # bytes a packet counts for at least: a UDP DNS query without EDNS fits in 512
SOURCE_BUCKETS = 16  # classes by the source port's low bits: a flood from a few sockets fills only its own
QDISC_HANDLE = 0x530000  # 53:
CLASS_ID = 0x530053  # 53:53, the rate of all queries together
BUCKET_MINOR = 0x100  # 53:100 .. 53:10f, one per source bucket
LEAF_MAJOR = 0x100  # 100: .. 10f:, the buckets' fifos
ENV_RATE = "FZPOLL_DNS_RATE"

# <linux/rtnetlink.h>, <linux/pkt_sched.h>, <linux/gen_stats.h>: stable kernel ABI.
RTM_NEWTCLASS = 40
RTM_GETTCLASS = 42
NLM_F_REQUEST = 0x1
TC_H_ROOT = 0xFFFFFFFF
NLM_F_DUMP = 0x300
TCA_STATS2 = 7
TCA_STATS_BASIC = 1
TCA_STATS_QUEUE = 3
_NLMSGHDR = struct.Struct("=IHHII")
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_BASIC = struct.Struct("=QI")  # bytes, packets
_QUEUE = struct.Struct("=IIIII")  # qlen, backlog, drops, requeues, overlimits
_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD
_DST_OFFSET = {4: 16, 6: 24}  # of the destination address in the IP header
_PROTOCOL = {4: _ETH_P_IP, 6: _ETH_P_IPV6}
_TRANSPORT_OFFSET = {4: 20, 6: 40}


def configured_rate() -> int:
    """:data:`DNS_QUERY_RATE`, or ``$FZPOLL_DNS_RATE`` (0: no kernel limit); anything but a whole
    number is a warning and the default (``isdigit`` alone takes "²", which ``int`` refuses)."""
    value = os.environ.get(ENV_RATE, "").strip()
    if value.isascii() and value.isdigit():
        return int(value)
    if value:
        log.warning(f"{ENV_RATE} ignored: not a whole number of queries per second (0: no limit)",
                    extra={"fields": {"value": value, "queries_per_second": DNS_QUERY_RATE}})
    return DNS_QUERY_RATE


def u32_keys(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[str]:
    """pyroute2's u32 keys (``value/mask+offset``, 32-bit words) matching a destination in
    ``network``; whole-zero words of the mask are left out."""
    address = network.network_address.packed
    mask = network.netmask.packed
    keys = []
    for word in range(len(address) // 4):
        m = int.from_bytes(mask[4 * word:4 * word + 4], "big")
        if m:
            value = int.from_bytes(address[4 * word:4 * word + 4], "big")
            keys.append(f"0x{value:08x}/0x{m:08x}+{_DST_OFFSET[network.version] + 4 * word}")
    return keys


def install(ifname: str, networks: Iterable[str], rate: int) -> str | None:
    """Rate-limit packets to ``networks`` on ``ifname`` (in a forked child: imports pyroute2).
    None if done, else why not (the qdisc is then back to the kernel's default)."""
    from pyroute2 import IPRoute, NetlinkError

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return f"no interface {ifname}"
        index = found[0]
        _remove(ipr, index)  # a persistent device keeps an earlier daemon's: HTB cannot replace itself
        theirs = _foreign_root(ipr, index)
        if theirs:
            return f"the root qdisc is someone else's ({theirs}): left as it is"
        try:
            _add(ipr, index, [ipaddress.ip_network(n) for n in networks], rate)
        except NetlinkError as exc:
            _remove(ipr, index)
            code = exc.code
            return f"{errno.errorcode.get(code, code)} ({os.strerror(code)}): the kernel lacks HTB or u32?"
        except (struct.error, ValueError, OverflowError) as exc:  # pyroute2 cannot encode the rate
            _remove(ipr, index)
            return (f"{ENV_RATE}={rate} is out of HTB's range (below 4 queries/s a burst of "
                    f"{DNS_QUERY_BURST} lasts too long to encode): {exc}")
    return None


def _foreign_root(ipr: Any, index: int) -> str | None:
    """The root qdisc a user or another tool set (kind and handle); None for the kernel's default,
    whose handle is 0:."""
    for qdisc in ipr.get_qdiscs(index=index):
        if qdisc["parent"] == TC_H_ROOT and qdisc["handle"]:
            return f"{qdisc.get_attr('TCA_KIND')} {qdisc['handle'] >> 16:x}:"
    return None


def _remove(ipr: Any, index: int) -> None:
    """Our root qdisc (and its classes and filters) gone: the kernel's default back."""
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del", index=index, handle=QDISC_HANDLE, parent=TC_H_ROOT)  # without parent: EINVAL
    except NetlinkError:
        pass


def _add(ipr: Any, index: int, networks: list, rate: int) -> None:
    burst = DNS_QUERY_BURST * DNS_MPU
    ipr.tc("replace", "htb", index, QDISC_HANDLE, default=0)  # unclassified: the direct queue
    ipr.tc("add-class", "htb", index, CLASS_ID, parent=QDISC_HANDLE, rate=f"{rate * DNS_MPU * 8}bit",
           burst=burst, cburst=burst, mpu=DNS_MPU)
    for bucket in range(SOURCE_BUCKETS):  # each its share, and the whole when the others are idle
        classid = bucket_class(bucket)
        ipr.tc("add-class", "htb", index, classid, parent=CLASS_ID, rate=f"{rate * DNS_MPU * 8 // SOURCE_BUCKETS}bit",
               ceil=f"{rate * DNS_MPU * 8}bit", burst=burst // SOURCE_BUCKETS, cburst=burst, mpu=DNS_MPU)
        ipr.tc("add", "pfifo", index, (LEAF_MAJOR + bucket) << 16, parent=classid, limit=DNS_QUEUE)
        for prio, network in enumerate(networks, 1):  # one u32 filter per family, a key node per bucket
            ipr.tc("add-filter", "u32", index, parent=QDISC_HANDLE, prio=prio, protocol=_PROTOCOL[network.version],
                   target=classid, keys=u32_keys(network) + [source_port_key(network.version, bucket)])


def bucket_class(bucket: int) -> int:
    """The class of the source ports whose low bits are ``bucket`` (53:100 + bucket)."""
    return QDISC_HANDLE | (BUCKET_MINOR + bucket)


def source_port_key(version: int, bucket: int) -> str:
    """The u32 key on the low bits of the UDP/TCP source port, right after a header without
    options (queries a host sends have none; one with options lands in some bucket anyway)."""
    return f"0x{bucket << 16:08x}/0x{(SOURCE_BUCKETS - 1) << 16:08x}+{_TRANSPORT_OFFSET[version]}"


def install_sentinel_limit(ifname: str) -> tuple[int, str | None]:
    """In the configuration child: the rate, and why it is not installed (None: it is)."""
    from fzpoll.dns.stub import SENTINELS_V4, SENTINELS_V6

    rate = configured_rate()
    if not rate:
        return 0, f"{ENV_RATE}=0"
    try:
        return rate, install(ifname, [str(SENTINELS_V4), str(SENTINELS_V6)], rate)
    except ImportError as exc:
        return rate, f"no pyroute2: {exc}"


class DnsRateLimit:
    """The limit on one interface, as the daemon keeps it: installed once, when the stub is first
    routed (by the configuration child, see :func:`install_sentinel_limit`); a kernel that cannot
    gets a warning, and the stub works as without it."""

    def __init__(self, ifname: str, rate: int, problem: str | None) -> None:
        self.rate = rate if problem is None else 0
        self.problem = problem
        self.ifindex = 0
        if self.rate:
            try:
                self.ifindex = socket.if_nametoindex(ifname)
            except OSError as exc:
                self.rate, self.problem = 0, f"no interface {ifname}: {exc.strerror}"
        if self.rate:
            log.info("DNS queries rate-limited in the kernel", extra={"fields": {
                "interface": ifname, "queries_per_second": rate, "burst": DNS_QUERY_BURST}})
        elif rate:
            log.warning("DNS queries are not rate-limited in the kernel: a local query flood can crowd "
                        "the tunnel's packets out of the TUN queue", extra={"fields": {"error": self.problem}})

    def stats(self) -> dict[str, Any]:
        """``{"rate": N, "passed", "dropped", "queued"}`` (off: rate 0 and why)."""
        if not self.rate:
            return {"rate": 0, "off": self.problem or "not installed"}
        counters = read_class_stats(self.ifindex)
        if counters is None:
            return {"rate": self.rate, "off": "the class is gone (the qdisc was replaced?)"}
        return {"rate": self.rate, **counters}


def _dump_request(ifindex: int, seq: int) -> bytes:
    body = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETTCLASS, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_classes(data: bytes) -> dict[int, tuple[int, int, int]]:
    """``{class handle: (packets sent, drops, queue length)}`` of the RTM_NEWTCLASS messages in a
    datagram read from an rtnetlink dump; a truncated message ends the parse."""
    return _parse_dump(data)[0]


def _parse_dump(data: bytes) -> tuple[dict[int, tuple[int, int, int]], bool]:
    """:func:`parse_classes`, and whether the dump ends here (NLMSG_DONE or an error, or no whole
    message: nothing more worth waiting for), in one pass over the datagram."""
    found = {}
    kinds = set()
    for kind, _seq, body, end in netlink_messages(data):
        kinds.add(kind)
        if kind == RTM_NEWTCLASS and body + _TCMSG.size <= end:
            handle = _TCMSG.unpack_from(data, body)[2]
            stats2 = rtattrs(data, body + _TCMSG.size, end).get(TCA_STATS2, b"")
            nested = rtattrs(stats2, 0, len(stats2))
            basic, queue = nested.get(TCA_STATS_BASIC, b""), nested.get(TCA_STATS_QUEUE, b"")
            if len(basic) >= _BASIC.size and len(queue) >= _QUEUE.size:
                qlen, _, drops, _, _ = _QUEUE.unpack_from(queue)
                found[handle] = (_BASIC.unpack_from(basic)[1], drops, qlen)
    return found, not kinds or NLMSG_DONE in kinds or NLMSG_ERROR in kinds


def limit_counters(classes: dict[int, tuple[int, int, int]]) -> dict[str, int] | None:
    """What the limit passed (its top class), dropped and holds (its bucket classes); None if its
    classes are not there."""
    if CLASS_ID not in classes:
        return None
    buckets = [classes.get(bucket_class(b), (0, 0, 0)) for b in range(SOURCE_BUCKETS)]
    return {"passed": classes[CLASS_ID][0], "dropped": sum(b[1] for b in buckets),
            "queued": sum(b[2] for b in buckets)}


def read_class_stats(ifindex: int) -> dict[str, int] | None:
    """The limit's counters, asked of the kernel (an rtnetlink dump of the interface's classes; no
    pyroute2); None if the classes are not there or the kernel did not answer."""
    classes: dict[int, tuple[int, int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:  # NETLINK_ROUTE
        sock.settimeout(1.0)
        try:
            sock.send(_dump_request(ifindex, 1))
            while True:
                found, ended = _parse_dump(sock.recv(65536))
                classes.update(found)
                if ended:
                    break
        except OSError:
            pass
    return limit_counters(classes)
