"""DNS resources end to end: a client and a gateway, both fzpoll, and a resource site
(topology: tests/gwsite.py).

No address or route is added by hand on any host: the daemons add their own from the config.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from gwsite import HTTP_PORT, PAGE, Site, dig
from netns import Namespace

SENTINEL6 = "@fd00:2021:1111:8000:100:100:111:1"  # dnsmasq's (100.100.111.1 is the forging upstream's)

pytestmark = [pytest.mark.netns, pytest.mark.needs("netns", "dnsmasq", "dig", "curl", "nft")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("gateway"))
    try:
        s.start()
        yield s
    finally:
        s.close()


def curl(ns: Namespace, url: str, max_time: float = 10) -> subprocess.CompletedProcess:
    return ns.run(["curl", "-sS", "-g", "--max-time", str(max_time), url], check=False, timeout=max_time + 5)


def test_name_resolves_to_a_proxy_and_http_ping_work_v4(site):
    proxies = dig(site.client, "@100.100.111.1", "app.corp.test", "A")
    assert len(proxies) == 1 and proxies[0].startswith("100."), proxies
    result = curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/")
    assert result.stdout == PAGE, result.stderr + site.log_tail()
    ping = site.client.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", proxies[0]], check=False, timeout=20)
    assert ping.returncode == 0, ping.stdout


def test_aaaa_and_ipv6_traffic(site):
    proxies = dig(site.client, "@100.100.111.1", "app.corp.test", "AAAA")
    assert len(proxies) == 1 and proxies[0].startswith("fd00:2021:1111:8000:"), proxies
    result = curl(site.client, f"http://[{proxies[0]}]:{HTTP_PORT}/")
    assert result.stdout == PAGE, result.stderr + site.log_tail()
    ping = site.client.run(["ping", "-6", "-c", "3", "-i", "0.2", "-W", "3", proxies[0]], check=False, timeout=20)
    assert ping.returncode == 0, ping.stdout


_PROBE = """
import socket
address, port, kind = ARGS
family = socket.AF_INET6 if ":" in address else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM); s.settimeout(5)
try:
    s.connect((address, port))
    if kind == "udp":
        s.send(b"probe"); s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


def probe(site, address: str, port: int, kind: str) -> str:
    return site.client.python(_PROBE.replace("ARGS", repr((address, port, kind)))).stdout.strip()


@pytest.mark.parametrize("qtype", ["A", "AAAA"])
def test_udp_and_errors_from_the_far_side_through_the_nat(site, qtype):
    proxy = dig(site.client, "@100.100.111.1", "app.corp.test", qtype)[0]
    # UDP: the resource site's own dnsmasq, asked at the proxy address
    assert dig(site.client, f"@{proxy}", "app.corp.test", qtype) == [site.b.ip_b if qtype == "A" else site.b.ip6_b]
    # an ICMP port unreachable from the far side, translated back (the quoted packet too, or the
    # client's kernel would not match it to the socket): ECONNREFUSED
    assert probe(site, proxy, 5999, "udp") == "refused"
    # a TCP RST from the far side: ECONNREFUSED too
    assert probe(site, proxy, 5999, "tcp") == "refused"


@pytest.mark.parametrize("name", ["app.other.test", "gone.corp.test"])
def test_name_not_served_or_not_resolving_is_unreachable_quickly(site, name):
    proxies = dig(site.client, "@100.100.111.1", name, "A")
    assert len(proxies) == 1, proxies
    started = time.monotonic()
    result = curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/", max_time=8)
    took = time.monotonic() - started
    assert result.returncode == 7, (result.returncode, result.stderr)  # couldn't connect
    assert took < 5, took  # an ICMP error, not a timeout
    ping = site.client.run(["ping", "-c", "1", "-W", "3", proxies[0]], check=False, timeout=10)
    assert ping.returncode != 0 and "Unreachable" in ping.stdout, ping.stdout


def test_recursive_queries_leave_from_random_ports(site):
    for i in range(20):
        assert dig(site.client, SENTINEL6, f"n{i}.upstream.test", "A") == ["198.51.100.8"]
    text = site.upstream_log.read_text()
    ports = set(re.findall(r" \S+/(\d+) query\[A\] n\d+\.upstream\.test", text))
    assert len(ports) >= 15, text[-2000:]


def test_forged_answers_are_dropped_and_counted(site):
    assert dig(site.client, "@100.100.111.1", "forge.test", "A") == ["198.51.100.9"]
    drops = site.stats(site.client, site.cl_if)["dns"]["drops"]
    assert drops.get("dns_reply_wrong_source", 0) >= 1 and drops.get("dns_reply_question_mismatch", 0) >= 1, drops


def test_client_reload_keeps_proxy_addresses_routed(site):
    proxies = dig(site.client, "@100.100.111.1", "app.corp.test", "A")
    assert curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/").stdout == PAGE
    before = site.logs[site.cl_if].read_text().count("configuration reloaded")
    site.client_proc.send_signal(signal.SIGHUP)  # syncconf: the peers' allowed IPs are replaced
    deadline = time.monotonic() + 10
    while site.logs[site.cl_if].read_text().count("configuration reloaded") == before:
        assert time.monotonic() < deadline, site.log_tail()
        time.sleep(0.05)
    result = curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/")
    assert result.stdout == PAGE, result.stderr + site.log_tail()


def test_gateway_restart_client_tells_it_again_and_traffic_resumes(site):
    proxies = dig(site.client, "@100.100.111.1", "app.corp.test", "A")
    assert curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/").stdout == PAGE
    site.restart_gateway()
    deadline = time.monotonic() + 45
    while True:  # the client's session is stale until it handshakes again (up to ~15 s)
        result = curl(site.client, f"http://{proxies[0]}:{HTTP_PORT}/", max_time=5)
        if result.stdout == PAGE or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert result.stdout == PAGE, result.stderr + site.log_tail()
    gateway = site.stats(site.gw, site.gw_if)["resources"]["gateway"]
    assert gateway["stats"].get("assigned_ips", 0) >= 1, gateway


def test_dns_over_tcp_to_the_sentinel(site):
    assert dig(site.client, "@100.100.111.1", "+tcp", "app.corp.test", "A") == \
        dig(site.client, "@100.100.111.1", "app.corp.test", "A")
    assert dig(site.client, SENTINEL6, "+tcp", "www.upstream.test", "A") == ["198.51.100.7"]
    six = dig(site.client, SENTINEL6, "+tcp", "app.corp.test", "AAAA")
    assert len(six) == 1 and six[0].startswith("fd00:2021:1111:8000:"), six
    # several queries on one connection (dig keeps it open for a batch with +keepopen)
    batch = site.client.run(["dig", "+tcp", "+keepopen", "+short", SENTINEL6, "www.upstream.test",
                             "n1.upstream.test"], check=False, timeout=15)
    assert batch.stdout.split() == ["198.51.100.7", "198.51.100.8"], batch.stdout + batch.stderr
