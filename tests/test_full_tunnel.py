"""``fzpoll up`` as a wg-quick replacement: full-tunnel policy routing, ``Table =``, hooks, down.

One pair of namespaces for the module. The client has a default route (IPv4 and IPv6) through its
veth to the server namespace, where wireguard-go runs; the server's endpoint address
(10.77.0.2 / fd00:77::2, on its loopback) is reachable only through that default route, so a
tunnel whose own UDP fell into the tunnel's default route would never complete a handshake.
Beyond the peer: 10.99.0.1 / fd00:99::1 (also on the server's loopback), reached only through
the tunnel once the client routes 0.0.0.0/0 / ::/0 into it.

Every test snapshots ``ip rule``, ``ip -6 rule``, ``ip route show table all`` and
``ip -6 route show table all`` before it starts fzpoll and checks they are identical after.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import netns
from netns import Namespace, WireguardGo, veth_pair
from test_daemon_lifecycle import (Foreground, alive, assert_gone, daemon_env, ns_pids, run_fzpoll, wait_until,
                                  write_config)

pytestmark = pytest.mark.netns

CLIENT4, CLIENT6 = "100.64.9.1", "fd00:64:9::1"
SERVER4, SERVER6 = "100.64.9.2", "fd00:64:9::2"
ENDPOINT4, ENDPOINT6 = "10.77.0.2", "fd00:77::2"
BEYOND4, BEYOND6 = "10.99.0.1", "fd00:99::1"
SERVER_PORT = 51821


@dataclass
class World:
    client: Namespace
    server: Namespace
    veth: str  # the client's end
    client_ip: str  # its address
    wg: WireguardGo
    key: str  # the client's private key
    server_public: str

    def config(self, path: Path, allowed: str, extra: str = "", endpoint: str = ENDPOINT4) -> Path:
        host = f"[{endpoint}]" if ":" in endpoint else endpoint
        return write_config(path, f"""\
[Interface]
PrivateKey = {self.key}
Address = {CLIENT4}/32, {CLIENT6}/128
MTU = 1380
{extra}
[Peer]
PublicKey = {self.server_public}
AllowedIPs = {allowed}
Endpoint = {host}:{SERVER_PORT}
""")

    def snapshot(self) -> dict[str, str]:
        """The policy and routing state the tests compare (text, as a user reads it)."""
        views = {"rule4": ("-4", "rule"), "rule6": ("-6", "rule"),
                 "route4": ("-4", "route", "show", "table", "all"),
                 "route6": ("-6", "route", "show", "table", "all")}
        out = {k: self.client.ip(*v).stdout for k, v in views.items()}
        out["nft"] = self.client.run(["nft", "list", "ruleset"]).stdout
        return out

    def server_rx(self) -> int:
        return self.wg.wg_show_dump().peers[0].rx_bytes


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    reason = netns.need_wireguard_go()
    if reason:
        pytest.skip(reason)
    with Namespace("ft-client") as client, Namespace("ft-server") as server:
        pair = veth_pair(client, server)
        client.ip("route", "add", "default", "via", pair.ip_b)
        # Strict reverse-path filtering (RHEL's default): a full tunnel's UDP replies then need
        # wg-quick's conntrack-mark rules and src_valid_mark, or they are dropped.
        client.run(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"])
        client.ip("-6", "route", "add", "default", "via", pair.ip6_b)
        for address in (f"{ENDPOINT4}/32", f"{BEYOND4}/32"):
            server.ip("addr", "add", address, "dev", "lo")
        for address in (f"{ENDPOINT6}/128", f"{BEYOND6}/128"):
            server.ip("addr", "add", address, "dev", "lo", "nodad")
        # The server speaks to the client from its endpoint address only (never from the on-link
        # veth address), so every answer of the client must take the default route.
        server.ip("route", "add", f"{pair.ip_a}/32", "dev", pair.if_b, "src", ENDPOINT4)
        server.ip("-6", "route", "add", f"{pair.ip6_a}/128", "dev", pair.if_b, "src", ENDPOINT6)
        # The veth's link-local address appears in the local table once its DAD ends: wait, so
        # that it does not show up as a difference in the first test.
        wait_until(lambda: not client.ip("-6", "addr", "show", "tentative").stdout.strip()
                   and "fe80" in client.ip("-6", "route", "show", "table", "local").stdout, 10,
                   "the veth's link-local address")
        wg = WireguardGo(server).start()
        key, server_key = netns.genkey(), netns.genkey()
        wg.configure(server_key, SERVER_PORT)
        wg.add_peer(netns.pubkey(key), [f"{CLIENT4}/32", f"{CLIENT6}/128"])
        wg.address(f"{SERVER4}/32", f"{SERVER6}/128")
        wg.up()
        wg.route(f"{CLIENT4}/32", f"{CLIENT6}/128")
        yield World(client, server, pair.if_a, pair.ip_a, wg, key, netns.pubkey(server_key))


@pytest.fixture(autouse=True)
def _stop_daemons(world: World) -> Iterator[None]:
    """A failed test must not leave its daemon (and its rules) to the next test of the module:
    SIGTERM (a clean stop, hooks and all) whatever still runs in the client namespace."""
    yield
    pids = ns_pids(world.client)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not any(alive(pid) for pid in pids), 10, "the daemons to stop")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    tmp_path.chmod(0o700)
    return tmp_path


def _name() -> str:
    return f"wgf{secrets.token_hex(2)}"


def _ping(ns: Namespace, address: str) -> None:
    flag = ["-6"] if ":" in address else []
    result = ns.run(["ping", *flag, "-c", "2", "-i", "0.2", "-W", "3", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def _route_get(ns: Namespace, address: str, *extra: str) -> str:
    return ns.ip("-6" if ":" in address else "-4", "route", "get", address, *extra).stdout


def _ping_through_tunnel(world: World, name: str, address: str) -> None:
    """``address`` is routed into the tunnel, a ping gets there and the peer's counters grow."""
    assert f"dev {name} " in _route_get(world.client, address), _route_get(world.client, address)
    rx = world.server_rx()
    _ping(world.client, address)
    assert world.server_rx() > rx


