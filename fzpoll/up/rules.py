"""Policy rules and per-table routes over rtnetlink, made exactly as ``ip rule``/``ip route`` make them.

wg-quick drives the kernel with the ``ip`` command; fzpoll speaks rtnetlink itself (pyroute2), so
these functions fill in what ``ip`` fills in, so that both leave identical state behind:

- routes get protocol ``boot`` and, for IPv4, scope ``link`` (``ip route add PREFIX dev IF``);
  pyroute2 alone would say ``proto static`` and scope universe;
- a rule without a priority gets the one the kernel gives ``ip rule add``: the priority of the
  second rule of the family minus one (``fib_default_rule_pref``; with the stock rules 0, 32766,
  32767 that is 32765). fzpoll computes it and passes it explicitly, so the rule is known exactly
  (family, priority, selector, table) *before* it exists and can be recorded for crash recovery.

Like :mod:`fzpoll.io.netlink`, each call opens its own ``IPRoute``: these run at start, reload
and stop, never per packet. Failures become :class:`~fzpoll.errors.LocalError`.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import asdict, dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from fzpoll.errors import LocalError
from fzpoll.io.netlink import route_oifs, route_table

RT_TABLE_MAIN = 254
RTPROT_BOOT = 3  # what `ip route add` sets when no `proto` is given
RT_SCOPE_LINK = 253  # what `ip route add PREFIX dev IF` (no gateway) sets for IPv4
FIB_RULE_INVERT = 0x2  # "not" in `ip rule add not fwmark ...`
NO_SUPPRESS = 0xFFFFFFFF  # FRA_SUPPRESS_PREFIXLEN when the rule has none
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Rule:
    """One policy rule, as precisely as needed to delete exactly it and nothing else."""

    family: int  # socket.AF_INET or AF_INET6
    priority: int
    table: int
    fwmark: int = 0  # 0: no fwmark selector
    invert: bool = False  # "not fwmark ..."
    suppress_prefixlength: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Rule":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        """As ``ip rule`` would print it (for logs)."""
        sel = f"{'not ' if self.invert else ''}fwmark {self.fwmark:#x} " if self.fwmark else ""
        sup = f" suppress_prefixlength {self.suppress_prefixlength}" if self.suppress_prefixlength is not None else ""
        fam = "-4" if self.family == socket.AF_INET else "-6"
        return f"{fam} {self.priority}: {sel}lookup {self.table}{sup}"


def _fail(what: str, exc: NetlinkError) -> LocalError:
    reason = errno.errorcode.get(exc.code, str(exc.code))
    hint = " (needs CAP_NET_ADMIN)" if exc.code in (errno.EPERM, errno.EACCES) else ""
    return LocalError(f"{what}: {reason}{hint}")


def family_of(net: Network) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def default_rule_priority(ipr: IPRoute, family: int) -> int:
    """The priority the kernel would give a rule added without one (``fib_default_rule_pref``)."""
    # get_attr: r.get("FRA_PRIORITY") is None on pyroute2 0.7 (Debian 12), as route_oifs explains.
    prefs = sorted(int(r.get_attr("FRA_PRIORITY") or 0) for r in ipr.get_rules(family=family))
    if len(prefs) >= 2 and prefs[1]:
        return prefs[1] - 1
    return 0


def _rule_args(rule: Rule) -> dict[str, Any]:
    args: dict[str, Any] = {"family": rule.family, "priority": rule.priority, "table": rule.table,
                            "action": "FR_ACT_TO_TBL"}
    if rule.fwmark:
        args["fwmark"] = rule.fwmark
    if rule.invert:
        args["flags"] = FIB_RULE_INVERT
    if rule.suppress_prefixlength is not None:
        args["suppress_prefixlen"] = rule.suppress_prefixlength
    return args


def next_priority(family: int) -> int:
    with IPRoute() as ipr:
        return default_rule_priority(ipr, family)


def add_rule(rule: Rule) -> None:
    """Add ``rule`` (its priority chosen by :func:`next_priority`); an identical one is fine."""
    with IPRoute() as ipr:
        try:
            ipr.rule("add", **_rule_args(rule))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(f"cannot add rule {rule.describe()}", exc) from None


def del_rule(rule: Rule) -> None:
    """Delete exactly ``rule`` (every selector and its priority must match); absent is fine."""
    with IPRoute() as ipr:
        try:
            ipr.rule("del", **_rule_args(rule))
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise _fail(f"cannot delete rule {rule.describe()}", exc) from None


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _route_args(net: Network, index: int, table: int) -> dict[str, Any]:
    args: dict[str, Any] = {"dst": str(net), "oif": index, "family": family_of(net), "table": table,
                            "proto": RTPROT_BOOT}
    if net.version == 4:
        args["scope"] = RT_SCOPE_LINK
    return args


def add_route(ifname: str, net: Network, table: int) -> None:
    """``ip route add NET dev IFNAME table TABLE``. Already there through ``ifname``: fine;
    there through another interface: an error naming it (wg-quick's ``ip`` fails the same way)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            raise LocalError(f"no network interface named {ifname!r}")
        try:
            ipr.route("add", **_route_args(net, index, table))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _fail(f"cannot add route {net} dev {ifname} table {table}", exc) from None
            if index not in route_oifs(ipr, net, table):
                raise LocalError(f"cannot add route {net} dev {ifname} table {table}: a route for it "
                                 "already exists through another interface") from None


def del_route(ifname: str, net: Network, table: int) -> None:
    """Delete the route of ``net`` through ``ifname`` in ``table``; absent (or no link) is fine."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            return  # the link is gone and its routes with it
        try:
            ipr.route("del", **_route_args(net, index, table))  # scope must match, too
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise _fail(f"cannot delete route {net} dev {ifname} table {table}", exc) from None


def interface_addresses(ifname: str, family: int) -> list[str]:
    """The addresses of ``ifname`` in ``family``, in the kernel's order (``ip -o addr show``)."""
    with IPRoute() as ipr:
        index = _index(ipr, ifname)
        if index is None:
            return []
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=index, family=family)]


def table_in_use(table: int) -> bool:
    """Whether ``table`` holds any IPv4 or IPv6 route (wg-quick's test for a free table)."""
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                if any(route_table(r) == table for r in ipr.route("dump", table=table, family=family)):
                    return True
            except NetlinkError as exc:
                if exc.code != errno.EAFNOSUPPORT:
                    raise _fail(f"cannot list routing table {table}", exc) from None
    return False


def enable_src_valid_mark(path: str = SRC_VALID_MARK) -> bool:
    """``sysctl net.ipv4.conf.all.src_valid_mark=1``, as wg-quick sets it for an IPv4 default
    route (reverse-path checks then honour the fwmark). Returns whether it changed."""
    try:
        with open(path) as f:
            if f.read().strip() == "1":
                return False
        with open(path, "w") as f:
            f.write("1\n")
    except OSError as exc:
        raise LocalError(f"cannot set net.ipv4.conf.all.src_valid_mark=1: {exc.strerror or exc}") from None
    return True
