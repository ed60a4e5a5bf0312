"""Security properties: replays are rejected, no key material reaches the logs, the UAPI socket
is root's alone.

Engine-level tests use the fake-network pair; the end-to-end ones run fzpoll daemons in network
namespaces (root only, skipped otherwise).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import netns
from fzpoll.show import query
from helpers import ADDR_A, ADDR_B, TUN_A, TUN_B, Pair, established, ip4
from fzpoll.wireguard.constants import REPLAY_WINDOW_SIZE
from fzpoll.wireguard.engine import Engine
from fzpoll.errors import DropReason as D
from fzpoll.jsonlog import setup_logging
from fzpoll.wireguard.keys import PrivateKey
from fzpoll.uapi.protocol import handle_set
from fzpoll.uapi.server import UapiServer
from netns import Fzpoll, Namespace, veth_pair

# =============================================================================================
# Replays, engine level


def from_a(p: Pair, payload: bytes = b"data") -> bytes:
    p.a.send(ip4(TUN_A, TUN_B, payload), p.now)
    (data,) = p.take(p.a)
    return data


def test_replayed_transport_packet_is_rejected():
    p = established()
    packets = [from_a(p, b"%d" % i) for i in range(5)]
    for data in reversed(packets):  # out of order is fine, once
        assert p.b.receive(data, ADDR_A, p.now) is None
    assert len(p.tun(p.b)) == 5
    rx = p.peer_a.rx_bytes
    for data in packets:
        assert p.b.receive(data, ADDR_A, p.now) == D.REPLAYED
    assert len(p.tun(p.b)) == 5 and p.peer_a.rx_bytes == rx
    assert p.b.drops[D.REPLAYED] == 5


def test_replay_from_another_address_does_not_move_the_endpoint():
    p = established()
    data = from_a(p)
    assert p.b.receive(data, ADDR_A, p.now) is None
    assert p.b.receive(data, ("203.0.113.66", 4444), p.now) == D.REPLAYED
    assert p.peer_a.endpoint == ADDR_A


def test_packet_older_than_the_window_is_rejected_even_if_never_seen():
    p = established()
    old = from_a(p, b"old")  # counter n, held back by an attacker
    for _ in range(REPLAY_WINDOW_SIZE + 1):
        p.peer_b.current.send_counter += 1  # skip ahead without the cost of encrypting
    p.b.receive(from_a(p, b"new"), ADDR_A, p.now)
    assert p.b.receive(old, ADDR_A, p.now) == D.REPLAYED


def test_replayed_initiation_is_rejected_and_answered_with_nothing():
    p = established()
    first_initiation = next(d for direction, d in p.wire if direction == "a->b" and d[0] == 1)
    current = p.peer_a.current
    p.clock.now += 30.0
    assert p.b.receive(first_initiation, ADDR_A, p.now) == D.REPLAYED_HANDSHAKE
    assert p.out(p.b) == [] and p.peer_a.current is current and p.peer_a.next is None
    # Still rejected after a newer handshake, and from another address.
    p.peer_b.last_sent_handshake_at = float("-inf")
    p.a.initiate_handshake(p.peer_b, p.now)
    p.deliver()
    p.clock.now += 30.0
    assert p.b.receive(first_initiation, ("203.0.113.66", 4444), p.now) == D.REPLAYED_HANDSHAKE
    assert p.peer_a.endpoint == ADDR_A and p.out(p.b) == []


def test_replayed_response_is_rejected(pair: Pair):
    p = pair
    p.handshake()
    response = next(d for direction, d in p.wire if direction == "b->a" and d[0] == 2)
    current = p.peer_b.current
    assert p.a.receive(response, ADDR_B, p.now) == D.UNEXPECTED_RESPONSE
    assert p.peer_b.current is current


# =============================================================================================
# End to end (namespaces)

def needs_netns(test):
    """Runs daemons in network namespaces: root, /dev/net/tun, ip and wg (skipped otherwise)."""
    return pytest.mark.netns(pytest.mark.needs("wireguard-go")(test))

_CAPTURE = r"""
import select, socket, sys, time
ifname, port, kind, size, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((ifname, 0))
print("ready", flush=True)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    if not select.select([s], [], [], 0.2)[0]:
        continue
    frame, addr = s.recvfrom(65535)
    if addr[2] == socket.PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
        continue
    ip = frame[14:]
    if ip[9] != 17:
        continue
    udp = ip[(ip[0] & 15) * 4:]
    payload = udp[8:int.from_bytes(udp[4:6], "big")]
    if int.from_bytes(udp[2:4], "big") == port and payload[:1] == bytes([kind]) and len(payload) == size:
        print(payload.hex(), flush=True)
        sys.exit(0)
