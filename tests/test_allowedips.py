"""Cryptokey routing: longest prefix match for v4 and v6, moves, removal, scale."""

import ipaddress
import random

from fzpoll.wireguard.allowedips import AllowedIPs


def test_longest_prefix_match_v4():
    t = AllowedIPs()
    t.insert("0.0.0.0/0", "default")
    t.insert("10.0.0.0/8", "ten")
    t.insert("10.1.0.0/16", "ten-one")
    t.insert("10.1.2.3/32", "host")
    assert t.lookup("10.1.2.3") == "host"
    assert t.lookup("10.1.2.4") == "ten-one"
    assert t.lookup("10.2.0.1") == "ten"
    assert t.lookup("192.0.2.1") == "default"
    assert t.lookup(ipaddress.ip_address("10.1.9.9").packed) == "ten-one"


def test_longest_prefix_match_v6_and_families_are_separate():
    t = AllowedIPs()
    t.insert("fd00::/8", "ula")
    t.insert("fd00:1::/32", "site")
    t.insert("fd00:1::5/128", "host")
    t.insert("0.0.0.0/0", "v4-default")
    assert t.lookup("fd00:1::5") == "host"
    assert t.lookup("fd00:1::6") == "site"
    assert t.lookup("fdff::1") == "ula"
    assert t.lookup("2001:db8::1") is None  # no v6 default; the v4 one does not apply


def test_insert_moves_prefix_and_remove_value():
    t = AllowedIPs()
    t.insert("10.0.0.0/24", "a")
    t.insert("10.0.1.0/24", "a")
    t.insert("10.0.0.0/24", "b")  # moves to b
    assert t.lookup("10.0.0.1") == "b"
    assert [str(n) for n in t.prefixes("a")] == ["10.0.1.0/24"]
    t.remove_value("a")
    assert t.lookup("10.0.1.1") is None
    assert t.lookup("10.0.0.1") == "b"
    t.remove("10.0.0.5/24")  # host bits are ignored
    assert t.lookup("10.0.0.1") is None and len(t) == 0


def test_thousands_of_peers_match_a_reference():
    rng = random.Random(3)
    t = AllowedIPs()
    nets = {}
    for i in range(5000):
        plen = rng.choice([8, 16, 20, 24, 28, 32])
        net = ipaddress.ip_network((rng.getrandbits(32), plen), strict=False)
        nets[net] = i
        t.insert(net, i)
    for _ in range(300):
        addr = ipaddress.ip_address(rng.getrandbits(32))
        best = max((n for n in nets if addr in n), key=lambda n: n.prefixlen, default=None)
        assert t.lookup(addr.packed) == (nets[best] if best is not None else None)
