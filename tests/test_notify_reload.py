"""``fzpoll up`` under a systemd-like manager: sd_notify messages, the watchdog, SIGHUP reload.

The test owns the AF_UNIX datagram socket ``NOTIFY_SOCKET`` points at, as systemd does for a
``Type=notify`` unit, and sets ``WATCHDOG_USEC`` as ``WatchdogSec=`` would (``WATCHDOG_PID`` is
left out: systemd knows the pid before exec, a test cannot). The daemons run in namespaces the
test creates; nothing is sent outside them.

The reload test is the promise ``ExecReload=kill -HUP`` makes: a peer's new AllowedIPs take effect
(in the UAPI and the route table) while the session stays up - no new handshake, no lost ping.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

import netns
from fzpoll.show import GET_REQUEST, query

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go")]

REPO = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 200_000  # a ping every 0.1 s


@pytest.fixture(autouse=True)
def _clean_stale() -> None:
    netns.cleanup_stale()


class NotifySocket:
    """The manager's end of NOTIFY_SOCKET: collects (monotonic time, assignments) datagrams."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, list[str]]] = []
        self._cursor = 0  # messages before it were matched by wait_for already

    def collect(self, seconds: float) -> None:
        """Receive for ``seconds``."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                return
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def wait_for(self, assignment: str, timeout: float = 10.0) -> float:
        """The next datagram (after the one the previous call matched) holding ``assignment``
        (``KEY=VALUE``, or a ``KEY=`` prefix), received within ``timeout``; when it arrived."""
        end = time.monotonic() + timeout
        while True:
            for i in range(self._cursor, len(self.messages)):
                at, lines = self.messages[i]
                if any(line == assignment or (assignment.endswith("=") and line.startswith(assignment))
                       for line in lines):
                    self._cursor = i + 1
                    return at
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {assignment!r} within {timeout}s; got {self.lines()}")
            self.collect(min(left, 0.05))

    def lines(self) -> list[str]:
        return [line for _, lines in self.messages for line in lines]

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    """``python -m fzpoll up CONFIG`` in a namespace."""

    ns: netns.Namespace
    ifname: str
    config: Path
    proc: subprocess.Popen[Any]
    log_path: Path

    @property
    def socket_path(self) -> str:
        return str(netns.WG_SOCKET_DIR / f"{self.ifname}.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def uapi(self) -> dict[str, list[str]]:
        """The ``get=1`` answer as key -> values (peer keys of a one-peer device)."""
        answer, _ = query(self.socket_path, GET_REQUEST)
        out: dict[str, list[str]] = {}
        for line in answer.splitlines():
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
        return out

    def handshake_ns(self) -> int:
        """The peer's last handshake, Unix nanoseconds (0 if never)."""
        u = self.uapi()
        return int(u["last_handshake_time_sec"][0]) * 10**9 + int(u["last_handshake_time_nsec"][0])


def write_config(path: Path, private: str, port: int, address: str, peer: str, endpoint: str,
                 allowed: list[str]) -> None:
    text = f"""\
[Interface]
PrivateKey = {private}
ListenPort = {port}
Address = {address}

[Peer]
PublicKey = {peer}
Endpoint = {endpoint}
AllowedIPs = {", ".join(allowed)}
"""
    path.touch(mode=0o600)
    path.write_text(text)


def start(ns: netns.Namespace, config: Path, tmp: str, env: dict[str, str] | None = None,
          timeout: float = 10.0) -> Daemon:
    """Start ``fzpoll up CONFIG`` and wait until its UAPI socket answers."""
    ifname = config.name[: -len(".conf")]
    log_path = Path(tmp) / f"{ifname}.log"
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    full_env.update(PYTHONPATH=str(REPO), **(env or {}))
    with open(log_path, "wb") as log:
        proc = ns.popen([sys.executable, "-W", "error", "-m", "fzpoll", "up", str(config),
                         "--log-level", "info"], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    daemon = Daemon(ns, ifname, config, proc, log_path)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"fzpoll up exited with {proc.returncode}: {daemon.log()}")
        try:
            if daemon.uapi().get("errno") == ["0"]:
                return daemon
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"fzpoll up did not serve {daemon.socket_path}: {daemon.log()}")


@contextmanager
def tempdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="fzt-notify-") as tmp:
        os.chmod(tmp, 0o700)
        yield tmp


def new_ifname() -> str:
    return f"wgt{secrets.token_hex(2)}"


