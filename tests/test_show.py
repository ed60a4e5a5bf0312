"""``fzpoll show`` and the fzpoll-only ``get=fzpoll`` UAPI request.

Three layers:

- the request itself on :class:`UapiConnection` (framing, no provider, a failing provider), and
  the pure parsing and rendering of :mod:`fzpoll.show`;
- :func:`fzpoll.show.show` against a :class:`UapiServer` run in this process by a real
  :class:`Loop` (with a stats provider), against a server that closes on ``get=fzpoll`` as
  wireguard-go does, and with no daemon at all; ``wg`` against the same in-process server;
- end to end in namespaces: ``python -m fzpoll show --json`` against running fzpoll daemons (the
  counters part is skipped, saying so, while the daemon does not pass a stats provider) and
  against wireguard-go.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

import netns
from fzpoll import show as show_mod
from fzpoll.errors import DropReason
from fzpoll.wireguard.keys import PresharedKey
from fzpoll.io.datapath import Datapath
from fzpoll.io.loop import Loop
from fzpoll.show import InterfaceStatus, PeerStatus, format_text, parse_get, parse_stats, status_json
from fzpoll.uapi.protocol import STATS_REQUEST, UapiConnection, handle_get, handle_get_stats, handle_set
from fzpoll.uapi.server import UapiServer
from helpers import WALL, FakeHost, key, skip_unless

REPO = Path(__file__).resolve().parent.parent


OWN, PEER, PEER2 = key(1), key(2).public_key, key(3).public_key
PSK = PresharedKey(bytes(range(32)))


def configured_host() -> FakeHost:
    host = FakeHost(3, ephemeral_port=0)
    body = [
        f"private_key={OWN.hex()}", "listen_port=51820", "fwmark=4660",
        f"public_key={PEER.hex()}", f"preshared_key={PSK.hex()}", "endpoint=192.0.2.7:51821",
        "persistent_keepalive_interval=25", "allowed_ip=100.64.0.2/32", "allowed_ip=fd00:64::2/128",
        f"public_key={PEER2.hex()}", "allowed_ip=10.9.0.0/24",
    ]
    assert handle_set(host, body, 0.0) == 0
    peer = host.engine.get_peer(PEER)
    peer.last_handshake_wall, peer.rx_bytes, peer.tx_bytes = WALL - 65, 1536, 3 << 20
    return host


def sample_stats() -> dict[str, Any]:
    """The shape Daemon.stats_snapshot returns (UapiServer(..., stats=daemon.stats_snapshot))."""
    return {
        "daemon": {"pid": 4242, "interface": "wg0", "schedule": "fair", "batch_size": 64,
                   "listen_port": 51820, "config": "/etc/fzpoll/wg0.conf", "uapi_clients": 1,
                   "udp_offloads": {"gso": True, "gro": False}, "tun_offloads": ["gro", "csum", "tso4", "tso6"],
                   "sodium": {"kind": "system", "via": "dlopen", "library": "libsodium.so.23", "version": "1.0.18"}},
        "drops": {"bad_tag": 3, "no_route": 11},
        "poller": {"passes": 90, "udp_packets_in": 120, "tun_packets_in": 80, "max_udp_batch": 7,
                   "max_tun_batch": 5, "errors": {"no_route": 11, "bad_tag": 3}},
        "pending_writes": {"tun": 0, "udp4": 2, "udp6": 0},
        "staged_packets": 0,
    }


# ---------------------------------------------------------------------------------------------
# get=fzpoll on one connection


def test_stats_request_answers_one_json_line_then_errno() -> None:
    stats = sample_stats()
    stats["daemon"]["config"] = "/etc/a\nb.conf"  # a newline inside a value stays escaped
    c = UapiConnection(configured_host(), stats=lambda: stats)
    out = c.receive_data(STATS_REQUEST, 0.0)
    assert out.endswith(b"\nerrno=0\n\n")
    (line, tail) = out.decode().split("\n", 1)
    assert tail == "errno=0\n\n"
    assert line.startswith("fzpoll_stats=")
    assert json.loads(line[len("fzpoll_stats="):]) == stats
    assert not c.closing and c.requests == 1


def test_stats_request_pipelines_with_get_and_set() -> None:
    host = configured_host()
    c = UapiConnection(host, stats=sample_stats)
    out = c.receive_data(b"get=fzpoll\n\nset=1\nfwmark=0\n\nget=1\n\nget=fzpoll\n\n", 0.0)
    assert out == (handle_get_stats(sample_stats) + "errno=0\n\n" + handle_get(host)
                   + handle_get_stats(sample_stats)).encode()
    assert c.requests == 4 and not c.closing


def test_get_1_is_unchanged_by_a_stats_provider() -> None:
    host = configured_host()
    with_stats = UapiConnection(host, stats=sample_stats).receive_data(b"get=1\n\n", 0.0)
    without = UapiConnection(host).receive_data(b"get=1\n\n", 0.0)
    assert with_stats == without == handle_get(host).encode()
    assert b"fzpoll" not in with_stats


def test_stats_request_without_provider_is_an_unknown_operation() -> None:
    c = UapiConnection(configured_host())
    assert c.receive_data(STATS_REQUEST, 0.0) == b"errno=-71\n\n"
    assert c.closing


@pytest.mark.parametrize("data", [b"get=fzpoll2\n\n", b"GET=FZPOLL\n\n", b"get=fzpoll \n\n", b"get=2\n\n"])
def test_other_unknown_operations_unchanged_with_a_provider(data: bytes) -> None:
    c = UapiConnection(configured_host(), stats=sample_stats)
    assert c.receive_data(data, 0.0) == b"errno=-71\n\n"
    assert c.closing


def test_stats_request_needs_its_blank_line() -> None:
    c = UapiConnection(configured_host(), stats=sample_stats)
    assert c.receive_data(b"get=fzpoll\n", 0.0) == b""  # waits for the blank line
    assert c.receive_data(b"xget=1\n\n", 0.0) == b"errno=-22\n\n" + handle_get(c.host).encode()


def test_failing_provider_is_eio_for_that_client_only(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    c = UapiConnection(configured_host(), stats=broken)
    with caplog.at_level("ERROR", logger="fzpoll.uapi.protocol"):
        assert c.receive_data(STATS_REQUEST, 0.0) == f"errno=-{errno.EIO}\n\n".encode()
    assert c.closing
    assert "uapi request failed" in caplog.text


# ---------------------------------------------------------------------------------------------
# Parsing and rendering


def test_parse_get_reads_every_standard_field_and_no_secret() -> None:
    host = configured_host()
    status = parse_get("wg0", handle_get(host))
    assert status.public_key == OWN.public_key.base64()
    assert (status.listen_port, status.fwmark) == (51820, 4660)
    first, second = status.peers
    assert first == PeerStatus(
        public_key=PEER.base64(), has_preshared_key=True, endpoint="192.0.2.7:51821",
        allowed_ips=("100.64.0.2/32", "fd00:64::2/128"), latest_handshake=int(WALL) - 65,
        rx_bytes=1536, tx_bytes=3 << 20, persistent_keepalive=25)
    assert second.public_key == PEER2.base64() and not second.has_preshared_key
    assert second.endpoint is None and second.latest_handshake == 0
    text = format_text([status], WALL)
    doc = json.dumps(status_json([status], WALL))
    for secret in (OWN, PSK):
        for form in (secret.hex(), secret.base64()):
            assert form not in text and form not in doc


def test_parse_get_errors() -> None:
    with pytest.raises(show_mod.QueryError, match="errno=-22"):
        parse_get("wg0", "errno=-22\n\n")
    with pytest.raises(show_mod.QueryError, match="without a valid errno"):
        parse_get("wg0", "")
    with pytest.raises(show_mod.QueryError, match="malformed"):
        parse_get("wg0", "listen_port=x\nerrno=0\n\n")


@pytest.mark.parametrize("answer", ["", "errno=-71\n\n", "fzpoll_stats=[1]\nerrno=0\n\n",
                                    "fzpoll_stats={bad\nerrno=0\n\n"])
def test_parse_stats_none_when_not_provided(answer: str) -> None:
    assert parse_stats(answer) is None


def test_ago_and_transfer_formats_match_wg() -> None:
    assert show_mod.ago(0, WALL) == "never"
    assert show_mod.ago(int(WALL) - 1, WALL) == "1 second ago"
    assert show_mod.ago(int(WALL) - 42, WALL) == "42 seconds ago"
    assert show_mod.ago(int(WALL) - 3725, WALL) == "1 hour, 2 minutes, 5 seconds ago"
    assert show_mod.ago(int(WALL), WALL) == "Now"
    assert show_mod.ago(int(WALL) + 5, WALL) == "in the future (system clock wound backward?)"
    assert show_mod._bytes(1023) == "1023 B"
    assert show_mod._bytes(1536) == "1.50 KiB"
    assert show_mod._bytes(3 << 20) == "3.00 MiB"


def test_text_report() -> None:
    status = parse_get("wg0", handle_get(configured_host()))
    status = InterfaceStatus(**{**status.__dict__, "stats": sample_stats()})
    text = format_text([status], WALL)
    expected_head = f"""\
