"""The namespace test infrastructure, TunDevice and the netlink helpers, exercised for real.

If these pass, a failing interop test is about fzpoll, not about the test bed: namespaces link,
two stock wireguard-go peers form a tunnel, and our TUN device and netlink wrappers configure an
interface the kernel routes packets into.
"""

from __future__ import annotations

import json

import pytest

import netns
from fzpoll.io import tun
from fzpoll.errors import LocalError

@pytest.fixture(scope="module", autouse=True)
def _stale() -> None:
    if netns.need_root() is None:
        netns.cleanup_stale()


def ping(ns: netns.Namespace, address: str, count: int = 1) -> None:
    """Ping from ``ns``; a first packet may be spent on a handshake, so allow a few tries."""
    ns.run(["ping", "-c", str(count), "-i", "0.2", "-W", "1", "-w", "4", address], timeout=8)


@pytest.mark.netns
@pytest.mark.needs("netns")
def test_veth_pair_pings_across() -> None:
    with netns.Namespace() as a, netns.Namespace() as b:
        pair = netns.veth_pair(a, b)
        ping(a, pair.ip_b)
        ping(b, pair.ip6_a)
        assert pair.ip_b.startswith("10.231.")
        names = [n["name"] for n in json.loads(
            netns._cmd(["ip", "-j", "netns", "list"]).stdout or "[]")]
        assert a.name in names and b.name in names
    names = [n["name"] for n in json.loads(
        netns._cmd(["ip", "-j", "netns", "list"]).stdout or "[]")]
    assert a.name not in names and b.name not in names


@pytest.mark.netns
@pytest.mark.needs("wireguard-go")
def test_wireguard_go_tunnel_v4_and_v6() -> None:
    with netns.Namespace() as a, netns.Namespace() as b:
        pair = netns.veth_pair(a, b)
        wg_a, wg_b = netns.wg_pair(a, b, pair)
        ping(a, "100.64.0.2", count=2)
        ping(b, "fd00:64::1", count=2)
        dump_a, dump_b = wg_a.wg_show_dump(), wg_b.wg_show_dump()
        assert dump_a.listen_port == 51820 and dump_b.listen_port == 51821
        peer = dump_a.peer(dump_b.public_key or "")
        assert peer.endpoint == f"{pair.ip_b}:51821"
        assert set(peer.allowed_ips) == {"100.64.0.2/32", "fd00:64::2/128"}
        assert peer.latest_handshake > 0 and peer.rx_bytes > 0 and peer.tx_bytes > 0
        sock = wg_a.socket_path
        assert sock.exists()
    assert not sock.exists()
    assert wg_a.proc is not None and wg_a.proc.returncode is not None


# Runs inside the namespace: opens the TUN, configures it with fzpoll.io.netlink, shows the result
# with `ip -j`, then sends UDP into the routed prefixes and reads the packets back from the TUN.
_TUN_SCRIPT = r"""
import json, select, socket, struct, subprocess
from fzpoll.io import netlink
from fzpoll.errors import LocalError
from fzpoll.io.tun import TunDevice

def ip_json(*args):
    return json.loads(subprocess.run(["ip", "-j", *args], check=True, capture_output=True,
                                     text=True, timeout=5).stdout or "[]")

def read_matching(dev, want_dst, family):
    buf = bytearray(2048)
    view = memoryview(buf)
    while True:
        if not select.select([dev], [], [], 2.0)[0]:
            return None
        n = dev.read_into(buf)
        pkt = bytes(view[:n])
        if family == 4 and pkt[0] >> 4 == 4 and pkt[9] == 17 and pkt[16:20] == want_dst:
            return pkt
        if family == 6 and pkt[0] >> 4 == 6 and pkt[6] == 17 and pkt[24:40] == want_dst:
            return pkt

out = {}
dev = TunDevice("fzt0")
out["name"] = dev.name
try:
    TunDevice("fzt0")
except LocalError as e:
    out["busy"] = str(e)
try:
    TunDevice("lo")
except LocalError as e:
    out["not_tun"] = str(e)
try:
    dev.read()
except BlockingIOError:
    out["empty_raises"] = True
netlink.set_mtu("fzt0", 1380)
for cidr in ("100.64.0.1/32", "fd00:64::1/128", "100.64.0.1/32"):
    netlink.add_address("fzt0", cidr)
netlink.set_up("fzt0")
for cidr in ("10.99.0.0/24", "10.99.0.0/24", "fd99::/64", "fd99::5/64"):
    netlink.add_route("fzt0", cidr)
out["link"] = ip_json("link", "show", "dev", "fzt0")
out["addr"] = ip_json("addr", "show", "dev", "fzt0")
out["routes4"] = ip_json("-4", "route", "show", "dev", "fzt0")
out["routes6"] = ip_json("-6", "route", "show", "dev", "fzt0")
with TunDevice("fzt1"):
    netlink.set_up("fzt1")
    try:
        netlink.add_route("fzt1", "10.99.0.0/24")
    except LocalError as e:
        out["route_conflict"] = str(e)
    for cidr in ("0.0.0.0/0", "0.0.0.0/0", "::/0", "::/0"):  # no RTA_DST: the default route
        netlink.add_route("fzt1", cidr)
    out["defaults"] = [ip_json(f, "route", "show", "default", "dev", "fzt1") for f in ("-4", "-6")]
    try:
        netlink.add_route("fzt0", "0.0.0.0/0")
    except LocalError as e:
        out["default_conflict"] = str(e)
try:
    netlink.set_mtu("nope0", 1380)
except LocalError as e:
    out["missing_link"] = str(e)
try:
    netlink.set_mtu("fzt0", 10)
except LocalError as e:
    out["bad_mtu"] = str(e)

# Drain what the kernel sent on its own when the link came up (IPv6 MLD/RS), then probe.
while True:
    try:
        dev.read()
    except BlockingIOError:
        break
for family, dst, raw in ((4, "10.99.0.5", socket.inet_aton("10.99.0.5")),
                         (6, "fd99::5", socket.inet_pton(socket.AF_INET6, "fd99::5"))):
    with socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6,
                       socket.SOCK_DGRAM) as s:
        s.sendto(b"fzpoll-probe", (dst, 9999))
    pkt = read_matching(dev, raw, family)
    out[f"probe{family}"] = pkt.hex() if pkt else None

# A packet written to the TUN is delivered by the kernel: UDP 10.99.0.5 -> 100.64.0.1:7777.
def udp4(src, dst, sport, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # no UDP checksum
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                                socket.inet_aton(src), socket.inet_aton(dst)))
    csum = sum(struct.unpack("!10H", hdr))
    csum = (csum & 0xFFFF) + (csum >> 16)
    hdr[10:12] = struct.pack("!H", ~csum & 0xFFFF)
    return bytes(hdr) + udp

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
    rx.bind(("100.64.0.1", 7777))
    rx.settimeout(2)
    packet = udp4("10.99.0.5", "100.64.0.1", 9999, 7777, b"fzpoll-inject")
    out["written"] = [dev.write(packet), len(packet)]
    try:
        data, addr = rx.recvfrom(100)
        out["delivered"] = [data.decode(), addr[0]]
    except socket.timeout:
        out["delivered"] = None

netlink.del_route("fzt0", "10.99.0.0/24")
netlink.del_route("fzt0", "10.99.0.0/24")
out["routes4_after_del"] = ip_json("-4", "route", "show", "dev", "fzt0")
out["exists_before"] = netlink.link_exists("fzt0")
netlink.delete_link("fzt0")
netlink.delete_link("fzt0")
out["exists_after"] = netlink.link_exists("fzt0")
dev.close()
dev.close()
print(json.dumps(out))
"""


