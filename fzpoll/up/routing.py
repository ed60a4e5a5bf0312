"""Routes for the peers' allowed IPs the way wg-quick makes them, full-tunnel policy rules included.

wg-quick (``linux.bash``: ``add_route``, ``add_default``, ``del_if``) decides per prefix, by the
``Table`` setting:

- ``off``: no route at all.
- a number or an rt_tables name: every prefix, /0 included, goes into that table; no rules.
- ``auto`` or not given: a prefix other than /0 goes into the main table. A /0 (0.0.0.0/0 or ::/0)
  cannot (the host's own default route is there, and the tunnel's UDP must keep using it), so it
  goes into a table of its own, numbered after the fwmark: the interface's ``FwMark`` if set,
  else 51820 or the next number whose table is empty, which then also becomes the fwmark of the
  tunnel's UDP sockets. Then, per family with a /0, two rules (each at the priority the kernel
  gives ``ip rule add``, so the second lands just before the first):
  ``not fwmark T lookup T`` (all traffic but the tunnel's own UDP uses table T) and
  ``lookup main suppress_prefixlength 0`` (the main table, except its default route, still wins:
  the LAN and the endpoint's own route keep working). For IPv4 it sets
  ``net.ipv4.conf.all.src_valid_mark=1`` and, like wg-quick, leaves it set (another tunnel may
  rely on it; it changes nothing without marks). Then the nftables table of
  :mod:`fzpoll.up.firewall` (the replies to the marked UDP get the mark back, so a strict
  reverse-path filter lets them in).

Undoing: wg-quick's ``down`` deletes *every* rule that looks up table T and *every*
``suppress_prefixlength 0`` rule of main, also ones it did not add. fzpoll removes exactly the
rules it added, matched by priority and selector (and its own nftables table), on stop and on
a reload that no longer needs them. Each rule is written to a state file (``/run/fzpoll/IFACE.NETNS.json``) *before* it is
added, so a run after a crash (or ``fzpoll down``) removes what the crashed run left; routes need
no record, the kernel drops them with the crashed run's interface.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

from fzpoll.errors import LocalError
from fzpoll.io import netlink
from fzpoll.up import firewall
from fzpoll.up import rules as rt
from fzpoll.up.rules import RT_TABLE_MAIN, Network, Rule

log = logging.getLogger("fzpoll.routing")

DEFAULT_TABLE = 51820  # wg-quick's first choice for the full-tunnel table (and fwmark)
STATE_DIR = "/run/fzpoll"
RT_TABLES_FILES = ("/etc/iproute2/rt_tables", "/usr/share/iproute2/rt_tables",
                   "/usr/lib/iproute2/rt_tables")
BUILTIN_TABLES = {"unspec": 0, "default": 253, "main": RT_TABLE_MAIN, "local": 255}
FAMILIES = (socket.AF_INET, socket.AF_INET6)


class FwmarkHost(Protocol):
    """What the routing needs of the device: its UDP sockets' fwmark."""

    fwmark: int

    def set_fwmark(self, mark: int) -> None: ...


# ------------------------------------------------------------------------------- pure planning


@dataclass(frozen=True)
class Plan:
    """What should exist: routes as (table, prefix) and the families whose /0 needs the rules."""

    routes: frozenset[tuple[int, Network]]
    default_families: frozenset[int]
    table: int  # the full-tunnel table (0 if no /0 needs one)


def wants_policy_rules(networks: Iterable[Network], table: int | str | None) -> bool:
    """Whether wg-quick would use its full-tunnel rules: Table auto and a /0 among the prefixes."""
    return table in (None, "auto") and any(net.prefixlen == 0 for net in networks)


def plan_routes(networks: Iterable[Network], table: int | str | None, default_table: int) -> Plan:
    """wg-quick's choice for each prefix. ``table``: None or "auto", "off", or a table number;
    ``default_table``: the full-tunnel table for /0 prefixes in auto mode."""
    nets = set(networks)
    if table == "off":
        return Plan(frozenset(), frozenset(), 0)
    if isinstance(table, int):
        return Plan(frozenset((table, net) for net in nets), frozenset(), 0)
    defaults = {net for net in nets if net.prefixlen == 0}
    routes = {(RT_TABLE_MAIN, net) for net in nets - defaults}
    routes |= {(default_table, net) for net in defaults}
    families = frozenset(rt.family_of(net) for net in defaults)
    return Plan(frozenset(routes), families, default_table if defaults else 0)


