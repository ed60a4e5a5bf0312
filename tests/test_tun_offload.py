"""TUN offloads against the real kernel (fzpoll/io/tun.py, fzpoll/io/vnet.py).

Two TUN devices opened with ``IFF_VNET_HDR`` and TSO/USO/CSUM offloads, one in each of two
namespaces, are joined by a relay that does exactly what the daemon's datapath does with them:
every frame read is cut by ``vnet.split_frame`` into wire-sized packets, and those are written to
the other device either coalesced by ``vnet.coalesce`` (GSO frames) or one by one with an empty
header (plain frames, what a peer without offloads produces). Real TCP and UDP sockets talk
through it; the kernel on each side checks every checksum, and its bad-checksum counters must stay
at 0 while the data arrives intact.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import netns
from fzpoll.io import tun

pytestmark = pytest.mark.needs("netns")

_RELAY = r"""
import json, os, select, signal, subprocess, sys
from fzpoll.io import vnet
from fzpoll.io.tun import TunDevice

other_ns, mode = sys.argv[1], sys.argv[2]
a, b = (TunDevice(name, offload=True, segmentation=mode != "notso") for name in ("fzoa", "fzob"))
assert a.vnet_hdr and b.vnet_hdr, (a, b)
subprocess.run(["ip", "link", "set", "fzob", "netns", other_ns], check=True)
for prefix, dev, mine, theirs in (([], "fzoa", "1", "2"), (["-n", other_ns], "fzob", "2", "1")):
    def ip(*args):
        subprocess.run(["ip", *prefix, *args], check=True)
    ip("link", "set", dev, "mtu", "1420", "up")
    ip("addr", "add", f"10.77.0.{mine}/32", "dev", dev)
    ip("-6", "addr", "add", f"fd77::{mine}/128", "dev", dev, "nodad")
    ip("route", "add", f"10.77.0.{theirs}/32", "dev", dev)
    ip("-6", "route", "add", f"fd77::{theirs}/128", "dev", dev)
stats = dict(frames=0, super_packets=0, largest_frame=0, segments=0, gso_frames=0, plain_frames=0, bad=0)
signal.signal(signal.SIGTERM, lambda *_: (print(json.dumps(stats), flush=True), os._exit(0)))
print(a.offloads, flush=True)
peer = {a.fd: b, b.fd: a}
while True:
    for fd in select.select([a.fd, b.fd], [], [])[0]:
        packets = []
        for _ in range(64):
            try:
                frame = os.read(fd, 65600)
            except BlockingIOError:
                break
            stats["frames"] += 1
            stats["largest_frame"] = max(stats["largest_frame"], len(frame))
            segments = vnet.split_frame(frame)
            if segments is None:
                stats["bad"] += 1
                continue
            stats["super_packets"] += len(segments) > 1
            packets += segments
        stats["segments"] += len(packets)
        frames = [vnet.NO_OFFLOAD + p for p in packets] if mode == "plain" else vnet.coalesce(packets)
        for out in frames:
            if out[1] == vnet.GSO_NONE:
                stats["plain_frames"] += 1
            else:
                stats["gso_frames"] += 1
            os.write(peer[fd].fd, out)
"""

# A UDP sender using UDP_SEGMENT (the kernel hands the TUN one USO super-packet), a plain UDP
# datagram (checksum left partial under TUN_F_CSUM), and a receiver counting what arrives.
_UDP_RECEIVE = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7002)); s.settimeout(3)
print("ready", flush=True)
sizes = []
try:
    while len(sizes) < int(sys.argv[2]):
        sizes.append(len(s.recv(65535)))
except socket.timeout:
    pass
print(" ".join(map(str, sizes)), flush=True)
"""

_UDP_SEND = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.sendto(b"p" * 333, (sys.argv[1], 7002))               # alone, NEEDS_CSUM
s.setsockopt(socket.SOL_UDP, 103, 1000)                  # UDP_SEGMENT: 8 x 1000 + 1 x 77
s.sendto(b"s" * 8077, (sys.argv[1], 7002))
"""

SNMP_COUNTERS = (("/proc/net/snmp", "Tcp", "InCsumErrors"), ("/proc/net/snmp", "Udp", "InCsumErrors"),
                 ("/proc/net/snmp", "Ip", "InHdrErrors"), ("/proc/net/snmp6", "Udp6", "InCsumErrors"),
                 ("/proc/net/snmp6", "Ip6", "InHdrErrors"))


def bad_checksums(ns: netns.Namespace) -> dict[str, int]:
    """The kernel's counters of packets refused for a bad checksum or header, in ``ns``."""
    snmp = ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
    values: dict[str, int] = {}
    for names, numbers in zip(snmp[::2], snmp[1::2]):
        proto = names.split(":")[0]
        values.update({f"{proto}{k}": int(v) for k, v in zip(names.split()[1:], numbers.split()[1:])})
    for line in ns.run(["cat", "/proc/net/snmp6"]).stdout.splitlines():
        key, value = line.split()
        values[key] = int(value)
    return {f"{proto}{name}": values[f"{proto}{name}"] for _, proto, name in SNMP_COUNTERS}


