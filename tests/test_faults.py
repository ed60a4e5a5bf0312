"""Faults around two fzpoll daemons in network namespaces: loss, restarts, roaming, UAPI abuse.

Loss is injected with an nftables netdev *ingress* rule on each side's veth (this kernel has no
netem, and the same rule on egress counts but does not drop; see the harness README). The rule
sees socket buffers, not datagrams: fzpoll sends with UDP GSO (up to 64 datagrams in one buffer
that crosses the veth whole), so 20% of buffers would be bursts of lost datagrams. For per-datagram
loss the loss test sets ``gso_max_segs 1`` on both veth ends, which makes the kernel segment before
the veth. Every test builds its own namespaces and tears them down; together they take well
under a minute.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

import pytest

import netns
from fzpoll.wireguard.constants import REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX
from netns import Fzpoll, Namespace, transfer, veth_pair, wg_pair

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go", "nft")]

# One lost handshake message costs a retry after REKEY_TIMEOUT (+ jitter); allow one, plus slack.
RESUME_WITHIN = REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX + 1.5


def ping_until(ns: Namespace, address: str, within: float) -> float:
    """Ping every 0.1 s until one reply; the seconds it took (fails after ``within``)."""
    start = time.monotonic()
    result = ns.run(["ping", "-c", "1", "-i", "0.1", "-w", str(int(within + 0.999)), address],
                    check=False, timeout=within + 10)
    took = time.monotonic() - start
    assert result.returncode == 0, f"no reply within {within:.1f} s:\n{result.stdout}{result.stderr}"
    return took


def ping(ns: Namespace, address: str, count: int = 3) -> None:
    result = ns.run(["ping", "-c", str(count), "-i", "0.2", "-W", "2", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def udp_loss(ns: Namespace, device: str, percent: int) -> None:
    """Drop ``percent``% of the UDP packets arriving on ``device`` (nftables netdev ingress)."""
    ns.run(["nft", "add", "table", "netdev", "loss"])
    ns.run(["nft", "add", "chain", "netdev", "loss", "in",
            f"{{ type filter hook ingress device {device} priority 0; }}"])
    ns.run(["nft", "add", "rule", "netdev", "loss", "in", "meta", "l4proto", "udp",
            "numgen", "random", "mod", "100", "<", str(percent), "counter", "drop"])


def drop_initiations(ns: Namespace, device: str) -> None:
    """Drop every handshake initiation (a 148-byte UDP payload) arriving on ``device``."""
    ns.run(["nft", "add", "table", "netdev", "drop1"])
    ns.run(["nft", "add", "chain", "netdev", "drop1", "in",
            f"{{ type filter hook ingress device {device} priority 0; }}"])
    ns.run(["nft", "add", "rule", "netdev", "drop1", "in", "meta", "l4proto", "udp",
            "udp", "length", "156", "counter", "drop"])


def dropped(ns: Namespace) -> int:
    out = ns.run(["nft", "list", "table", "netdev", "loss"]).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


def logs_on_failure(*daemons):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb):
            if kind is not None and issubclass(kind, AssertionError):
                for d in daemons:
                    print(f"--- {d.ifname} log ---\n" + d.log()[-3000:])
            return False

    return _Guard()


def test_twenty_percent_loss_each_way():
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        for ns, device in ((ns_a, pair.if_a), (ns_b, pair.if_b)):
            ns.ip("link", "set", "dev", device, "gso_max_segs", "1")  # one datagram per buffer
            udp_loss(ns, device, 20)
        a, b = wg_pair(ns_a, ns_b, pair, kind_a=Fzpoll, kind_b=Fzpoll)
        with logs_on_failure(a, b):
            # The handshake completes: each attempt succeeds with p = 0.8 * 0.8, a failed one is
            # retried every REKEY_TIMEOUT; 6 attempts fail together with p < 0.3 %.
            took = ping_until(ns_a, "100.64.0.2", within=6 * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX))
            seconds = transfer(ns_a, ns_b, "100.64.0.2", 2 << 20)  # 2 MiB, retransmitted by TCP, intact
            # ~1500 datagrams carried the data: about 300 of them must have been dropped.
            assert dropped(ns_b) > 100 and dropped(ns_a) > 0, (dropped(ns_a), dropped(ns_b))
        print(f"handshake after {took:.2f} s, 2 MiB in {seconds:.2f} s, "
              f"dropped {dropped(ns_a)} + {dropped(ns_b)} UDP packets")


def _restart(daemon: netns.WireguardGo, ns: Namespace, private_key: str, port: int,
             peer_key: str, peer_endpoint: str, mine: str, theirs: str) -> netns.WireguardGo:
    daemon.stop()
    fresh = Fzpoll(ns, ifname=daemon.ifname).start()
    fresh.configure(private_key, port)
    fresh.add_peer(peer_key, [f"100.64.0.{theirs}/32", f"fd00:64::{theirs}/128"], peer_endpoint)
    fresh.address(f"100.64.0.{mine}/32")
    fresh.up()
    fresh.route(f"100.64.0.{theirs}/32")
    return fresh


def test_peer_restart_with_same_keys_then_new_keys():
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b = wg_pair(ns_a, ns_b, pair, kind_a=Fzpoll, kind_b=Fzpoll)
        ping(ns_a, "100.64.0.2", count=1)
        key_a = a.wg("show", a.ifname, "private-key").stdout.strip()
        key_b = b.wg("show", b.ifname, "private-key").stdout.strip()
        pub_a = netns.pubkey(key_a)

        # Same keys: B comes back with no session; its first packet handshakes again at once
        # (A accepts: B's TAI64N is newer), and A's old session is replaced.
        b = _restart(b, ns_b, key_b, 51821, pub_a, f"{pair.ip_a}:51820", "2", "1")
        with logs_on_failure(a, b):
            took = ping_until(ns_b, "100.64.0.1", within=RESUME_WITHIN)
            ping(ns_a, "100.64.0.2", count=2)
        print(f"same keys: resumed after {took:.2f} s")

        # Again, but B's first initiation is lost: its retry, REKEY_TIMEOUT later, gets through.
        b = _restart(b, ns_b, key_b, 51821, pub_a, f"{pair.ip_a}:51820", "2", "1")
        drop_initiations(ns_a, pair.if_a)
        threading.Timer(1.0, lambda: ns_a.run(["nft", "delete", "table", "netdev", "drop1"])).start()
        with logs_on_failure(a, b):
            took = ping_until(ns_b, "100.64.0.1", within=RESUME_WITHIN)
            ping(ns_a, "100.64.0.2", count=2)
        assert took >= REKEY_TIMEOUT - 0.2, f"resumed after {took:.2f} s: was an initiation lost?"
        print(f"same keys, first initiation lost: resumed after {took:.2f} s")

        # New keys: B restarts as somebody else; A is reconfigured with wg set (old peer removed,
        # new one added), and A's first packet to the new peer handshakes at once.
        new_key_b = netns.genkey()
        b = _restart(b, ns_b, new_key_b, 51821, pub_a, f"{pair.ip_a}:51820", "2", "1")
        a.set("peer", netns.pubkey(key_b), "remove")
        a.add_peer(netns.pubkey(new_key_b), ["100.64.0.2/32", "fd00:64::2/128"], f"{pair.ip_b}:51821")
        with logs_on_failure(a, b):
            took = ping_until(ns_a, "100.64.0.2", within=RESUME_WITHIN)
            ping(ns_b, "100.64.0.1", count=2)
            (peer,) = a.wg_show_dump().peers
            assert peer.public_key == netns.pubkey(new_key_b) and peer.latest_handshake > 0
        print(f"new keys: resumed after {took:.2f} s")


def test_roaming_follows_a_new_port_and_a_new_address():
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b = wg_pair(ns_a, ns_b, pair, kind_a=Fzpoll, kind_b=Fzpoll)
        with logs_on_failure(a, b):
            ping(ns_a, "100.64.0.2", count=1)
            assert b.wg_show_dump().peers[0].endpoint == f"{pair.ip_a}:51820"

            # A new source port: A's next authenticated packet moves B's endpoint for A.
            a.set("listen-port", "51830")
            ping(ns_a, "100.64.0.2", count=2)
            assert b.wg_show_dump().peers[0].endpoint == f"{pair.ip_a}:51830"
            ping(ns_b, "100.64.0.1", count=2)  # B answers at the new port

            # A new source address: the old one goes away (the new one is promoted in its place).
            new_ip = pair.ip_a.rsplit(".", 1)[0] + ".77"
            ns_a.run(["sysctl", "-qw", f"net.ipv4.conf.{pair.if_a}.promote_secondaries=1"])
            ns_a.ip("addr", "add", f"{new_ip}/24", "dev", pair.if_a)
            ns_a.ip("addr", "del", pair.addr_a, "dev", pair.if_a)
            ping(ns_a, "100.64.0.2", count=2)
            assert b.wg_show_dump().peers[0].endpoint == f"{new_ip}:51830"
            ping(ns_b, "100.64.0.1", count=2)
            assert b.wg_show_dump().peers[0].latest_handshake > 0


def _client(path, payload: bytes | None, read: bool, results: dict, name: str) -> None:
    """One misbehaving UAPI client: sends ``payload`` (None: nothing), reads or not."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(4)
    try:
        s.connect(str(path))
        results[name + "_socket"] = s  # kept open (and silent, or unread) until the test ends
        if payload is None:
            results[name] = "silent"
            return
        sent = 0
        view = memoryview(payload)
        while sent < len(payload):
            sent += s.send(view[sent:sent + 65536])
        results[name] = f"sent {sent}"
        if read:
            results[name] += f", answer {s.recv(200)[:40]!r}"
    except OSError as exc:  # refused, reset, or blocked by backpressure: all fine for the server
        results[name] = f"{type(exc).__name__} after {sent if payload else 0} bytes"


