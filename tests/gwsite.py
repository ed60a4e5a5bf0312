"""The three-namespace DNS-resource site shared by tests/test_gateway_netns.py and
tools/bench_gateway.py: a client and a gateway, both fzpoll, and a resource site.

Topology (three namespaces, veth pairs, only their own addresses)::

    client (fzpoll up: [Resource] *.corp.test, *.other.test via the gateway; DNS = two upstreams in G)
      |  veth A
    gateway (fzpoll up: [Gateway] Resources = *.corp.test, DNS = dnsmasq at R; forwarding and
      |      masquerade by the README's PostUp lines in its config; a dnsmasq and a forging server that
      |      are the client stub's upstreams)
      |  veth B
    resource site R (dnsmasq: app.corp.test A and AAAA; python3 -m http.server)

The client's stub has two upstreams in G: the forging server on G's IPv4 address (sentinel
100.100.111.1) and dnsmasq on G's IPv6 address (sentinel fd00:2021:1111:8000:100:100:111:1).
No address or route is added by hand on any host: the daemons add their own from the config.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from netns import Namespace, veth_pair
from fzpoll.wireguard.keys import PrivateKey

PAGE = "fzpoll gateway test page\n"
HTTP_PORT = 8080


def dig(ns: Namespace, *args: str) -> list[str]:
    """``dig +short`` inside ``ns``: the answer lines."""
    result = ns.run(["dig", "+tries=1", "+time=3", "+short", *args], check=False, timeout=15)
    return [line for line in result.stdout.split() if line and not line.startswith(";")]


# A stub upstream that forges before it answers: for each query it first sends the right answer
# from the right address but a wrong port, then one from the right port with the wrong question,
# then (after a short pause) the genuine answer.
_FORGER = r"""
import socket, struct, sys, time
host = sys.argv[1]
main = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); main.bind((host, 53))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); other.bind((host, 5353))
def answer(query, name_wire, address):
    qid = query[:2]
    return (qid + struct.pack(">HHHHH", 0x8180, 1, 1, 0, 0) + name_wire + struct.pack(">HH", 1, 1)
            + b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes(address))
while True:
    query, addr = main.recvfrom(4096)
    end = query.index(b"\x00", 12) + 1
    name = query[12:end]
    other.sendto(answer(query, name, [6, 6, 6, 6]), addr)
    main.sendto(answer(query, b"\x04evil\x04test\x00", [6, 6, 6, 7]), addr)
    time.sleep(0.05)
    main.sendto(answer(query, name, [198, 51, 100, 9]), addr)
"""


class Site:
    def __init__(self, tmp: Path, log_level: str = "debug") -> None:
        self.tmp = tmp
        self.log_level = log_level
        self.client = Namespace("client")
        self.gw = Namespace("gateway")
        self.site = Namespace("site")
        self.a = veth_pair(self.client, self.gw)
        self.b = veth_pair(self.gw, self.site)
        self.key_c, self.key_g = PrivateKey.generate(os.urandom), PrivateKey.generate(os.urandom)
        self.logs: dict[str, Path] = {}
        # Interface names (and so UAPI socket paths, which all namespaces share) unique per run.
        tag = secrets.token_hex(3)
        self.gw_if, self.cl_if = f"fzg{tag}", f"fzc{tag}"

    # ----------------------------------------------------------------------------- setup

    def start(self) -> None:
        site, gw, b = self.site, self.gw, self.b
        (self.tmp / "www").mkdir()
        (self.tmp / "www" / "index.html").write_text(PAGE)
        site.popen([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::",
                    "--directory", str(self.tmp / "www")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.site_log = self.tmp / "site-dnsmasq.log"
        self._dnsmasq(site, b.ip_b, self.site_log, f"--host-record=app.corp.test,{b.ip_b},{b.ip6_b}",
                      f"--listen-address={b.ip6_b}",
                      "--local=/corp.test/")
        self.upstream_log = self.tmp / "upstream-dnsmasq.log"
        self._dnsmasq(gw, self.a.ip6_b, self.upstream_log, "--host-record=www.upstream.test,198.51.100.7",
                      "--address=/upstream.test/198.51.100.8")
        gw.popen([sys.executable, "-c", _FORGER, self.a.ip_b])
        self.gateway_proc = self._fzpoll(gw, self.gw_if, self.gateway_conf())
        self.client_proc = self._fzpoll(self.client, self.cl_if, self.client_conf())

    def _dnsmasq(self, ns: Namespace, address: str, log: Path, *extra: str) -> None:
        ns.popen(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                  f"--listen-address={address}", "--bind-interfaces", "--port=53", "--pid-file=",
                  "--log-queries=extra", f"--log-facility={log}", *extra],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def gateway_conf(self) -> str:
        return (f"[Interface]\nPrivateKey = {self.key_g.base64()}\nListenPort = 51821\n"
                "Address = 100.64.0.1/32, fd00:2021:1111::1/128\n"
                # forwarding and masquerade: the README's PostUp/PostDown lines, run by fzpoll up
                "PostUp = sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n"
                "PostUp = nft add table inet fzgw; nft add chain inet fzgw post "
                "'{ type nat hook postrouting priority 100; }'; "
                f'nft add rule inet fzgw post oifname "{self.b.if_a}" masquerade\n'
                "PostDown = nft delete table inet fzgw\n"
                f"\n[Peer]\nPublicKey = {self.key_c.public_key.base64()}\n"
                "AllowedIPs = 100.64.0.2/32, fd00:2021:1111::2/128\n"
                f"\n[Gateway]\nResources = *.corp.test\nDNS = {self.b.ip_b}\n")

    def client_conf(self) -> str:
        gateway = self.key_g.public_key.base64()
        return (f"[Interface]\nPrivateKey = {self.key_c.base64()}\nListenPort = 51820\n"
                "Address = 100.64.0.2/32, fd00:2021:1111::2/128\n"
                f"DNS = {self.a.ip_b}, {self.a.ip6_b}\n"
                f"\n[Peer]\nPublicKey = {gateway}\nEndpoint = {self.a.ip_b}:51821\n"
                "AllowedIPs = 100.64.0.1/32, fd00:2021:1111::1/128\n"
                f"\n[Resource]\nName = *.corp.test\nPeer = {gateway}\n"
                f"\n[Resource]\nName = *.other.test\nPeer = {gateway}\n")

    def _fzpoll(self, ns: Namespace, name: str, conf: str) -> subprocess.Popen:
        path = self.tmp / f"{name}.conf"
        path.write_text(conf)
        path.chmod(0o600)
        log_path = self.tmp / f"{name}.log"
        self.logs[name] = log_path
        log = open(log_path, "a")
        proc = ns.popen([sys.executable, "-m", "fzpoll", "up", str(path), "--log-level", self.log_level],
                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 15
        while not ns.ip("link", "show", name, check=False).returncode == 0 or \
                not list(ns.ip_json("route", "show", "dev", name)):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        return proc

    def restart_gateway(self) -> None:
        self.gateway_proc.terminate()
        self.gateway_proc.wait(timeout=10)
        self.gateway_proc = self._fzpoll(self.gw, self.gw_if, self.gateway_conf())

    def log_tail(self) -> str:
        return "\n".join(f"--- {name}\n{path.read_text()[-3000:]}" for name, path in self.logs.items())

    def stats(self, ns: Namespace, name: str) -> dict:
        result = ns.run([sys.executable, "-m", "fzpoll", "show", name, "--json"], check=False, timeout=15)
        return json.loads(result.stdout)["interfaces"][0]["stats"]

    def close(self) -> None:
        for ns in (self.client, self.gw, self.site):
            ns.close()