sys.exit(1)
"""

_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def ping(ns: Namespace, address: str, count: int = 3) -> None:
    result = ns.run(["ping", "-c", str(count), "-i", "0.2", "-W", "3", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def fzpoll_pair(ns_a: Namespace, ns_b: Namespace, pair, psk: str | None = None):
    """Two fzpoll daemons (debug logs) with a tunnel 100.64.0.1 <-> 100.64.0.2; keys returned."""
    a, b = Fzpoll(ns_a).start(), Fzpoll(ns_b).start()
    key_a, key_b = netns.genkey(), netns.genkey()
    a.configure(key_a, 51820)
    b.configure(key_b, 51821)
    a.add_peer(netns.pubkey(key_b), ["100.64.0.2/32"], f"{pair.ip_b}:51821", preshared_key=psk)
    b.add_peer(netns.pubkey(key_a), ["100.64.0.1/32"], f"{pair.ip_a}:51820", preshared_key=psk)
    for wg, mine, theirs in ((a, "1", "2"), (b, "2", "1")):
        wg.address(f"100.64.0.{mine}/32")
        wg.up()
        wg.route(f"100.64.0.{theirs}/32")
    return a, b, key_a, key_b


@needs_netns
def test_replayed_initiation_at_a_running_daemon_changes_nothing():
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b, _, _ = fzpoll_pair(ns_a, ns_b, pair)
        capture = ns_b.popen([sys.executable, "-c", _CAPTURE, pair.if_b, "51821", "1", "148", "15"],
                             stdout=subprocess.PIPE, text=True)
        assert capture.stdout.readline().strip() == "ready"
        ping(ns_a, "100.64.0.2", count=2)  # the handshake, initiated by A
        initiation, _ = capture.communicate(timeout=15)
        assert capture.returncode == 0, "no initiation captured"
        before = b.wg_show_dump().peers[0]
        assert before.latest_handshake > 0
        time.sleep(1.2)  # a new handshake would now show another second
        for sender in (ns_a, ns_b):  # from A's address (another port) and from B's own side
            sender.run([sys.executable, "-c", _SEND, pair.ip_b, "51821", initiation.strip()])
        time.sleep(0.5)
        after = b.wg_show_dump().peers[0]
        try:
            assert after.latest_handshake == before.latest_handshake
            assert after.endpoint == before.endpoint == f"{pair.ip_a}:51820"
            assert "replayed_handshake" in b.log()
            ping(ns_a, "100.64.0.2", count=2)  # the session was not disturbed
        except AssertionError:
            print("--- b log ---\n" + b.log()[-4000:])
            raise


def secret_forms(raw: bytes) -> list[str]:
    """Every text form of a key a log line could carry."""
    b64 = base64.b64encode(raw).decode()
    return [b64, b64.rstrip("="), base64.urlsafe_b64encode(raw).decode(), raw.hex(), raw.hex().upper()]


def leaks(text: str, raw: bytes, window: int = 16) -> list[str]:
    """Substrings of ``window`` characters of any form of ``raw`` found in ``text`` (a partial
    key counts: 16 hex digits are 64 bits of it)."""
    found = []
    for form in secret_forms(raw):
        for i in range(len(form) - window + 1):
            if form[i:i + window] in text:
                found.append(form[i:i + window])
                break
    return found


_UAPI_MISUSE = (
    "set=1\nprivate_key={priv}\nlisten_port=not-a-port\n\n",  # a failing set after a key line
    "set=1\npublic_key={pub}\npreshared_key={psk}zz\n\n",  # a malformed preshared key
    "set=1\nprivate_key={priv}\n\n",
    "get=1\n\n",
)


def uapi(path: Path, request: str) -> str:
    return query(str(path), request.encode(), 5)[0]


@needs_netns
def test_no_key_material_in_debug_logs():
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    with Namespace("a") as ns_a, Namespace("b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        a, b, key_a, key_b = fzpoll_pair(ns_a, ns_b, pair, psk=psk)
        ping(ns_a, "100.64.0.2")
        ping(ns_b, "100.64.0.1")
        ns_b.run(["wg", "showconf", b.ifname])
        raw = {name: base64.b64decode(text) for name, text in
               (("private A", key_a), ("private B", key_b), ("preshared", psk))}
        for request in _UAPI_MISUSE:
            uapi(b.socket_path, request.format(priv=raw["private B"].hex(), psk=raw["preshared"].hex(),
                                               pub=base64.b64decode(netns.pubkey(key_a)).hex()))
        ping(ns_a, "100.64.0.2", count=1)
        logs = {"a": a.log(), "b": b.log()}
    assert '"severity": "debug"' in logs["a"] + logs["b"], "the daemons did not log at debug level"
    found = {(side, name): leaks(text, key) for side, text in logs.items() for name, key in raw.items()}
    assert not {k: v for k, v in found.items() if v}, found


def test_a_malformed_uapi_line_does_not_log_key_material():
    """A private key sent without its ``private_key=`` (or with a typo for the ``=``) is a line
    whose "key" is the secret itself: the failure log must not show it (it once logged the
    first 40 characters of the line)."""
    secret = PrivateKey.generate(random.Random(5).randbytes).raw
    host = type("Host", (), {})()
    host.engine = Engine(None, random_bytes=random.Random(1).randbytes, wall_time=lambda: 0.0)
    host.listen_port = host.fwmark = 0
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("debug", stream)
    try:
        for line in (secret.hex(), "private_key " + secret.hex(), "private_key:" + secret.hex()):
            assert handle_set(host, [line], 0.0) != 0
    finally:
        root.handlers[:], root.level = saved
    assert not leaks(stream.getvalue(), secret), stream.getvalue()


_MANY_PSK_PEERS = """
import os, random, sys, time
from fzpoll.wireguard.engine import Engine
from fzpoll.uapi.protocol import handle_set
host = type("Host", (), {})()
host.engine = Engine(None, random_bytes=random.Random(1).randbytes, wall_time=lambda: 0.0)
host.listen_port = host.fwmark = 0
lines = []
for i in range(int(sys.argv[1])):
    lines += ["public_key=" + os.urandom(32).hex(), "preshared_key=" + os.urandom(32).hex(),
              "allowed_ip=10.%d.%d.0/24" % (i // 256, i % 256)]
start = time.perf_counter()
assert handle_set(host, lines, 0.0) == 0
print(round(time.perf_counter() - start, 3))
"""


def test_many_peers_with_preshared_keys_configure_quickly():
    """300 peers with preshared keys in one set: well under a second when linear (~0.05 s)."""
    repo = str(Path(__file__).resolve().parent.parent)
    try:
        result = subprocess.run([sys.executable, "-c", _MANY_PSK_PEERS, "300"], capture_output=True,
                                text=True, timeout=3, env=dict(os.environ, PYTHONPATH=repo))
    except subprocess.TimeoutExpired:
        raise AssertionError("300 peers with preshared keys took more than 3 s") from None
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1.0, result.stdout


# =============================================================================================
# The UAPI socket


class _Loop:
    def add_reader(self, fd, callback): pass

    def remove_reader(self, fd): pass

    def add_writer(self, fd, callback): pass

    def remove_writer(self, fd): pass

    def add_timer_source(self, next_deadline, handle): pass


_PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
else:
    print("connected")
"""


def as_nobody_connect(path: Path) -> str:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _PROBE,
         str(path)], capture_output=True, text=True, timeout=10)
    return result.stdout.strip() or result.stderr.strip()


