"""What several test files share (no test file imports another): the engine pair, a fake UAPI
host, a selectors loop for the UAPI server, and the helpers that run and judge a real daemon."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import json
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

import netns
from fzpoll.show import QueryError, query
from fzpoll.uapi.protocol import UapiError
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.sodium import Backend
from fzpoll.wireguard.keys import PresharedKey, PrivateKey
from netns import Namespace

# ---------------------------------------------------------------------------------------------
# What the environment lacks (conftest's ``needs`` marker; fixtures call ``skip_unless``)

# Requirements with their own check; any other name is a command that must be on PATH.
_CHECKS: dict[str, Callable[[], str | None]] = {
    "root": lambda: None if os.geteuid() == 0 else "needs root",  # no more (no TUN, no ip)
    "netns": netns.need_root,  # root, /dev/net/tun, ip: what network namespaces need
    "wireguard-go": netns.need_wireguard_go,  # netns plus wireguard-go and wg
    "wireguard-go-upstream": netns.need_upstream_wireguard_go,  # and the upstream binary
}
# Where a command comes from, for the skip reason.
_SOURCES = {
    "unshare": "util-linux", "nsenter": "util-linux", "setpriv": "util-linux",
    "nft": "nftables", "wg": "wireguard-tools", "wg-quick": "wireguard-tools",
    "dnsmasq": "bash tools/install-deps.sh", "dig": "bash tools/install-deps.sh",
    "fzpoll": "the console script: pip install -e .",
}


def missing(*requirements: str) -> str | None:
    """Why the environment cannot run a test that needs ``requirements`` (None if it can)."""
    for what in requirements:
        check = _CHECKS.get(what)
        if check is not None:
            reason = check()
        elif shutil.which(what) is None:
            reason = f"needs {what} ({_SOURCES.get(what, 'not on PATH')})"
        else:
            reason = None
        if reason:
            print(f"skipping: {reason}", file=sys.stderr)
            return reason
    return None


def skip_unless(*requirements: str) -> None:
    """pytest.skip (the reason printed) unless every requirement is met (see :func:`missing`)."""
    reason = missing(*requirements)
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------
# Two engines linked by a fake network and a fake clock (as h11's ConnectionPair)

ADDR_A = ("192.0.2.1", 51820)
ADDR_B = ("192.0.2.2", 51820)
TUN_A = "10.0.0.1"
TUN_B = "10.0.0.2"
WALL_OFFSET = 1_700_000_000.0


def ip4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    """A minimal IPv4 packet (header checksum not needed: the engine does not check it)."""
    total = 20 + len(payload)
    return (
        bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8)
        + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload
    )


def ip6(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([17, 64])
        + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + payload
    )


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def wall(self) -> float:
        return WALL_OFFSET + self.now


class Pair:
    """Engines ``a`` and ``b``, each with the other as its only peer."""

    def __init__(self, seed: int = 1, psk: bytes | None = None, aead_a: Backend | None = None,
                 aead_b: Backend | None = None) -> None:
        self.clock = Clock()
        rng = random.Random(seed)
        self.key_a = PrivateKey.generate(rng.randbytes)
        self.key_b = PrivateKey.generate(rng.randbytes)
        self.a = Engine(self.key_a, random_bytes=rng.randbytes, wall_time=self.clock.wall, aead=aead_a)
        self.b = Engine(self.key_b, random_bytes=rng.randbytes, wall_time=self.clock.wall, aead=aead_b)
        self.peer_b = self.a.add_peer(self.key_b.public_key)  # a's view of b
        self.peer_a = self.b.add_peer(self.key_a.public_key)  # b's view of a
        self.a.add_allowed_ip(self.peer_b, "10.0.0.2/32")
        self.a.add_allowed_ip(self.peer_b, "fd00::2/128")
        self.b.add_allowed_ip(self.peer_a, "10.0.0.1/32")
        self.b.add_allowed_ip(self.peer_a, "fd00::1/128")
        self.a.set_endpoint(self.peer_b, ADDR_B)
        self.b.set_endpoint(self.peer_a, ADDR_A)
        if psk is not None:
            self.a.set_preshared_key(self.peer_b, PresharedKey(psk))
            self.b.set_preshared_key(self.peer_a, PresharedKey(psk))
        self.wire: list[tuple[str, bytes]] = []  # every datagram delivered: (direction, bytes)
        # What each engine handed over and the test has not consumed yet: the engine gives its
        # outputs away once, a test often looks before it delivers.
        self._out: dict[Engine, list[tuple[bytes, tuple, object]]] = {self.a: [], self.b: []}
        self._tun: dict[Engine, list[bytes]] = {self.a: [], self.b: []}

    def out(self, engine: Engine) -> list[tuple[bytes, tuple, object]]:
        """The datagrams ``engine`` produced and nobody delivered yet (a live list: clear() it to drop them)."""
        buf = self._out[engine]
        buf.extend(engine.datagrams_to_send())
        return buf

    def tun(self, engine: Engine) -> list[bytes]:
        """The packets ``engine`` decrypted for its TUN device and the test has not consumed yet."""
        buf = self._tun[engine]
        buf.extend(engine.packets_for_tun())
        return buf

    @property
    def now(self) -> float:
        return self.clock.now

    def advance(self, seconds: float) -> None:
        """Move time forward and fire both engines' due timers (without delivering)."""
        self.clock.now += seconds
        self.a.handle_timer(self.clock.now)
        self.b.handle_timer(self.clock.now)

    def run_until(self, t: float) -> None:
        """Advance to ``t`` stopping at every deadline on the way, delivering everything."""
        while True:
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            step = min([d for d in deadlines if d <= t], default=None)
            if step is None:
                break
            self.clock.now = max(self.clock.now, step)
            self.a.handle_timer(self.clock.now)
            self.b.handle_timer(self.clock.now)
            self.deliver()
        self.clock.now = t
        self.deliver()

    def take(self, engine: Engine) -> list[bytes]:
        buf = self.out(engine)
        out = [d for d, *_ in buf]
        buf.clear()
        return out

    def deliver(self, drop_a_to_b: bool = False, drop_b_to_a: bool = False) -> int:
        """Deliver queued datagrams both ways until quiet; returns how many were delivered."""
        count = 0
        while self.out(self.a) or self.out(self.b):
            for data in self.take(self.a):
                self.wire.append(("a->b", data))
                if not drop_a_to_b:
                    self.b.receive(data, ADDR_A, self.clock.now)
                    count += 1
            for data in self.take(self.b):
                self.wire.append(("b->a", data))
                if not drop_b_to_a:
                    self.a.receive(data, ADDR_B, self.clock.now)
                    count += 1
        return count

    def handshake(self) -> None:
        self.a.send(ip4(TUN_A, TUN_B, b"first"), self.clock.now)
        self.deliver()
        assert self.tun(self.b), "handshake did not complete"
        self.tun(self.b).clear()


