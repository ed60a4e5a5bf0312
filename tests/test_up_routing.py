"""wg-quick's routing decisions (pure): which table each prefix goes to, rule pairs, rt_tables."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from fzpoll.errors import LocalError
from fzpoll.up.rules import RT_TABLE_MAIN, Rule
from fzpoll.up.routing import parse_rt_tables, plan_routes, resolve_table, route_order, rule_pair, wants_policy_rules

NETS = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0", "10.0.0.0/8", "fd00::/64", "100.64.0.2/32")]


def test_auto_sends_defaults_to_their_own_table_and_the_rest_to_main():
    plan = plan_routes(NETS, None, 51820)
    assert plan.routes == {(51820, NETS[0]), (51820, NETS[1]), (RT_TABLE_MAIN, NETS[2]),
                           (RT_TABLE_MAIN, NETS[3]), (RT_TABLE_MAIN, NETS[4])}
    assert plan.default_families == {socket.AF_INET, socket.AF_INET6} and plan.table == 51820
    assert plan_routes(NETS, "auto", 51820) == plan


def test_auto_without_a_default_needs_no_rules():
    plan = plan_routes(NETS[2:], None, 0)
    assert plan.default_families == frozenset() and plan.table == 0
    assert not wants_policy_rules(NETS[2:], None)
    assert wants_policy_rules(NETS[1:2], "auto") and not wants_policy_rules(NETS, 1234)


def test_ipv6_only_default():
    plan = plan_routes(NETS[1:2], None, 51821)
    assert plan.routes == {(51821, NETS[1])} and plan.default_families == {socket.AF_INET6}


def test_table_number_takes_every_prefix_and_no_rules():
    plan = plan_routes(NETS, 1234, 0)
    assert plan.routes == {(1234, net) for net in NETS}
    assert plan.default_families == frozenset()


def test_table_off_adds_nothing():
    assert plan_routes(NETS, "off", 0).routes == frozenset()


def test_rules_in_wg_quick_order():
    first, second = rule_pair(socket.AF_INET, 51820)
    assert first == Rule(socket.AF_INET, 0, 51820, fwmark=51820, invert=True)
    assert second == Rule(socket.AF_INET, 0, RT_TABLE_MAIN, suppress_prefixlength=0)
    assert Rule.from_json(first.to_json()) == first


def test_routes_added_longest_prefix_first():
    order = [net for _, net in route_order({(RT_TABLE_MAIN, n) for n in NETS})]
    assert [str(n) for n in order] == ["fd00::/64", "100.64.0.2/32", "10.0.0.0/8", "::/0", "0.0.0.0/0"]


def test_rt_tables(tmp_path):
    path = tmp_path / "rt_tables"
    path.write_text("# comment\n255\tlocal\n254 main\n100 vpn # ours\n0x10 hexed\nbad line\n")
    assert parse_rt_tables(path.read_text()) == {"local": 255, "main": 254, "vpn": 100, "hexed": 16}
    assert resolve_table("vpn", [str(path)]) == 100
    assert resolve_table("main", []) == RT_TABLE_MAIN
    assert resolve_table("1234", []) == 1234
    assert resolve_table(None, []) is None and resolve_table("off", []) == "off"
    with pytest.raises(LocalError, match="no routing table of that name"):
        resolve_table("nosuch", [str(path)])


def test_nft_script_replaces_the_table_in_one_transaction():
    from fzpoll.up.firewall import full_tunnel_script

    text = full_tunnel_script("wg0", socket.AF_INET6, 51820, ["fd00::1"])
    lines = text.splitlines()
    assert lines[:3] == ["add table ip6 fzpoll-wg0", "delete table ip6 fzpoll-wg0", "add table ip6 fzpoll-wg0"]
    assert 'add rule ip6 fzpoll-wg0 preraw iifname != "wg0" ip6 daddr fd00::1 fib saddr type != local drop' in lines
    assert "add rule ip6 fzpoll-wg0 postmangle meta l4proto udp mark 0xca6c ct mark set mark" in lines
    assert lines[-1] == "add rule ip6 fzpoll-wg0 premangle meta l4proto udp meta mark set ct mark"