def udp_through(src: netns.Namespace, dst: netns.Namespace, address: str) -> list[int]:
    receiver = dst.popen([sys.executable, "-c", _UDP_RECEIVE, address, "10"], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    src.run([sys.executable, "-c", _UDP_SEND, address])
    out, _ = receiver.communicate(timeout=10)
    return sorted(int(n) for n in out.split())


# gso: super-packets read (TSO) and coalesced writes; plain: super-packets read, packets written one
# by one; notso: no TSO asked for (single packets read), coalesced writes all the same
@pytest.mark.parametrize("mode", ["gso", "plain", "notso"])
def test_kernel_accepts_split_and_coalesced_packets(mode: str) -> None:
    with netns.Namespace() as a, netns.Namespace() as b:
        relay = a.popen(["env", f"PYTHONPATH={netns.Path(__file__).resolve().parent.parent}",
                         sys.executable, "-c", _RELAY, b.name, mode], stdout=subprocess.PIPE, text=True)
        assert relay.stdout is not None
        offloads = relay.stdout.readline().strip()
        assert "gro" in offloads and ("tso4" in offloads) is (mode != "notso"), offloads
        for src, dst, address in ((a, b, "10.77.0.2"), (b, a, "10.77.0.1"), (a, b, "fd77::2"),
                                  (b, a, "fd77::1")):
            netns.transfer(src, dst, address, 1 << 20)
        udp = {address: udp_through(a, b, address) for address in ("10.77.0.2", "fd77::2")}
        relay.terminate()
        stats = json.loads(relay.communicate(timeout=5)[0])
        counters = {ns.tag: bad_checksums(ns) for ns in (a, b)}
    assert all(v == 0 for c in counters.values() for v in c.values()), counters
    for address, sizes in udp.items():
        assert sizes == [77, 333] + [1000] * 8, (address, sizes)
    assert stats["bad"] == 0, stats
    if mode == "notso":
        assert stats["super_packets"] == 0 and stats["largest_frame"] <= 1430, stats
    else:
        assert stats["super_packets"] > 0 and stats["largest_frame"] > 1500, \
            f"the kernel never handed the relay a super-packet: {stats}"
    if mode != "plain":
        assert stats["gso_frames"] > 0, f"nothing was coalesced: {stats}"
    else:
        assert stats["gso_frames"] == 0 and stats["plain_frames"] == stats["segments"], stats


_CONTROL = r"""
import ipaddress, os, socket, subprocess
from fzpoll.io import vnet
from fzpoll.io.tun import TunDevice
from fzpoll.ippacket import build_udp
t = TunDevice("fzoc", offload=True)
subprocess.run(["ip", "addr", "add", "10.78.0.1/24", "dev", "fzoc"], check=True)
subprocess.run(["ip", "link", "set", "fzoc", "up"], check=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.78.0.1", 7003)); s.settimeout(2)
good = build_udp(ipaddress.ip_address("10.78.0.2"), ipaddress.ip_address("10.78.0.1"), 9, 7003, b"ok")
bad = good[:-1] + b"K"  # payload changed, checksum not
os.write(t.fd, vnet.NO_OFFLOAD + bad)
os.write(t.fd, vnet.NO_OFFLOAD + good)
print(s.recv(100).decode())
"""


def test_the_kernel_counts_a_bad_checksum_written_to_tun() -> None:
    """The control for the test above: its counters do move when a checksum is wrong."""
    with netns.Namespace() as ns:
        assert ns.python(_CONTROL).stdout.strip() == "ok"
        assert bad_checksums(ns)["UdpInCsumErrors"] == 1


def test_offloads_can_be_switched_off() -> None:
    assert tun.offload_disabled({"FZPOLL_DISABLE_OFFLOAD": "gso,tun"})
    assert not tun.offload_disabled({"FZPOLL_DISABLE_OFFLOAD": "gso,gro"})
    assert not tun.offload_disabled({})
    assert tun.segmentation_enabled({"FZPOLL_ENABLE_OFFLOAD": "tso"}) and not tun.segmentation_enabled({})
    with netns.Namespace() as ns:
        out = ns.python("from fzpoll.io.tun import TunDevice\n"
                        "for on, tso in ((True, True), (True, False), (False, True)):\n"
                        "    with TunDevice('fzo%d', offload=on, segmentation=tso) as t:\n"
                        "        print(on, t.vnet_hdr, ','.join(t.offloads))\n").stdout.split("\n")
        assert out[0].startswith("True True gro,csum,tso4,tso6"), out
        assert out[1] == "True True gro", out
        assert out[2] == "False False ", out