def rule_pair(family: int, table: int) -> tuple[Rule, Rule]:
    """The two rules of a full tunnel, in the order wg-quick adds them (priorities unset)."""
    return (Rule(family, 0, table, fwmark=table, invert=True),
            Rule(family, 0, RT_TABLE_MAIN, suppress_prefixlength=0))


def route_order(routes: Iterable[tuple[int, Network]]) -> list[tuple[int, Network]]:
    """wg-quick adds routes longest prefix first (``sort -nr -k 2 -t /``; on a tie the reversed
    whole line decides, which puts ``::/0`` before ``0.0.0.0/0``)."""
    return sorted(routes, key=lambda r: (-r[1].prefixlen, -r[1].version, r[1], r[0]))


def parse_rt_tables(text: str) -> dict[str, int]:
    """``NUMBER NAME`` lines of an rt_tables file (``#`` comments); numbers may be hex."""
    names: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) >= 2:
            try:
                names[fields[1]] = int(fields[0], 0)
            except ValueError:
                continue
    return names


# ------------------------------------------------------------------------------- IO


def resolve_table(setting: str | None, files: Iterable[str] | None = None) -> int | str | None:
    """A config's ``Table`` as :func:`plan_routes` takes it: None/"auto"/"off" or a number."""
    if setting is None or setting in ("auto", "off"):
        return setting
    if setting.isdigit():
        return int(setting)
    names = dict(BUILTIN_TABLES)
    paths = list(files) if files is not None else [
        *RT_TABLES_FILES, *sorted(glob.glob("/etc/iproute2/rt_tables.d/*.conf")),
        *sorted(glob.glob("/usr/share/iproute2/rt_tables.d/*.conf"))]
    for path in paths:
        try:
            with open(path) as f:
                names.update(parse_rt_tables(f.read()))
        except OSError:
            continue
    if setting not in names:
        raise LocalError(f"Table = {setting}: no routing table of that name in {RT_TABLES_FILES[0]}")
    return names[setting]


def state_path(ifname: str, state_dir: str = STATE_DIR) -> str:
    """One file per interface per network namespace (the directory is shared by all of them)."""
    return os.path.join(state_dir, f"{ifname}.{os.stat('/proc/self/ns/net').st_ino}.json")