def test_uapi_abuse_does_not_stall_the_tunnel():
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b = wg_pair(ns_a, ns_b, pair, kind_a=Fzpoll, kind_b=Fzpoll)
        ping(ns_a, "100.64.0.2", count=1)
        pinger = ns_a.popen(["ping", "-c", "100", "-i", "0.04", "-W", "1", "100.64.0.2"],
                            stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        big_set = b"set=1\n" + b"allowed_ip=10.9.0.0/16\n" * (10 * (1 << 20) // 23)
        clients = {
            "silent": None,
            "garbage": os.urandom(256 * 1024),
            "ten_megabytes_of_set": big_set,
            "ten_megabytes_of_get_never_read": b"get=1\n\n" * (10 * (1 << 20) // 7),
        }
        results: dict = {}
        threads = [threading.Thread(target=_client, args=(b.socket_path, payload, name == "garbage",
                                                          results, name))
                   for name, payload in clients.items()]
        try:
            for t in threads:
                t.start()
            time.sleep(0.5)
            # While they hang on, the UAPI still serves wg (and the peer was not reconfigured).
            dump = b.wg_show_dump()
            assert dump.peers[0].allowed_ips == ("100.64.0.1/32", "fd00:64::1/128")
            for t in threads:
                t.join(timeout=10)
            out, _ = pinger.communicate(timeout=20)
        finally:
            for key in [k for k in results if k.endswith("_socket")]:
                results.pop(key).close()
        print(results)
        print(out.strip().splitlines()[-2:])
        loss = float(re.search(r"([\d.]+)% packet loss", out).group(1))
        rtt_max = float(re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", out).group(1))
        with logs_on_failure(a, b):
            assert loss <= 2.0, out
            assert rtt_max < 500, out
            assert b.proc.poll() is None
            ping(ns_a, "100.64.0.2", count=1)
            assert b.wg_show_dump().peers[0].allowed_ips == ("100.64.0.1/32", "fd00:64::1/128")