def established() -> Pair:
    """A pair that completed a handshake, nothing left in flight."""
    p = Pair()
    p.handshake()
    p.deliver()
    return p


def key(seed: int) -> PrivateKey:
    """A private key from ``seed`` (the same one every run)."""
    return PrivateKey.generate(random.Random(seed).randbytes)


# ---------------------------------------------------------------------------------------------
# A UapiHost without sockets (test_uapi, test_uapi_wg, test_fuzz, test_show)

WALL = 1_795_541_407.0  # the wall clock a FakeHost's engine reads unless told otherwise


class FakeHost:
    """A UapiHost without sockets: ports in ``busy`` are 'taken', port 0 picks ``ephemeral_port``
    (0 keeps 0), ``fwmark_error`` makes set_fwmark fail; the engine's clock is ``self.wall``."""

    def __init__(self, seed: int = 7, *, wall: float = WALL, busy: Iterable[int] = (),
                 ephemeral_port: int = 40000, random_bytes: Callable[[int], bytes] | None = None,
                 wall_time: Callable[[], float] | None = None) -> None:
        self.wall = wall
        self.engine = Engine(None, random_bytes=random_bytes or random.Random(seed).randbytes,
                             wall_time=wall_time or (lambda: self.wall))
        self.listen_port = 0
        self.fwmark = 0
        self.busy: set[int] = set(busy)
        self.ephemeral_port = ephemeral_port
        self.fwmark_error: OSError | None = None

    def set_listen_port(self, port: int) -> None:
        if port in self.busy:
            raise UapiError(errno.EADDRINUSE)
        self.listen_port = port or self.ephemeral_port

    def set_fwmark(self, mark: int) -> None:
        if self.fwmark_error is not None:
            raise self.fwmark_error
        self.fwmark = mark


