"""The DNS stub in a running daemon: dig through sentinels, resources, TCP fallback, bounds.

Topology: the client namespace runs `fzpoll up` with `DNS =` pointing at dnsmasq in the peer's
namespace (reached over the underlay, from the daemon's own DNS sockets) and a `[Resource]` served
by the peer (a second fzpoll). Only addresses inside these namespaces are used.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from netns import Fzpoll, Namespace, veth_pair
from fzpoll.dns.shaper import DNS_QUERY_BURST, DNS_QUERY_RATE
from fzpoll.dns.stub import RECURSION_TIMEOUT
from fzpoll.wireguard.keys import PrivateKey

pytestmark = [pytest.mark.netns, pytest.mark.needs("netns", "dnsmasq", "dig")]

BIG_RECORDS = 40


def dig(ns: Namespace, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return ns.run(["dig", "+tries=1", "+time=2", *args], check=False, timeout=timeout)


def answers(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[-1] for line in result.stdout.splitlines()
            if line and not line.startswith(";") and len(line.split()) >= 5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns")
    with Namespace("c") as client, Namespace("p") as peer_ns:
        pair = veth_pair(client, peer_ns)
        hosts = tmp / "hosts"
        hosts.write_text("".join(f"192.0.2.{i} big.test\n" for i in range(1, BIG_RECORDS + 1))
                         + "198.51.100.7 www.upstream.test\n2001:db8::7 www.upstream.test\n")
        dnsmasq = peer_ns.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                                 "--no-hosts", f"--addn-hosts={hosts}", f"--listen-address={pair.ip_b}",
                                 "--bind-interfaces", "--port=53", "--pid-file="],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        key_c, key_p = PrivateKey.generate(os.urandom), PrivateKey.generate(os.urandom)
        name = f"fzdns{secrets.token_hex(2)}"  # the UAPI socket's path is shared by all namespaces
        conf = tmp / f"{name}.conf"
        conf.write_text(
            "[Interface]\n"
            f"PrivateKey = {key_c.base64()}\nListenPort = 51820\nAddress = 100.64.9.1/32\n"
            f"DNS = {pair.ip_b}, {pair.ip_b.rsplit('.', 1)[0]}.99\n"  # the second never answers
            "\n[Peer]\n"
            f"PublicKey = {key_p.public_key.base64()}\nEndpoint = {pair.ip_b}:51821\n"
            "AllowedIPs = 100.64.9.2/32\n"
            "\n[Resource]\n"
            f"Name = *.corp.test\nPeer = {key_p.public_key.base64()}\n"
        )
        log = open(tmp / "client.log", "w")
        daemon = client.popen([sys.executable, "-m", "fzpoll", "up", str(conf), "--log-level", "debug"],
                              stdout=log, stderr=subprocess.STDOUT)
        peer = Fzpoll(peer_ns).start()
        peer.configure(key_p.base64(), 51821)
        peer.add_peer(key_c.public_key.base64(), ["100.64.9.1/32"], f"{pair.ip_a}:51820")
        peer.address("100.64.9.2/32")
        peer.up()
        peer.route("100.64.9.1/32")
        deadline = time.monotonic() + 10
        while name not in client.ip("link", "show", check=False).stdout or \
                not list(client.ip_json("route", "show", "100.100.111.1")):
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp / "client.log").read_text()
            time.sleep(0.05)
        try:
            yield client, peer_ns, peer, pair, tmp, name
        finally:
            daemon.terminate()
            daemon.wait(timeout=5)
            log.close()
            dnsmasq.terminate()
            dnsmasq.wait(timeout=5)


def test_upstream_name_resolves_through_the_stub(setup):
    client, *_ = setup
    assert answers(dig(client, "@100.100.111.1", "www.upstream.test", "A")) == ["198.51.100.7"]
    assert answers(dig(client, "@100.100.111.1", "www.upstream.test", "AAAA")) == ["2001:db8::7"]


def test_resource_gets_stable_proxy_addresses_held_until_a_gateway_confirms(setup):
    client, peer_ns, peer, _pair, _tmp, _name = setup
    first = answers(dig(client, "@100.100.111.1", "app.corp.test", "A"))
    again = answers(dig(client, "@100.100.111.1", "app.corp.test", "A"))
    six = answers(dig(client, "@100.100.111.1", "app.corp.test", "AAAA"))
    assert first == again and len(first) == 1 and first[0].startswith("100.")
    assert six and six[0].startswith("fd00:2021:1111:8000:")
    assert answers(dig(client, "@100.100.111.1", "use-application-dns.net", "A")) == []
    # The peer is no gateway: it never confirms the name (DomainStatus), so the client holds the
    # packets to the proxy address and nothing reaches the peer's TUN device (end-to-end traffic
    # through a gateway: tests/test_gateway_netns.py).
    before = peer_ns.ip_json("-s", "link", "show", peer.ifname)[0]["stats64"]["rx"]["packets"]
    result = client.run(["ping", "-c", "2", "-W", "1", first[0]], check=False, timeout=15)
    after = peer_ns.ip_json("-s", "link", "show", peer.ifname)[0]["stats64"]["rx"]["packets"]
    assert result.returncode != 0 and after == before, result.stdout


def test_large_answer_comes_back_whole_via_tcp_fallback(setup):
    client, *_ = setup
    result = dig(client, "@100.100.111.1", "+noedns", "+ignore", "big.test", "A")
    assert len(answers(result)) == BIG_RECORDS, result.stdout


def test_unreachable_upstream_gives_no_answer_and_tunnel_keeps_working(setup):
    client, *_ = setup
    slow = subprocess.Popen(client.exec_argv(["dig", "+tries=1", "+time=3", "@100.100.111.2", "x.test"]),
                            stdout=subprocess.PIPE, text=True)
    ping = client.run(["ping", "-c", "5", "-i", "0.2", "-W", "2", "100.64.9.2"], check=False, timeout=15)
    out, _ = slow.communicate(timeout=15)
    assert ping.returncode == 0, ping.stdout
    assert "timed out" in out or "no servers could be reached" in out


# 1000 clients at once, each on its own socket with its own id. Like a real client (glibc, dig),
# one that got no answer, or SERVFAIL, asks again with the same id: UDP may lose a query on the
# way to the upstream (dnsmasq's socket buffer holds ~250 queries; a dnsmasq descheduled while
# the stub forwards the burst drops the rest, and the stub answers nothing to them, by design).
# An answer with another client's id is never accepted.
_CONCURRENT = """
import json, random, socket, struct, sys, time
n = int(sys.argv[1]); socks = []
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 0)); s.setblocking(False)
    qid = random.getrandbits(16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\\x03www\\x08upstream\\x04test\\x00" + struct.pack(">HH", 1, 1)
    s.sendto(q, ("100.100.111.1", 53)); socks.append((s, qid, q))
ok = wrong = retried = 0; pending = {entry[0].fileno(): entry for entry in socks}
deadline = time.monotonic() + 25; again = time.monotonic() + 2
while pending and time.monotonic() < deadline:
    for fd, (s, qid, q) in list(pending.items()):
        try:
            data = s.recv(4096)
        except BlockingIOError:
            continue
        if struct.unpack(">H", data[:2])[0] != qid:
            wrong += 1
        elif data[3] & 0xF == 0 and bytes([198, 51, 100, 7]) in data:
            ok += 1
            del pending[fd]
    if time.monotonic() >= again:  # the unanswered (or SERVFAILed) ask again
        for s, qid, q in pending.values():
            s.sendto(q, ("100.100.111.1", 53))
        retried += len(pending); again = time.monotonic() + 2
    time.sleep(0.01)
print(json.dumps({"ok": ok, "missing": len(pending), "wrong_id": wrong, "retried": retried}))
"""


def _dns_stats(client: Namespace, ifname: str) -> dict:
    shown = json.loads(client.run([sys.executable, "-m", "fzpoll", "show", ifname, "--json"]).stdout)
    return shown["interfaces"][0]["stats"]["dns"]


def test_1000_concurrent_queries_all_answered_with_their_own_ids(setup):
    client, peer_ns, peer, pair, tmp, ifname = setup
    # The stub holds at most 1000 queries (MAX_IN_FLIGHT): the previous test's query to an upstream
    # that never answers stays for 5 s, and would cost one of these a SERVFAIL whenever all 1000
    # are outstanding at once (an upstream slower than this client, under load). And the kernel's
    # limit passes a burst of exactly 1000 after a quiet second (DNS_QUERY_BURST).
    deadline = time.monotonic() + RECURSION_TIMEOUT + 5
    while _dns_stats(client, ifname)["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(DNS_QUERY_BURST / DNS_QUERY_RATE)
    before = _dns_stats(client, ifname)
    result = client.run([sys.executable, "-c", _CONCURRENT, "1000"], timeout=60)
    counts = json.loads(result.stdout)
    report = f"{counts}; stub before {before}, after {_dns_stats(client, ifname)}"
    assert counts["ok"] == 1000 and counts["missing"] == 0 and counts["wrong_id"] == 0, report