def check_socket_is_roots(path: Path) -> None:
    """Mode 0600 in a 0755 directory, both root's; nobody is refused, and (the control) nobody
    could connect if the socket itself allowed it, so the refusal is the socket's mode."""
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == 0
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    parent = os.stat(path.parent)
    assert stat.S_IMODE(parent.st_mode) == 0o755 and parent.st_uid == 0, oct(parent.st_mode)
    assert as_nobody_connect(path) == "denied"
    os.chmod(path, 0o666)
    try:
        assert as_nobody_connect(path) == "connected"
    finally:
        os.chmod(path, 0o600)


@pytest.mark.needs("root", "setpriv")
def test_uapi_socket_is_private_even_under_umask_0():
    base = Path(tempfile.mkdtemp(prefix="fzsec-"))
    base.chmod(0o755)  # so that only the socket's own mode can refuse nobody
    host = type("Host", (), {})()
    host.engine = Engine(None, random_bytes=os.urandom, wall_time=time.time)
    host.listen_port = host.fwmark = 0
    old = os.umask(0)
    try:
        server = UapiServer("wgsec0", host, _Loop(), socket_dir=str(base / "wireguard"))
    finally:
        os.umask(old)
    try:
        check_socket_is_roots(Path(server.path))
    finally:
        server.close()
        shutil.rmtree(base)


@needs_netns
def test_daemon_uapi_socket_is_roots_alone():
    with Namespace("a") as ns:
        daemon = Fzpoll(ns).start()
        check_socket_is_roots(daemon.socket_path)
        denied = ns.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "wg", "set", daemon.ifname, "listen-port", "4242"], check=False)
        assert denied.returncode != 0
        assert daemon.wg_show_dump().listen_port != 4242