def _stop(daemon: Foreground, world: World, before: dict[str, str], code: int = 0) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() == code, daemon.log()
    assert_gone(world.client, daemon.name)
    _assert_same(world.snapshot(), before)


def _assert_same(now: dict[str, str], before: dict[str, str]) -> None:
    """Equal views, and if not, which lines appeared and which went, per view."""
    for view in before:
        old, new = before[view].splitlines(), now[view].splitlines()
        diff = [f"+ {line}" for line in new if line not in old] + [f"- {line}" for line in old if line not in new]
        assert now[view] == before[view], f"{view} changed:\n" + "\n".join(diff or ["(order)"])


def _start(world: World, tmp: Path, allowed: str, extra: str = "",
           endpoint: str = ENDPOINT4) -> tuple[str, dict[str, str], Path, Foreground]:
    """A fresh interface name, the state before, its config file, and `fzpoll up` running it."""
    name = _name()
    before = world.snapshot()
    config = world.config(tmp / f"{name}.conf", allowed, extra, endpoint)
    return name, before, config, Foreground(world.client, name, ("up", str(config)), tmp).wait_ready()


def _rules(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_full_tunnel_default_routes_hooks_and_clean_stop(world: World, tmp: Path) -> None:
    name, before, config, daemon = _start(world, tmp, "0.0.0.0/0, ::/0", extra=(
        f"PostUp = echo up %i > {tmp}/postup\nPostDown = echo down %i > {tmp}/postdown\n"))
    try:
        up = world.snapshot()
        for family in ("rule4", "rule6"):  # wg-quick's pair, at the kernel's default priorities
            added = [line for line in _rules(up[family]) if line not in _rules(before[family])]
            assert added == ["32764:\tfrom all lookup main suppress_prefixlength 0",
                             "32765:\tnot from all fwmark 0xca6c lookup 51820"], up[family]
        assert world.client.run(["wg", "show", name, "fwmark"]).stdout.strip() == "0xca6c"
        assert f"default dev {name} table 51820 scope link" in up["route4"]
        assert f"default dev {name} table 51820 metric 1024" in up["route6"]
        sysctl = world.client.run(["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout
        assert sysctl.strip() == "1"
        # The tunnel's own (marked) UDP to the endpoint keeps the veth; everything else: tunnel.
        assert f"dev {world.veth} " in _route_get(world.client, ENDPOINT4, "mark", "0xca6c")
        assert f"dev {world.veth} " in _route_get(world.client, ENDPOINT6, "mark", "0xca6c")
        assert f"dev {name} " in _route_get(world.client, ENDPOINT4)
        _ping_through_tunnel(world, name, BEYOND4)
        _ping_through_tunnel(world, name, BEYOND6)
        # The handshake keeps working: the peer forgets the session and starts a new handshake
        # itself; our answer, from the marked UDP socket, must leave by the veth.
        client_public = netns.pubkey(world.key)
        port = world.client.run(["wg", "show", name, "listen-port"]).stdout.strip()
        world.wg.set("peer", client_public, "remove")
        world.wg.add_peer(client_public, [f"{CLIENT4}/32", f"{CLIENT6}/128"], f"{world.client_ip}:{port}")
        _ping(world.server, CLIENT4)
        assert world.wg.wg_show_dump().peers[0].latest_handshake > 0
        assert (tmp / "postup").read_text() == f"up {name}\n"
        assert not (tmp / "postdown").exists()
    except AssertionError:
        print(daemon.log()[-6000:])
        raise
    _stop(daemon, world, before)
    assert (tmp / "postdown").read_text() == f"down {name}\n"
    assert not list(Path("/run/fzpoll").glob(f"{name}.*"))


def test_table_off_adds_no_route(world: World, tmp: Path) -> None:
    # (and a failing PreDown: reported, the stop goes on, the daemon exits with its code)
    name, before, config, daemon = _start(world, tmp, "0.0.0.0/0, ::/0", extra=(
        f"Table = off\nPreDown = echo 'pre-down says no' >&2; exit 4\nPostDown = touch {tmp}/postdown\n"))
    up = world.snapshot()
    assert up["rule4"] == before["rule4"] and up["rule6"] == before["rule6"]
    new = [line for key in ("route4", "route6") for line in up[key].splitlines()
           if line not in before[key].splitlines()]
    # only what the kernel makes for the interface's own addresses
    assert new and all("proto kernel" in line for line in new), new
    assert f"dev {world.veth} " in _route_get(world.client, BEYOND4)
    _stop(daemon, world, before, code=4)
    assert "PreDown hook failed with exit code 4" in daemon.log() and "pre-down says no" in daemon.log()
    assert (tmp / "postdown").exists()


def test_table_number_puts_every_route_there_without_rules(world: World, tmp: Path) -> None:
    # As a Table = N user would: a rule of one's own (in a hook) sends some traffic to table N.
    name, before, config, daemon = _start(world, tmp, "0.0.0.0/0, ::/0, 100.64.9.0/24", extra=(
        f"Table = 1234\nPostUp = ip rule add to {BEYOND4} table 1234 pref 1000\n"
        f"PreDown = ip rule del to {BEYOND4} table 1234 pref 1000\n"))
    up = world.snapshot()
    assert up["rule6"] == before["rule6"]
    assert [line for line in _rules(up["rule4"]) if line not in _rules(before["rule4"])] == [
        f"1000:\tfrom all to {BEYOND4} lookup 1234"]
    table = [line.strip() for line in world.client.ip("-4", "route", "show", "table", "1234").stdout.splitlines()]
    assert table == [f"default dev {name} scope link",
                     f"100.64.9.0/24 dev {name} scope link"], table
    assert f"default dev {name} metric 1024" in world.client.ip(
        "-6", "route", "show", "table", "1234").stdout
    assert world.client.run(["wg", "show", name, "fwmark"]).stdout.strip() == "off"
    _ping_through_tunnel(world, name, BEYOND4)
    assert f"dev {world.veth} " in _route_get(world.client, BEYOND6)  # no rule: main table
    _stop(daemon, world, before)


def test_ipv6_only_full_tunnel_leaves_look_alike_rules_of_others(world: World, tmp: Path) -> None:
    """IPv6 only; and a rule that looks like ours but is not (another tunnel's, added first)
    stays: wg-quick's down would delete every ``suppress_prefixlength 0`` rule, fzpoll only its own."""
    world.client.ip("-6", "rule", "add", "table", "main", "suppress_prefixlength", "0")
    try:
        name, before, config, daemon = _start(world, tmp, "::/0", endpoint=ENDPOINT6)
        up = world.snapshot()
        assert up["rule4"] == before["rule4"]
        assert [line for line in _rules(up["rule6"]) if line not in _rules(before["rule6"])] == [
            "32763:\tfrom all lookup main suppress_prefixlength 0",
            "32764:\tnot from all fwmark 0xca6c lookup 51820"]
        _ping_through_tunnel(world, name, BEYOND6)
        assert f"dev {world.veth} " in _route_get(world.client, BEYOND4)
        _stop(daemon, world, before)
        assert "32765:\tfrom all lookup main suppress_prefixlength 0" in world.client.ip("-6", "rule").stdout
    finally:
        world.client.ip("-6", "rule", "del", "pref", "32765")


def test_reload_adds_and_removes_the_default_route(world: World, tmp: Path) -> None:
    name = _name()
    before = world.snapshot()
    path = tmp / f"{name}.conf"
    world.config(path, f"{SERVER4}/32, {SERVER6}/128")
    daemon = Foreground(world.client, name, ("up", str(path)), tmp).wait_ready()
    narrow = world.snapshot()
    assert narrow["rule4"] == before["rule4"] and narrow["rule6"] == before["rule6"]
    _ping(world.client, SERVER4)
    world.config(path, f"{SERVER4}/32, {SERVER6}/128, 0.0.0.0/0, ::/0")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "lookup 51820" in world.client.ip("-6", "rule").stdout, 5, "the rules")
    wait_until(lambda: "lookup 51820" in world.client.ip("-4", "rule").stdout, 5, "the rules")
    _ping_through_tunnel(world, name, BEYOND4)
    _ping_through_tunnel(world, name, BEYOND6)
    world.config(path, f"{SERVER4}/32, {SERVER6}/128")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "lookup 51820" not in world.client.ip("-4", "rule").stdout + world.client.ip(
        "-6", "rule").stdout, 5, "the rules to go")
    try:
        wait_until(lambda: world.snapshot() == narrow, 5, "the state of before the first reload")
    except AssertionError:
        _assert_same(world.snapshot(), narrow)
    assert world.client.run(["wg", "show", name, "fwmark"]).stdout.strip() == "off"
    _ping(world.client, SERVER4)  # the session survived both reloads
    _stop(daemon, world, before)
    assert daemon.log().count("configuration reloaded") == 2


def test_crash_leftovers_removed_by_restart_and_by_down(world: World, tmp: Path) -> None:
    name = _name()
    before = world.snapshot()
    config = world.config(tmp / f"{name}.conf", "0.0.0.0/0, ::/0")
    for cleaner in ("restart", "down"):
        daemon = Foreground(world.client, name, ("up", str(config)), tmp).wait_ready()
        if cleaner == "restart":
            _ping_through_tunnel(world, name, BEYOND4)
        daemon.proc.kill()
        daemon.wait_exit()
        left = world.snapshot()
        assert "lookup 51820" in left["rule4"] and "lookup 51820" in left["rule6"]  # the crash's
        assert f"fzpoll-{name}" in left["nft"]
        if cleaner == "restart":  # the next run removes the leftovers before adding its own
            again = Foreground(world.client, name, ("up", str(config)), tmp).wait_ready()
            assert world.client.ip("-4", "rule").stdout.count("lookup 51820") == 1
            assert "removed rules left by an earlier run" in again.log()
            _ping_through_tunnel(world, name, BEYOND4)
            _stop(again, world, before)
    # down: nothing runs, `fzpoll down` removes what the killed run left
    proc = run_fzpoll(world.client, "down", name)
    assert proc.returncode == 0 and "removed 4 rules" in proc.stdout, proc.stdout + proc.stderr
    assert world.snapshot() == before


def test_fzpoll_down_stops_fzpoll_up_like_wg_quick_down(world: World, tmp: Path) -> None:
    name, before, config, daemon = _start(world, tmp, "0.0.0.0/0, ::/0", extra=(
        f"PreUp = touch {tmp}/preup\nPreDown = ip rule > {tmp}/predown\nPostDown = ip rule > {tmp}/postdown\n"))
    (tmp / "preup").unlink()
    second = run_fzpoll(world.client, "up", str(config))  # as wg-quick: refused before PreUp
    assert second.returncode == 1 and f"{name} already exists" in second.stderr, second.stderr
    assert not (tmp / "preup").exists()
    proc = run_fzpoll(world.client, "down", str(config), timeout=30)
    assert proc.returncode == 0 and f"{name}: stopped" in proc.stdout, proc.stdout + proc.stderr
    assert daemon.wait_exit() == 0
    assert_gone(world.client, name)
    assert world.snapshot() == before
    assert "lookup 51820" in (tmp / "predown").read_text()  # PreDown: still up
    assert "lookup 51820" not in (tmp / "postdown").read_text()  # PostDown: rules gone
    missing = run_fzpoll(world.client, "down", name)
    assert missing.returncode == 1 and "not running" in missing.stderr


@pytest.mark.parametrize("phase, hooks, code, ran", [
    # PreUp: the first ran, the failing one stops everything: no interface was ever made
    ("PreUp", "PreUp = echo first %i > {tmp}/ran\nPreUp = echo 'hook says no' >&2; exit 7\n", 7, "first {name}"),
    # PostUp: ran with everything up; what was made is undone, without the down hooks
    ("PostUp", "PostUp = ip rule > {tmp}/ran; echo 'hook says no' >&2; exit 3\n", 3, "lookup 51820"),
], ids=["PreUp", "PostUp"])
def test_failing_up_hook_stops_start_up_with_its_code_and_message(
        world: World, tmp: Path, phase: str, hooks: str, code: int, ran: str) -> None:
    name = _name()
    before = world.snapshot()
    extra = hooks.format(tmp=tmp) + f"PostUp = touch {tmp}/never\nPostDown = touch {tmp}/never\n"
    config = world.config(tmp / f"{name}.conf", "0.0.0.0/0, ::/0", extra=extra)
    proc = run_fzpoll(world.client, "up", str(config))
    assert proc.returncode == code, proc.stderr
    assert f"{phase} hook failed with exit code {code}" in proc.stderr and "hook says no" in proc.stderr
    assert ran.format(name=name) in (tmp / "ran").read_text() and not (tmp / "never").exists()
    assert world.client.ip("link", "show", name, check=False).returncode != 0
    assert world.snapshot() == before


def _normalised(snapshot: dict[str, str], name: str) -> dict[str, str]:
    out = dict(snapshot)
    out["nft"] = out["nft"].replace(f"table ip wg-quick-{name} ", f"table ip fzpoll-{name} ").replace(
        f"table ip6 wg-quick-{name} ", f"table ip6 fzpoll-{name} ")
    out["nft"] = re.sub(r"ip6 daddr fe80::[0-9a-f:]+ ", "ip6 daddr fe80::(link-local) ", out["nft"])
    lines = re.sub(rf"fe80::[0-9a-f:]+ dev {name} ", f"fe80::(link-local) dev {name} ", out["route6"]).splitlines()
    out["route6"] = "\n".join(sorted(lines))
    return out


def _kernel_wireguard(ns: Namespace) -> bool:
    probe = f"wgp{secrets.token_hex(2)}"
    if ns.ip("link", "add", probe, "type", "wireguard", check=False).returncode == 0:
        ns.ip("link", "del", probe, check=False)
        return True
    return os.path.exists("/sys/module/wireguard")


@pytest.mark.parametrize("table", ["auto", "1234"])
def test_same_rules_and_routes_as_wg_quick(world: World, tmp: Path, table: str) -> None:
    """The same file under wg-quick (wireguard-go) and under ``fzpoll up``, one after the other
    in the same namespace with the same interface name: identical ``ip rule``/``ip -6 rule``/
    ``ip route show table all``/``ip -6 route show table all``."""
    if shutil.which("wg-quick") is None:
        pytest.skip("needs wg-quick (wireguard-tools)")
    if _kernel_wireguard(world.client):
        pytest.skip("the kernel has WireGuard: wg-quick would not use wireguard-go")
    name = _name()
    before = world.snapshot()
    config = world.config(tmp / f"{name}.conf", f"0.0.0.0/0, ::/0, 10.55.0.0/24, {SERVER6}/128",
                          extra=f"Table = {table}\n")
    full = table == "auto"
    env = daemon_env(WG_QUICK_USERSPACE_IMPLEMENTATION="wireguard-go",
                     WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")

    def wg_quick(action: str) -> None:
        proc = subprocess.run(world.client.exec_argv(["wg-quick", action, str(config)]), env=env,
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr

    wg_quick("up")
    try:
        if full:
            _ping_through_tunnel(world, name, BEYOND4)
        by_wg_quick = world.snapshot()
    finally:
        wg_quick("down")
    wait_until(lambda: world.snapshot()["route4"] == before["route4"], 5, "wg-quick's routes to go")
    # wg-quick down removes the rules; it also leaves src_valid_mark set, as fzpoll does
    assert world.snapshot() == before
    daemon = Foreground(world.client, name, ("up", str(config)), tmp).wait_ready()
    if full:
        _ping_through_tunnel(world, name, BEYOND4)
    by_fzpoll = world.snapshot()
    assert ("lookup 51820" in by_fzpoll["rule4"]) == full and ("table 1234" in by_fzpoll["route4"]) != full
    # Normalised: the tunnel's IPv6 link-local address (random for each new TUN device) and the
    # order of the local table's lines, which follows that address; the nftables table's name
    # (wg-quick-IFACE / fzpoll-IFACE). Nothing else.
    _assert_same(_normalised(by_fzpoll, name), _normalised(by_wg_quick, name))
    _stop(daemon, world, before)
