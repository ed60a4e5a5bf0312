"""The real ``wg`` tool against UapiServer, compared with Debian's wireguard-go.

A UapiServer runs in a background thread of this test (its own selectors loop) on a unique
interface name; wireguard-go runs in a fresh network namespace (its UAPI socket is in the shared
/var/run/wireguard, under another name). The same ``wg set`` / ``wg setconf`` commands go to both,
and ``wg show dump``, ``wg showconf``, ``wg show`` and the raw ``get=1`` answers must be equal
(peers compared as sets: wireguard-go lists them in Go map order).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import netns
from helpers import FakeHost, SelectorLoop
from fzpoll.uapi.server import UapiServer

pytestmark = pytest.mark.netns


BUSY_PORT = 41299  # "taken": our test host refuses it, and the test occupies it for wireguard-go


class ServedInterface:
    """A UapiServer on /var/run/wireguard/fzuXXXXXX.sock, served from a background thread."""

    def __init__(self) -> None:
        self.ifname = f"fzu{secrets.token_hex(3)}"
        self.host = FakeHost(busy={BUSY_PORT}, ephemeral_port=random.randint(20000, 60000),
                             random_bytes=os.urandom, wall_time=time.time)
        self.loop = SelectorLoop()
        self.server = UapiServer(self.ifname, self.host, self.loop)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"uapi-{self.ifname}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.loop.now = time.monotonic()
                self.loop.run_once(0.02)
                self.server.expire_idle(time.monotonic())
        except BaseException as exc:  # reported by close()
            self._error = exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        self.loop.sel.close()
        assert not os.path.exists(self.server.path)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "ServedInterface":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wg(*args: str, input: str | None = None) -> str:
    proc = subprocess.run(["wg", *args], capture_output=True, text=True, timeout=5, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)
    assert proc.returncode == 0, f"wg {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
    return proc.stdout


def raw_get(ifname: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(f"/var/run/wireguard/{ifname}.sock")
        s.sendall(b"get=1\n\n")
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            assert chunk, f"EOF after {data!r}"
            data += chunk
    return data.decode()


def normalize_get(text: str) -> tuple[str, tuple[str, ...]]:
    """The device part and the peer blocks (sorted) of a get answer."""
    head, *peers = text.split("public_key=")
    return head, tuple(sorted(peers))


def normalize_showconf(text: str) -> tuple[str, tuple[str, ...]]:
    head, *peers = text.split("[Peer]")
    return head, tuple(sorted(p.strip() for p in peers))


def normalize_show(text: str, ifname: str) -> tuple[str, tuple[str, ...]]:
    head, *peers = text.replace(ifname, "IF").split("\npeer: ")
    return head, tuple(sorted(p.strip() for p in peers))


def snapshot(ifname: str) -> dict[str, object]:
    dump = netns.parse_wg_dump(wg("show", ifname, "dump"))
    return {
        "dump": (dump.private_key, dump.public_key, dump.listen_port, dump.fwmark,
                 tuple(sorted(dump.peers, key=lambda p: p.public_key))),
        "showconf": normalize_showconf(wg("showconf", ifname)),
        "show": normalize_show(wg("show", ifname), ifname),
        "get": normalize_get(raw_get(ifname)),
    }


def assert_same(ours: str, theirs: str, timeout: float = 3.0) -> dict[str, object]:
    """Equal views of both interfaces. wireguard-go sends (and counts) its first handshake
    initiation asynchronously after a ``set``, so its view may need a moment to settle."""
    deadline = time.monotonic() + timeout
    while True:
        a, b = snapshot(ours), snapshot(theirs)
        if a == b or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for name in a:
        assert a[name] == b[name], f"{name} differs:\nfzpoll:      {a[name]}\nwireguard-go: {b[name]}"
    return a


@pytest.mark.needs("root", "wg")  # the UAPI socket is root-only
def test_wg_against_fzpoll_alone() -> None:
    with ServedInterface() as ours, tempfile.TemporaryDirectory(prefix="fzu-") as tmp:
        assert ours.ifname in wg("show", "interfaces").split()
        priv = Path(tmp, "priv")
        priv.touch(mode=0o600)
        priv.write_text(netns.genkey() + "\n")
        peer_pub = netns.pubkey(netns.genkey())
        wg("set", ours.ifname, "private-key", str(priv), "listen-port", "41234", "fwmark", "0x42",
           "peer", peer_pub, "allowed-ips", "10.9.0.0/16,fd09::/64", "endpoint", "[fd00::9]:51820")
        dump = netns.parse_wg_dump(wg("show", ours.ifname, "dump"))
        assert dump.private_key == priv.read_text().strip()
        assert (dump.listen_port, dump.fwmark) == (41234, 0x42)
        (peer,) = dump.peers
        assert (peer.public_key, peer.endpoint, peer.allowed_ips) == (
            peer_pub, "[fd00::9]:51820", ("10.9.0.0/16", "fd09::/64"))
        assert peer.latest_handshake == 0 and peer.preshared_key is None
        assert "latest handshake" not in wg("show", ours.ifname)  # never: not "54 years ago"
        wg("set", ours.ifname, "peer", peer_pub, "remove")
        assert netns.parse_wg_dump(wg("show", ours.ifname, "dump")).peers == ()
        # an errno from the daemon reaches wg's user: errno=-98 is "Address already in use"
        proc = subprocess.run(["wg", "set", ours.ifname, "listen-port", str(BUSY_PORT)],
                              capture_output=True, text=True, timeout=5)
        assert proc.returncode == 1
        assert proc.stderr == "Unable to modify interface: Address already in use\n"
        assert netns.parse_wg_dump(wg("show", ours.ifname, "dump")).listen_port == 41234


@contextlib.contextmanager
def _ours(kind: str):
    """The fzpoll side: a UapiServer in this process, or the real daemon in its own namespace."""
    if kind == "uapi-server":
        with ServedInterface() as served:
            yield served, None
        return
    with netns.Namespace("d") as ns:
        daemon = netns.Fzpoll(ns).start()
        daemon.up()
        yield daemon, ns


@pytest.mark.parametrize("kind", ["uapi-server", "daemon"])
@pytest.mark.needs("wireguard-go")
def test_wg_gives_the_same_answers_as_wireguard_go(kind: str) -> None:
    with netns.Namespace() as ns, _ours(kind) as (ours, ours_ns), \
            tempfile.TemporaryDirectory(prefix="fzu-") as tmp:
        theirs = netns.WireguardGo(ns).start()
        # Up, so that wireguard-go sends the keepalive of a new persistent-keepalive as we do.
        theirs.up()
        files = {}
        for name, value in (("priv", netns.genkey()), ("psk", wg("genpsk").strip()),
                            ("priv2", netns.genkey())):
            files[name] = Path(tmp, name)
            files[name].touch(mode=0o600)
            files[name].write_text(value + "\n")
        peer1, peer2, peer3 = (netns.pubkey(netns.genkey()) for _ in range(3))

        def both(*args: str) -> None:
            wg(*args[:1], ours.ifname, *args[1:])
            wg(*args[:1], theirs.ifname, *args[1:])

        both("set", "private-key", str(files["priv"]), "listen-port", "41235",
             "peer", peer1, "allowed-ips", "10.1.0.0/24,fd00::/64", "endpoint", "127.0.0.1:5555",
             "persistent-keepalive", "25", "preshared-key", str(files["psk"]))
        view = assert_same(ours.ifname, theirs.ifname)
        (p1,) = view["dump"][4]
        assert (p1.endpoint, p1.allowed_ips, p1.persistent_keepalive) == (
            "127.0.0.1:5555", ("10.1.0.0/24", "fd00::/64"), 25)

        conf = Path(tmp, "wg.conf")
        conf.write_text(
            "[Interface]\n"
            f"PrivateKey = {files['priv2'].read_text().strip()}\n"
            "ListenPort = 41236\n"
            "FwMark = 0x1234\n\n"
            "[Peer]\n"
            f"PublicKey = {peer2}\n"
            f"PresharedKey = {files['psk'].read_text().strip()}\n"
            "AllowedIPs = 10.2.0.0/16, fd01::/48, 10.3.0.9/32\n"
            "Endpoint = [fd00::1]:51820\n\n"
            "[Peer]\n"
            f"PublicKey = {peer3}\n"
            "AllowedIPs = 192.168.7.0/24\n"
            "Endpoint = 127.0.0.2:7\n"
            "PersistentKeepalive = 10\n"
        )
        both("setconf", str(conf))
        view = assert_same(ours.ifname, theirs.ifname)
        assert view["dump"][2:4] == (41236, 0x1234)
        assert {p.public_key for p in view["dump"][4]} == {peer2, peer3}

        both("set", "peer", peer3, "remove")
        view = assert_same(ours.ifname, theirs.ifname)
        assert [p.public_key for p in view["dump"][4]] == [peer2]

        both("set", "peer", peer2, "allowed-ips", "", "endpoint", "[::ffff:10.0.0.1]:1")
        view = assert_same(ours.ifname, theirs.ifname)
        assert view["dump"][4][0].allowed_ips == ()

        # The same failure: the port is taken (for wireguard-go, by a process in its namespace).
        holder = ns.popen([sys.executable, "-c", (
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('0.0.0.0', {BUSY_PORT}))\n"
            "print('bound', flush=True)\n"
            "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "bound\n"
        if ours_ns is not None:  # the real daemon: the port is taken in its namespace too
            holder2 = ours_ns.popen([sys.executable, "-c", (
                "import socket, sys, time\n"
                "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"s.bind(('0.0.0.0', {BUSY_PORT}))\n"
                "print('bound', flush=True)\n"
                "time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
            assert holder2.stdout.readline() == "bound\n"
        results = []
        for ifname in (ours.ifname, theirs.ifname):
            r = subprocess.run(["wg", "set", ifname, "listen-port", str(BUSY_PORT)],
                               capture_output=True, text=True, timeout=5)
            results.append((r.returncode, r.stderr))
        assert results[0] == results[1] == (1, "Unable to modify interface: Address already in use\n")