def process_running(pid: int) -> bool:
    """Alive and not a zombie (a stopped daemon its parent has not reaped yet is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def remove_leftovers(ifname: str, *, only_if_dead: bool, state_dir: str = STATE_DIR) -> list[Rule]:
    """Delete the rules a previous run for ``ifname`` recorded and did not remove (it crashed).
    With ``only_if_dead``, leave them if that run is still alive. Returns the rules removed."""
    path = state_path(ifname, state_dir)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("unreadable routing state file, ignored", extra={"fields": {"path": path, "error": str(exc)}})
        return []
    pid = int(data.get("pid", 0))
    if only_if_dead and pid != os.getpid() and process_running(pid):
        return []
    removed = [Rule.from_json(r) for r in data.get("rules", [])]
    for rule in removed:
        rt.del_rule(rule)
    firewall.remove(ifname)  # made after the rules: if any exists, the state file does too
    os.unlink(path)
    if removed:
        log.warning("removed rules left by an earlier run that did not stop cleanly", extra={"fields": {
            "pid": pid, "rules": [r.describe() for r in removed]}})
    return removed


class PolicyRouting:
    """The routes and rules of one interface: applies a :class:`Plan` as a difference, undoes it."""

    def __init__(self, ifname: str, state_dir: str = STATE_DIR, owner_pid: int | None = None) -> None:
        self.ifname = ifname
        self.state_dir = state_dir
        # The daemon's pid, written to the state file: the daemon syncs from a short-lived child
        # (up/forked.py), whose own pid would make a live daemon's rules look like a crash's.
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.routes: set[tuple[int, Network]] = set()
        self.tables: dict[int, int] = {}  # family -> full-tunnel table of the rules we added
        self.rules: list[Rule] = []  # added (or about to be), in order
        self.auto_fwmark = 0  # the fwmark we chose ourselves (0: none)
        self.firewall: dict[int, tuple[int, tuple[str, ...]]] = {}  # family -> (mark, addresses)
        remove_leftovers(ifname, only_if_dead=False, state_dir=state_dir)

    def sync(self, networks: Iterable[Network], table_setting: str | None, device: FwmarkHost) -> None:
        """Make routes and rules what ``networks`` and ``Table`` ask for, changing only the
        difference: rules that go are removed before their routes, new ones added after."""
        for _ in self.sync_steps(networks, table_setting, device):
            pass

    def sync_steps(self, networks: Iterable[Network], table_setting: str | None,
                   device: FwmarkHost) -> Iterator[None]:
        """:meth:`sync` with a step per batch of routes (one netlink round trip each)."""
        nets = set(networks)
        table = resolve_table(table_setting)
        default_table = self._default_table(device) if wants_policy_rules(nets, table) else 0
        plan = plan_routes(nets, table, default_table)
        for family, old in list(self.tables.items()):
            if family not in plan.default_families or old != plan.table:
                for rule in [r for r in self.rules if r.family == family]:
                    self._del_rule(rule)
                del self.tables[family]
        yield from self._change_routes(route_order(plan.routes - self.routes), route_order(self.routes - plan.routes))
        if not plan.default_families and self.auto_fwmark and device.fwmark == self.auto_fwmark:
            device.set_fwmark(0)  # we chose it for a full tunnel that is gone
            self.auto_fwmark = 0
        for family in sorted(plan.default_families - set(self.tables), reverse=True):  # ::/0 first
            self._add_rules(family, plan.table)
        self._sync_firewall(plan)

    def _change_routes(self, add: list[tuple[int, Network]],
                       remove: list[tuple[int, Network]]) -> Iterator[None]:
        """Routes in batches (one netlink round trip a step, see :func:`netlink.change_routes`);
        if it fails, what it did is undone (best effort), so the routes stay as they were."""
        try:
            yield from netlink.iter_change_routes(self.ifname, add, remove)
        except LocalError:
            try:
                netlink.change_routes(self.ifname, remove, add)
            except LocalError as exc:
                log.error("could not restore the routes", extra={"fields": {"error": str(exc)}})
            raise
        self.routes.difference_update(remove)
        self.routes.update(add)

    def _sync_firewall(self, plan: Plan) -> None:
        """wg-quick's nftables table per full-tunnel family (see :mod:`fzpoll.up.firewall`), for
        the addresses the interface has (as wg-quick, link-local ones included)."""
        gone = [family for family in self.firewall if family not in plan.default_families]
        if gone:
            firewall.remove(self.ifname, gone)
            for family in gone:
                del self.firewall[family]
        for family in sorted(plan.default_families, reverse=True):
            mine = tuple(rt.interface_addresses(self.ifname, family))
            if self.firewall.get(family) != (plan.table, mine):
                if firewall.add_full_tunnel(self.ifname, family, plan.table, mine):
                    self.firewall[family] = (plan.table, mine)

    def close(self) -> None:
        """Undo the rules (routes go with the interface, as with wg-quick); forget the state."""
        if self.firewall:
            firewall.remove(self.ifname, list(self.firewall))
            self.firewall.clear()
        for rule in list(self.rules):
            self._del_rule(rule)
        self.tables.clear()

    def _default_table(self, device: FwmarkHost) -> int:
        if device.fwmark:
            return device.fwmark
        table = DEFAULT_TABLE
        while rt.table_in_use(table):
            table += 1
        device.set_fwmark(table)
        self.auto_fwmark = table
        log.info("full tunnel: fwmark and routing table chosen", extra={"fields": {"table": table}})
        return table

    def _add_rules(self, family: int, table: int) -> None:
        self.tables[family] = table
        for template in rule_pair(family, table):
            rule = Rule(family, rt.next_priority(family), template.table, template.fwmark,
                        template.invert, template.suppress_prefixlength)
            self.rules.append(rule)
            self._save()  # recorded before it exists: a crash right after still finds it
            rt.add_rule(rule)
            log.info("added rule", extra={"fields": {"rule": rule.describe()}})
        if family == socket.AF_INET:
            try:
                if rt.enable_src_valid_mark():
                    log.info("set net.ipv4.conf.all.src_valid_mark=1")
            except LocalError as exc:
                log.warning(f"{exc}: with strict reverse-path filtering, replies from the "
                            "endpoint may be dropped")

    def _del_rule(self, rule: Rule) -> None:
        rt.del_rule(rule)
        self.rules.remove(rule)
        self._save()
        log.info("removed rule", extra={"fields": {"rule": rule.describe()}})

    def _save(self) -> None:
        """Write the rules to the state file (atomically), or remove it when there are none."""
        path = state_path(self.ifname, self.state_dir)
        try:
            if not self.rules:
                os.unlink(path)
                return
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            data = {"pid": self.owner_pid, "ifname": self.ifname, "rules": [r.to_json() for r in self.rules]}
            with open(f"{path}.tmp", "w") as f:
                json.dump(data, f)
            os.replace(f"{path}.tmp", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot record routing state: after a crash its rules would stay",
                        extra={"fields": {"path": path, "error": exc.strerror or str(exc)}})