class SelectorLoop:
    """The poller's four methods on top of :mod:`selectors`, with a fake clock."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.readers: dict[int, object] = {}
        self.writers: dict[int, object] = {}
        self.timers: list = []
        self.now = 0.0

    def add_timer_source(self, next_deadline, handle) -> None:
        self.timers.append((next_deadline, handle))

    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self.readers else 0) | (
            selectors.EVENT_WRITE if fd in self.writers else 0)
        try:
            self.sel.unregister(fd)
        except KeyError:
            pass
        if mask:
            self.sel.register(fd, mask)

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd) -> None:
        self.readers.pop(fd, None)
        self._update(fd)

    def add_writer(self, fd, callback) -> None:
        self.writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd) -> None:
        self.writers.pop(fd, None)
        self._update(fd)

    def run_once(self, timeout: float = 0.0) -> int:
        if any(d() is not None and d() <= self.now for d, _ in self.timers):
            timeout = 0.0  # a timer source is due (the UAPI server's work): no sleeping
        events = self.sel.select(timeout)
        for key_, mask in events:
            fd = key_.fd
            if mask & selectors.EVENT_READ and fd in self.readers:
                self.readers[fd](self.now)
            if mask & selectors.EVENT_WRITE and fd in self.writers:
                self.writers[fd](self.now)
        for next_deadline, handle in self.timers:
            deadline = next_deadline()
            if deadline is not None and deadline <= self.now:
                handle(self.now)
        return len(events)

    def run_until(self, predicate, rounds: int = 2000) -> None:
        for _ in range(rounds):
            if predicate():
                return
            self.run_once(0.01)
        raise AssertionError("condition not reached")


# ---------------------------------------------------------------------------------------------
# A real daemon, run and judged from the outside (test_daemon_lifecycle, test_wg_quick, test_idle)

REPO = Path(__file__).resolve().parent.parent
FZPOLL = (sys.executable, "-W", "error", "-m", "fzpoll")
SEVERITIES = {"debug", "info", "warning", "error", "critical"}
_RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
# Environment a daemon must not inherit from the test runner: it would change what is tested.
_STRIP_ENV = ("LOG_LEVEL", "WG_PROCESS_FOREGROUND", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def daemon_env(**extra: str) -> dict[str, str]:
    """The test's environment without the variables that steer a daemon, plus ``extra``; this
    checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIP_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def ifname() -> str:
    """A fresh interface name; its socket lives in the shared /var/run/wireguard."""
    return f"wgt{secrets.token_hex(2)}"


def socket_path(name: str) -> Path:
    return netns.WG_SOCKET_DIR / f"{name}.sock"


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def uapi_get(name: str, timeout: float = 3.0) -> dict[str, str]:
    """``get=1`` on the interface's socket (from this process: the socket is a file, not in a
    namespace); the answer's keys, last value wins (only interface-level keys are read)."""
    try:
        text, _ = query(str(socket_path(name)), b"get=1\n\n", timeout)
    except QueryError as exc:  # the callers wait for the daemon by catching OSError
        raise ConnectionError(str(exc)) from None
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def uapi_answers(name: str) -> bool:
    try:
        return uapi_get(name, timeout=1.0).get("errno") == "0"
    except OSError:
        return False


def socket_owner(name: str) -> int:
    """The pid that listens on the interface's UAPI socket (SO_PEERCRED of a connection)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        sock.connect(str(socket_path(name)))
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", cred)
    return pid


def ns_pids(ns: Namespace) -> set[int]:
    out = netns._cmd(["ip", "netns", "pids", ns.name], check=False, timeout=5).stdout
    return {int(p) for p in out.split()}


def alive(pid: int) -> bool:
    """Running (a zombie left for a parent that already exited counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def link(ns: Namespace, name: str) -> dict[str, Any] | None:
    """``ip -j link show NAME`` in ``ns``, or None when there is no such interface."""
    proc = netns._cmd(["ip", "-j", "-n", ns.name, "link", "show", "dev", name], check=False, timeout=5)
    if proc.returncode != 0:
        return None
    (entry,) = json.loads(proc.stdout)
    return entry


def stop_all(ns: Namespace, name: str) -> None:
    """Cleanup: SIGTERM every process of ``ns`` (the daemons), SIGKILL what lingers, and remove
    a socket file a killed daemon left. Registered with ``ns.on_close``."""
    pids = ns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3.0
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    path = socket_path(name)
    if path.exists() and netns._socket_is_stale(path):
        path.unlink(missing_ok=True)


def log_records(text: str) -> list[dict[str, Any]]:
    """Every line of a daemon's stderr as a JSON object with RFC 3339 UTC ``time``, a
    ``severity`` and a ``message``; AssertionError (with the whole text) otherwise."""
    records = []
    now = time.time()
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"stderr line {number} is not JSON: {line!r}\n--- stderr ---\n{text}") from None
        assert isinstance(record, dict), line
        stamp = record.get("time")
        assert isinstance(stamp, str) and _RFC3339_UTC.fullmatch(stamp), f"bad time in {line!r}"
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert moment.utcoffset() == datetime.timedelta(0)
        assert abs(moment.timestamp() - now) < 600, f"time far from now in {line!r}"
        assert record.get("severity") in SEVERITIES, f"bad severity in {line!r}"
        assert isinstance(record.get("message"), str) and record["message"], f"no message in {line!r}"
        records.append(record)
    return records


def assert_gone(ns: Namespace, name: str, pid: int | None = None, timeout: float = 5.0) -> None:
    """The daemon exited (if ``pid``), its socket file is removed and the interface is gone."""
    if pid is not None:
        wait_until(lambda: not alive(pid), timeout, f"pid {pid} to exit")
    wait_until(lambda: not socket_path(name).exists(), timeout, f"{socket_path(name)} to be removed")
    assert link(ns, name) is None, f"{name} still exists in {ns.name}"


def write_config(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(text)
    return path