interface: wg0
  public key: {OWN.public_key.base64()}
  private key: (hidden)
  listening port: 51820
  fwmark: 0x1234

peer: {PEER.base64()}
  preshared key: (hidden)
  endpoint: 192.0.2.7:51821
  allowed ips: 100.64.0.2/32, fd00:64::2/128
  latest handshake: 1 minute, 5 seconds ago
  transfer: 1.50 KiB received, 3.00 MiB sent
  persistent keepalive: every 25 seconds

peer: {PEER2.base64()}
  allowed ips: 10.9.0.0/24

fzpoll: pid 4242, schedule fair, batch size 64, listen port 51820
  offloads: udp gso; tun gro,csum,tso4,tso6
  libsodium: system (libsodium.so.23 1.0.18, via dlopen)
  loop: 90 passes, packets in: 120 udp, 80 tun; max batch: 7 udp, 5 tun
  errors: no_route 11, bad_tag 3
  drops: no_route 11, bad_tag 3
  pending writes: tun 0, udp4 2, udp6 0
  staged packets: 0
"""
    assert text == expected_head
    without = format_text([InterfaceStatus(**{**status.__dict__, "stats": None})], WALL)
    assert without.endswith("fzpoll: (no fzpoll counters: the daemon does not answer get=fzpoll)\n")


def test_json_document() -> None:
    status = parse_get("wg0", handle_get(configured_host()))
    doc = status_json([InterfaceStatus(**{**status.__dict__, "stats": sample_stats()})], WALL)
    assert doc["time"] == int(WALL)
    (iface,) = doc["interfaces"]
    assert iface["stats"] == sample_stats()
    peer = iface["peers"][0]
    assert peer["latest_handshake_seconds_ago"] == 65
    assert peer["allowed_ips"] == ["100.64.0.2/32", "fd00:64::2/128"]
    assert iface["peers"][1]["latest_handshake_seconds_ago"] is None
    json.dumps(doc)  # plain JSON types only


# ---------------------------------------------------------------------------------------------
# show() against servers in this process


@contextmanager
def served(name: str, socket_dir: str, host: FakeHost, stats: Any = None) -> Iterator[UapiServer]:
    """A UapiServer in a real Loop (with a Datapath for the engine), run by a thread until the block ends."""
    loop = Loop()
    Datapath(host.engine, loop, None)
    server = UapiServer(name, host, loop, socket_dir=socket_dir, stats=stats)
    loop.add_timer_source(server.next_deadline, server.expire_idle)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            loop.run_once(max_timeout=0.02)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        server.close()
        loop.close()


def run_show(*args: Any, **kwargs: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = show_mod.show(*args, out=out, err=err, **kwargs)
    return code, out.getvalue(), err.getvalue()


def test_show_json_with_stats_from_a_real_poller(tmp_path: Path) -> None:
    host = configured_host()
    holder: dict[str, Datapath] = {}

    def stats() -> dict[str, Any]:
        datapath = holder["datapath"]
        return {"daemon": {"pid": os.getpid(), "schedule": datapath.loop.schedule,
                           "batch_size": datapath.batch_size, "listen_port": host.listen_port},
                "drops": dict(host.engine.drops), "poller": datapath.stats.as_dict(),
                "pending_writes": datapath.pending_writes()}

    with served("fzs0", str(tmp_path), host, stats) as server:
        holder["datapath"] = server.loop.datapath  # type: ignore[attr-defined]
        host.engine.count_drop(DropReason.NO_ROUTE, 2)
        code, out, err = run_show("fzs0", as_json=True, socket_dir=str(tmp_path))
    assert (code, err) == (0, "")
    (iface,) = json.loads(out)["interfaces"]
    assert iface["name"] == "fzs0" and iface["listen_port"] == 51820
    assert [p["public_key"] for p in iface["peers"]] == [PEER.base64(), PEER2.base64()]
    stats_doc = iface["stats"]
    assert stats_doc["daemon"] == {"pid": os.getpid(), "schedule": "fair", "batch_size": 64,
                                   "listen_port": 51820}
    assert stats_doc["drops"] == {"no_route": 2}
    # (the keepalive the set sends has no UDP socket here: counted as write_failed errors)
    assert stats_doc["poller"]["passes"] > 0 and isinstance(stats_doc["poller"]["errors"], dict)
    assert stats_doc["pending_writes"] == {"tun": 0}


def test_show_all_interfaces_text(tmp_path: Path) -> None:
    with served("fzs1", str(tmp_path), configured_host(), sample_stats), \
            served("fzs2", str(tmp_path), FakeHost(3, ephemeral_port=0)):
        code, out, err = run_show(None, socket_dir=str(tmp_path))
    assert (code, err) == (0, "")
    first, second = out.split("\n\ninterface: ")
    assert first.startswith("interface: fzs1\n") and "drops: no_route 11, bad_tag 3" in first
    assert second.startswith("fzs2\n\nfzpoll: (no fzpoll counters")  # no key, no provider


def test_show_a_daemon_that_closes_on_get_fzpoll(tmp_path: Path) -> None:
    """What wireguard-go does with an operation it does not know: close, no answer."""
    host = configured_host()
    path = str(tmp_path / "fzs3.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    requests: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                data = conn.recv(4096)
                requests.append(data)
                if data == b"get=1\n\n":
                    conn.sendall(handle_get(host).encode())
                    conn.recv(4096)  # wireguard-go waits for the next operation: EOF here

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        code, out, err = run_show("fzs3", as_json=True, socket_dir=str(tmp_path))
    finally:
        thread.join(5)
        listener.close()
    assert (code, err) == (0, "")
    assert requests == [b"get=1\n\n", STATS_REQUEST]
    (iface,) = json.loads(out)["interfaces"]
    assert iface["stats"] is None and len(iface["peers"]) == 2


def test_show_with_no_daemon(tmp_path: Path) -> None:
    code, out, err = run_show(None, socket_dir=str(tmp_path / "missing"))
    assert (code, out) == (1, "")
    assert err == f"fzpoll: no interfaces: no daemon is running (no sockets in {tmp_path / 'missing'})\n"
    code, out, err = run_show("wg9", socket_dir=str(tmp_path))
    assert (code, out) == (1, "")
    assert err == f"fzpoll: interface wg9: no socket {tmp_path}/wg9.sock: no daemon serves this interface\n"
    code, _, err = run_show("../x", socket_dir=str(tmp_path))
    assert code == 1 and "invalid interface name" in err


def test_show_stale_socket_reported_others_shown(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "fzs4.sock"))
    stale.close()  # bound, never listened: connect() is refused, as for a dead daemon's socket
    with served("fzs5", str(tmp_path), configured_host(), sample_stats):
        code, out, err = run_show(None, as_json=True, socket_dir=str(tmp_path))
    assert code == 1
    assert "fzpoll: interface fzs4: nobody listens on" in err and "stale socket" in err
    assert [i["name"] for i in json.loads(out)["interfaces"]] == ["fzs5"]


def test_cli_dispatch_prints_the_no_daemon_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fzpoll", "show", f"fzt-none-{secrets.token_hex(3)}"],
                          capture_output=True, text=True, cwd=REPO, timeout=20)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no daemon serves this interface" in proc.stderr


# ---------------------------------------------------------------------------------------------
# wg against a server with a stats provider; fzpoll show against running daemons (root)


@pytest.mark.needs("wireguard-go")
def test_wg_show_works_against_a_server_with_stats() -> None:
    netns.cleanup_stale()
    name = f"wgt{secrets.token_hex(2)}"
    host = configured_host()
    with served(name, str(netns.WG_SOCKET_DIR), host, sample_stats):
        dump = netns.parse_wg_dump(subprocess.run(["wg", "show", name, "dump"], capture_output=True,
                                                  text=True, timeout=10, check=True).stdout)
        code, out, err = run_show(name, as_json=True)
    assert dump.public_key == OWN.public_key.base64() and dump.listen_port == 51820
    assert dump.peer(PEER.base64()).allowed_ips == ("100.64.0.2/32", "fd00:64::2/128")
    assert code == 0, err
    (iface,) = json.loads(out)["interfaces"]
    assert iface["public_key"] == dump.public_key and iface["stats"] == sample_stats()


@pytest.fixture(scope="module")
def fzpoll_pair() -> Iterator[tuple[netns.WireguardGo, netns.WireguardGo]]:
    skip_unless("wireguard-go")
    netns.cleanup_stale()
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        pair = netns.veth_pair(ns_a, ns_b)
        a, b = netns.wg_pair(ns_a, ns_b, pair, kind_a=netns.Fzpoll, kind_b=netns.Fzpoll)
        ns_a.run(["ping", "-c", "3", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
        yield a, b


def fzpoll_show_json(ns: netns.Namespace, ifname: str) -> dict[str, Any]:
    proc = ns.run(["env", f"PYTHONPATH={REPO}", sys.executable, "-W", "error", "-m", "fzpoll",
                   "show", ifname, "--json"], timeout=20)
    assert proc.stderr == ""
    (iface,) = json.loads(proc.stdout)["interfaces"]
    return iface


@pytest.mark.netns
def test_e2e_show_json_standard_fields(fzpoll_pair) -> None:
    a, b = fzpoll_pair
    iface = fzpoll_show_json(a.ns, a.ifname)
    dump = a.wg_show_dump()
    assert iface["name"] == a.ifname
    assert iface["public_key"] == dump.public_key and iface["listen_port"] == 51820 == dump.listen_port
    (peer,) = iface["peers"]
    (wg_peer,) = dump.peers
    assert peer["public_key"] == wg_peer.public_key == b.public_key()
    assert peer["endpoint"] == wg_peer.endpoint and peer["endpoint"].endswith(":51821")
    assert peer["allowed_ips"] == ["100.64.0.2/32", "fd00:64::2/128"]
    assert peer["latest_handshake"] > 0 and 0 <= peer["latest_handshake_seconds_ago"] < 60
    assert abs(peer["latest_handshake"] - wg_peer.latest_handshake) <= 1
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    text = a.ns.run(["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "fzpoll", "show", a.ifname],
                    timeout=20).stdout
    assert text.startswith(f"interface: {a.ifname}\n")
    assert re.search(r"\n  latest handshake: (Now|\d+ seconds? ago)\n", text), text


@pytest.mark.netns
def test_e2e_show_json_fzpoll_counters(fzpoll_pair) -> None:
    a, _b = fzpoll_pair
    iface = fzpoll_show_json(a.ns, a.ifname)
    stats = iface["stats"]
    assert stats is not None, "the fzpoll daemon answers get=fzpoll (its UapiServer has stats=)"
    assert stats["daemon"]["pid"] == a.proc.pid  # `ip netns exec` execs the daemon: same pid
    assert stats["daemon"]["schedule"] == "fair" and stats["daemon"]["batch_size"] == 64
    assert stats["daemon"]["listen_port"] == 51820
    poller = stats["poller"]
    assert poller["passes"] > 0 and poller["udp_packets_in"] >= 3 and poller["tun_packets_in"] >= 3
    assert poller["max_udp_batch"] >= 1 and poller["max_tun_batch"] >= 1
    assert isinstance(poller["errors"], dict) and isinstance(stats["drops"], dict)
    assert set(stats["pending_writes"]) >= {"tun", "udp4"}
    assert all(v == 0 for v in stats["pending_writes"].values())  # an idle tunnel waits for nothing


@pytest.mark.netns
@pytest.mark.needs("wireguard-go")
def test_e2e_show_wireguard_go_standard_part_only() -> None:
    with netns.Namespace("g") as ns:
        wg = netns.WireguardGo(ns).start()
        wg.configure(netns.genkey(), 40001)
        peer = netns.pubkey(netns.genkey())
        wg.add_peer(peer, ["10.9.0.0/24"])
        iface = fzpoll_show_json(ns, wg.ifname)
        assert iface["public_key"] == wg.public_key() and iface["listen_port"] == 40001
        assert [p["public_key"] for p in iface["peers"]] == [peer]
        assert iface["peers"][0]["allowed_ips"] == ["10.9.0.0/24"]
        assert iface["stats"] is None
        # recognised by its process name: not asked, so it logs no "invalid UAPI operation"
        assert "invalid UAPI operation" not in wg.log()


def test_dns_lines_show_the_kernel_limit_and_its_drops() -> None:
    status = parse_get("wg0", handle_get(configured_host()))
    dns = {"in_flight": 2, "tcp_connections": 0, "drops": {"dns_shed": 5}, "stats": {"queries": 9},
           "kernel": {"rate": 1000, "passed": 3001, "dropped": 438535, "queued": 64}}
    text = format_text([InterfaceStatus(**{**status.__dict__, "stats": {**sample_stats(), "dns": dns}})], WALL)
    assert "  dns: 2 in flight, 0 tcp connections; drops: dns_shed 5; stats: queries 9\n" in text
    assert "  dns kernel limit: 1000 queries/s to the sentinels; passed 3001, dropped 438535, queued 64\n" in text
    off = {**dns, "kernel": {"rate": 0, "off": "FZPOLL_DNS_RATE=0"}}
    text = format_text([InterfaceStatus(**{**status.__dict__, "stats": {**sample_stats(), "dns": off}})], WALL)
    assert "  dns kernel limit: off (FZPOLL_DNS_RATE=0)\n" in text