@pytest.mark.netns
@pytest.mark.needs("netns")
def test_tun_device_and_netlink_in_namespace() -> None:
    with netns.Namespace() as ns:
        out = json.loads(ns.python(_TUN_SCRIPT, timeout=15).stdout)
    assert out["name"] == "fzt0"
    assert "busy" in out["busy"]
    assert "another type" in out["not_tun"]
    assert out["empty_raises"] is True
    (link,) = out["link"]
    assert link["mtu"] == 1380 and "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]) for a in out["addr"][0]["addr_info"]}
    assert {("100.64.0.1", 32), ("fd00:64::1", 128)} <= addrs
    assert {r["dst"] for r in out["routes4"]} >= {"10.99.0.0/24"}
    assert {r["dst"] for r in out["routes6"]} >= {"fd99::/64"}
    assert "no network interface named 'nope0'" in out["missing_link"]
    assert "already exists through another interface" in out["route_conflict"]
    assert [[r["dst"] for r in routes] for routes in out["defaults"]] == [["default"], ["default"]]
    assert out["default_conflict"] == ("cannot add route 0.0.0.0/0 via fzt0: a route for it "
                                       "already exists through another interface")
    assert "EINVAL" in out["bad_mtu"]
    probe4 = bytes.fromhex(out["probe4"])
    assert probe4[0] >> 4 == 4 and probe4[9] == 17 and probe4.endswith(b"fzpoll-probe")
    probe6 = bytes.fromhex(out["probe6"])
    assert probe6[0] >> 4 == 6 and probe6[6] == 17 and probe6.endswith(b"fzpoll-probe")
    assert out["written"][0] == out["written"][1]
    assert out["delivered"] == ["fzpoll-inject", "10.99.0.5"]
    assert "10.99.0.0/24" not in {r["dst"] for r in out["routes4_after_del"]}
    assert out["exists_before"] is True and out["exists_after"] is False


def test_missing_tun_device_is_a_clear_local_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun, "TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(LocalError, match="/nonexistent/net/tun does not exist") as info:
        tun.TunDevice("fzt0")
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "has space"])
def test_bad_interface_name_is_a_local_error(name: str) -> None:
    with pytest.raises(LocalError, match="interface name"):
        tun.TunDevice(name)


@pytest.mark.netns
@pytest.mark.needs("netns", "setpriv")
def test_without_cap_net_admin_says_so() -> None:
    code = (
        "from fzpoll.io.tun import TunDevice\n"
        "from fzpoll.errors import LocalError\n"
        "try:\n    TunDevice('fzt0')\nexcept LocalError as e:\n    print(e)\n"
    )
    drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
    with netns.Namespace() as ns:
        proc = ns.python(code, wrapper=drop)
    assert "needs CAP_NET_ADMIN" in proc.stdout