def test_ready_watchdog_status_stopping() -> None:
    with tempdir() as tmp, netns.Namespace("n") as ns:
        notify = NotifySocket(tmp)
        try:
            config = Path(tmp) / f"{new_ifname()}.conf"
            write_config(config, netns.genkey(), 51830, "100.64.9.1/32", netns.pubkey(netns.genkey()),
                         "192.0.2.1:51830", ["100.64.9.2/32"])  # 192.0.2.1: no route in the ns
            daemon = start(ns, config, tmp, {"NOTIFY_SOCKET": notify.path,
                                             "WATCHDOG_USEC": str(WATCHDOG_USEC)})
            try:
                ready_at = notify.wait_for("READY=1")
                notify.wait_for("STATUS=")
                notify.collect(max(0.0, ready_at + 1.0 - time.monotonic()))
                pings = [at for at, lines in notify.messages
                         if "WATCHDOG=1" in lines and at <= ready_at + 1.0]
                # every 0.1 s: ~10 in the first second; at least 5 even on a loaded machine
                assert len(pings) >= 5, notify.lines()
                gaps = [b - a for a, b in zip(pings, pings[1:])]
                assert max(gaps) < 0.2, gaps  # never late by a whole timeout (WATCHDOG_USEC)
                status = [line for line in notify.lines() if line.startswith("STATUS=")]
                assert status[0] == "STATUS=1 peers, 0 with a session, listening on 51830"
                assert "STOPPING=1" not in notify.lines()
                daemon.proc.send_signal(signal.SIGTERM)
                notify.wait_for("STOPPING=1")
                assert daemon.proc.wait(timeout=10) == 0
                assert not os.path.exists(daemon.socket_path)
            except AssertionError:
                print("--- daemon log ---\n" + daemon.log()[-4000:])
                raise
        finally:
            notify.close()


PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def test_sighup_reload_keeps_the_session() -> None:
    with tempdir() as tmp, netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        pair = netns.veth_pair(ns_a, ns_b)
        key_a, key_b = netns.genkey(), netns.genkey()
        conf_a, conf_b = Path(tmp) / f"{new_ifname()}.conf", Path(tmp) / f"{new_ifname()}.conf"
        write_config(conf_a, key_a, 51820, "100.64.0.1/32", netns.pubkey(key_b),
                     f"{pair.ip_b}:51821", ["100.64.0.2/32"])
        write_config(conf_b, key_b, 51821, "100.64.0.2/32", netns.pubkey(key_a),
                     f"{pair.ip_a}:51820", ["100.64.0.1/32"])
        notify = NotifySocket(tmp)
        a = start(ns_a, conf_a, tmp, {"NOTIFY_SOCKET": notify.path})
        b = start(ns_b, conf_b, tmp)
        try:
            notify.wait_for("READY=1")
            ns_a.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", "100.64.0.2"], timeout=20)
            before_a, before_b = a.handshake_ns(), b.handshake_ns()
            assert before_a and before_b

            ping = ns_a.popen(["ping", "-i", "0.05", "-c", "60", "-W", "2", "100.64.0.2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1.0)
            write_config(conf_a, key_a, 51820, "100.64.0.1/32", netns.pubkey(key_b),
                         f"{pair.ip_b}:51821", ["100.64.0.2/32", "10.77.0.0/24"])
            reload_started = time.monotonic()
            a.proc.send_signal(signal.SIGHUP)
            assert notify.wait_for("RELOADING=1") >= reload_started
            assert notify.wait_for("READY=1") >= reload_started
            out, _ = ping.communicate(timeout=30)

            dump = netns.parse_wg_dump(ns_a.run(["wg", "show", a.ifname, "dump"]).stdout)
            (peer,) = dump.peers
            assert peer.allowed_ips == ("100.64.0.2/32", "10.77.0.0/24")
            routes = {r["dst"] for r in ns_a.ip_json("route", "show", "dev", a.ifname)}
            assert {"100.64.0.2", "10.77.0.0/24"} <= routes, routes
            assert (a.handshake_ns(), b.handshake_ns()) == (before_a, before_b), "a new handshake"
            summary = PING_SUMMARY.search(out)
            assert summary, out
            sent, received = map(int, summary.groups())
            assert sent == 60 and received == sent, out
            assert a.proc.poll() is None and b.proc.poll() is None
        except AssertionError:
            print("--- a log ---\n" + a.log()[-6000:] + "\n--- b log ---\n" + b.log()[-3000:])
            raise
        finally:
            notify.close()
