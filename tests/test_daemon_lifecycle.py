"""The daemon's life as an operator sees it: start, stop, failures, ``fzpoll up``, its logs.

Every daemon here runs as the real command (``python -m fzpoll``, warnings as errors) inside a
network namespace the test creates, and is judged from the outside only: exit codes, the
interface (``ip -j``), the UAPI socket in the shared /var/run/wireguard (so interface names are
random, ``wgt`` + hex), ``ip netns pids`` and its stderr, which must be JSON lines throughout and
never a traceback.

- ``fzpoll IFACE`` (no ``-f``) returns 0 only once the interface exists and the socket answers,
  and leaves a daemon behind that ``wg`` can talk to; with its output captured through a pipe it
  still returns at once (the daemon lets go of the caller's stdout/stderr once ready).
- SIGTERM and SIGINT, and deleting the interface, end it with 0: socket removed, interface gone.
- Start-up failures exit 1 with one clear JSON error line and leave nothing behind: UDP port
  taken, no /dev/net/tun, an interface name over 15 characters, a bad config file, an interface
  already served; a stale socket of a killed daemon is replaced.
- ``fzpoll up CONFIG`` sets addresses, MTU, link up and routes, and pings through to
  wireguard-go; its logs (debug level, a handshake) never contain a private or preshared key.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import netns
from helpers import (
    FZPOLL,
    alive,
    assert_gone,
    daemon_env,
    ifname,
    link,
    log_records,
    ns_pids,
    socket_owner,
    socket_path,
    stop_all,
    uapi_answers,
    uapi_get,
    wait_until,
    write_config,
)
from netns import Namespace, WireguardGo, veth_pair

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go")]

# ---------------------------------------------------------------------------------------------
# Helpers (the shared ones are in helpers.py)


def check_with_jq(path: Path, records: list[dict[str, Any]]) -> None:
    """The log works with the one-liner operators use: ``jq -r '"\\(.time) \\(.severity) \\(.message)"'``."""
    if shutil.which("jq") is None:
        print("jq is not installed: the log lines were checked with Python's json only", file=sys.stderr)
        return
    proc = netns._cmd(["jq", "-r", r'"\(.time) \(.severity) \(.message)"', str(path)], timeout=10)
    lines = proc.stdout.splitlines()
    assert lines == [f"{r['time']} {r['severity']} {r['message']}" for r in records]


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 1, no traceback, stderr all JSON with one error record saying ``expected``; returns
    that message."""
    assert proc.returncode == 1, f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Exception" not in proc.stderr, proc.stderr
    records = log_records(proc.stderr)
    errors = [r["message"] for r in records if r["severity"] == "error"]
    assert len(errors) == 1, proc.stderr
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def run_fzpoll(ns: Namespace, *args: str, wrapper: tuple[str, ...] = (), timeout: float = 15.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fzpoll ARGS`` in ``ns`` to completion (or until it daemonizes), output captured."""
    argv = ns.exec_argv([*wrapper, *FZPOLL, *args])
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env or daemon_env())
    except subprocess.TimeoutExpired:
        raise AssertionError(f"fzpoll {' '.join(args)} did not return within {timeout}s") from None


class Foreground:
    """``fzpoll -f IFACE`` (or ``fzpoll up CONFIG``) as a child of the test, stderr to a file."""

    def __init__(self, ns: Namespace, name: str, args: tuple[str, ...], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.ns, self.name = ns, name
        self.log_path = log_dir / f"{name}-{secrets.token_hex(2)}.log"
        with open(self.log_path, "w") as log:
            self.proc = ns.popen([*FZPOLL, *args], stdout=log, stderr=log, env=env or daemon_env())
        ns.on_close(lambda: stop_all(ns, name))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 10.0) -> "Foreground":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"fzpoll exited with {self.proc.returncode}:\n{self.log()}")
            return uapi_answers(self.name)

        wait_until(ready, timeout, f"{self.name}'s UAPI socket\n{self.log()}")
        return self

    def wait_exit(self, timeout: float = 5.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fzpoll did not exit within {timeout}s:\n{self.log()}") from None

    def pid(self) -> int:
        # `ip netns exec` execs the command: the child we started is the daemon itself.
        return self.proc.pid


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A private (0700) directory for configs, keys and daemon logs."""
    tmp_path.chmod(0o700)
    return tmp_path


def key_forms(private_base64: str) -> list[str]:
    """Every text form a 32-byte key could leak in: base64 (padded or not), hex (either case), and
    for a private key also the clamped hex a UAPI ``get`` shows."""
    raw = base64.b64decode(private_base64)
    clamped = bytearray(raw)
    clamped[0] &= 248
    clamped[31] = (clamped[31] & 127) | 64
    forms = [private_base64, private_base64.rstrip("=")]
    for value in (raw, bytes(clamped)):
        forms += [value.hex(), value.hex().upper()]
    return forms


# ---------------------------------------------------------------------------------------------
# Start without -f


def test_background_start_returns_once_ready_and_daemon_serves_wg() -> None:
    name = ifname()
    with Namespace("bg") as ns:
        ns.on_close(lambda: stop_all(ns, name))
        started = time.monotonic()
        # Output captured through pipes: returning at all proves the daemon let go of them.
        proc = run_fzpoll(ns, name, timeout=15)
        elapsed = time.monotonic() - started
        # Checked at once, no waiting: it must already be true when the command returned.
        entry = link(ns, name)
        answer = uapi_get(name)
        assert proc.returncode == 0, proc.stderr
        assert entry is not None, f"{name} missing right after exit 0"
        assert entry["mtu"] == 1420, entry  # as wireguard-go creates its TUN
        assert answer["errno"] == "0" and int(answer["listen_port"]) > 0, answer
        assert proc.stdout == ""
        assert "interface ready" in [r["message"] for r in log_records(proc.stderr)]
        print(f"fzpoll {name} returned after {elapsed:.2f}s")

        pid = socket_owner(name)
        assert pid in ns_pids(ns), (pid, ns_pids(ns))
        assert b"fzpoll" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert alive(pid)
        show = ns.run(["wg", "show", name], timeout=5).stdout
        assert f"interface: {name}" in show and f"listening port: {answer['listen_port']}" in show
        key = netns.genkey()
        ns.run(["wg", "set", name, "private-key", "/dev/stdin"], input=key + "\n", timeout=5)
        assert ns.run(["wg", "show", name, "public-key"], timeout=5).stdout.strip() == netns.pubkey(key)

        os.kill(pid, signal.SIGTERM)
        assert_gone(ns, name, pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_background_daemon_stops_on_signal_and_logs_when_asked(signum: int, tmp: Path) -> None:
    """With LOG_LEVEL set, a daemonized fzpoll keeps logging to the stderr it was given (as
    wireguard-go does), so its stop is visible there."""
    name = ifname()
    log_path = tmp / "daemon.log"
    with Namespace("bg") as ns, open(log_path, "w") as log:
        ns.on_close(lambda: stop_all(ns, name))
        proc = subprocess.run(ns.exec_argv([*FZPOLL, name]), stdout=log, stderr=log,
                              stdin=subprocess.DEVNULL, timeout=15, env=daemon_env(LOG_LEVEL="info"))
        assert proc.returncode == 0, log_path.read_text()
        pid = socket_owner(name)
        os.kill(pid, signum)
        assert_gone(ns, name, pid)
    text = log_path.read_text()
    messages = [(r["message"], r.get("signal")) for r in log_records(text)]
    assert ("stopping", signal.Signals(signum).name) in messages, text
    assert messages[-1][0] == "stopped", text


# ---------------------------------------------------------------------------------------------
# Stop in the foreground


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_and_cleans_up(signum: int, tmp: Path) -> None:
    name = ifname()
    with Namespace("fg") as ns:
        daemon = Foreground(ns, name, ("-f", name), tmp).wait_ready()
        assert link(ns, name) is not None
        daemon.proc.send_signal(signum)
        assert daemon.wait_exit() == 0, daemon.log()
        assert_gone(ns, name)
        text = daemon.log()
    assert "Traceback" not in text
    stops = [r for r in log_records(text) if r["message"] == "stopping"]
    assert [r.get("signal") for r in stops] == [signal.Signals(signum).name], text


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_interface_deleted_under_the_daemon(foreground: bool, tmp: Path) -> None:
    name = ifname()
    with Namespace("del") as ns:
        if foreground:
            daemon = Foreground(ns, name, ("-f", name), tmp).wait_ready()
            pid = daemon.pid()
        else:
            ns.on_close(lambda: stop_all(ns, name))
            assert run_fzpoll(ns, name).returncode == 0
            pid = socket_owner(name)
        ns.ip("link", "del", name)
        if foreground:
            assert daemon.wait_exit() == 0, daemon.log()
        assert_gone(ns, name, pid)
    if foreground:
        text = daemon.log()
        assert "Traceback" not in text
        messages = [r["message"] for r in log_records(text)]
        assert "interface deleted, exiting" in messages, text


# ---------------------------------------------------------------------------------------------
# Start-up failures: exit 1, one clear error line, nothing left behind


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def test_udp_port_taken(family: int, tmp: Path) -> None:
    name = ifname()
    port = 51820
    config = write_config(tmp / f"{name}.conf", f"[Interface]\nPrivateKey = {netns.genkey()}\nListenPort = {port}\n")
    holder_code = (
        "import socket, sys, time\n"
        f"s = socket.socket({int(family)}, socket.SOCK_DGRAM)\n"
        f"s.bind(('::' if {int(family)} == socket.AF_INET6 else '0.0.0.0', {port}))\n"
        "print('bound', flush=True)\n"
        "time.sleep(60)\n"
    )
    with Namespace("port") as ns:
        holder = ns.popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "bound"
        proc = run_fzpoll(ns, "up", str(config))
        message = assert_clean_failure(proc, f"UDP port {port}", "in use")
        print(message)
        assert link(ns, name) is None
        assert not socket_path(name).exists()


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_no_tun_device(foreground: bool) -> None:
    """/dev/net/tun hidden by an empty tmpfs over /dev/net, in a private mount namespace
    (``unshare -m`` makes mounts private: the host's /dev is untouched)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    name = ifname()
    with Namespace("notun") as ns:
        ns.on_close(lambda: stop_all(ns, name))
        script = 'mount -t tmpfs fzt-empty /dev/net && test ! -e /dev/net/tun && exec "$@"'
        wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
        proc = run_fzpoll(ns, *(("-f",) if foreground else ()), name, wrapper=wrapper)
        assert_clean_failure(proc, "/dev/net/tun does not exist", "modprobe tun")
        assert link(ns, name) is None
        assert not socket_path(name).exists()
    assert os.path.exists("/dev/net/tun")


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground", "background"])
def test_interface_name_too_long(foreground: bool) -> None:
    name = "wgt" + secrets.token_hex(7)[:13]  # 16 characters: IFNAMSIZ is 16 with the NUL
    with Namespace("long") as ns:
        proc = run_fzpoll(ns, *(("-f",) if foreground else ()), name)
        assert_clean_failure(proc, repr(name), "1 to 15 characters")
        assert not socket_path(name).exists()
        assert [e["ifname"] for e in ns.ip_json("link", "show")] == ["lo"]


def test_stale_socket_of_a_killed_daemon_is_replaced(tmp: Path) -> None:
    name = ifname()
    with Namespace("stale") as ns:
        first = Foreground(ns, name, ("-f", name), tmp).wait_ready()
        first.proc.kill()
        first.wait_exit()
        assert socket_path(name).exists(), "SIGKILL cannot clean up: the socket file must remain"
        wait_until(lambda: link(ns, name) is None, 5, "the kernel to delete the TUN")
        second = Foreground(ns, name, ("-f", name), tmp).wait_ready()
        assert socket_owner(name) == second.pid()
        second.proc.terminate()
        assert second.wait_exit() == 0
        assert_gone(ns, name)
        records = log_records(second.log())
    assert any(r["severity"] == "warning" and "stale" in r["message"] for r in records)


@pytest.mark.parametrize("where", ["same-namespace", "other-namespace"])
def test_interface_already_served_is_refused(where: str, tmp: Path) -> None:
    """The UAPI socket directory is shared by all namespaces: a second daemon of the same name
    elsewhere must refuse, and must not take (or remove) the first one's socket."""
    name = ifname()
    with Namespace("first") as ns_a, Namespace("second") as ns_b:
        first = Foreground(ns_a, name, ("-f", name), tmp).wait_ready()
        target = ns_a if where == "same-namespace" else ns_b
        proc = run_fzpoll(target, "-f", name)
        expected = "is busy" if where == "same-namespace" else "already served"
        assert_clean_failure(proc, name, expected)
        assert socket_owner(name) == first.pid()
        assert uapi_answers(name)
        if where == "other-namespace":
            assert link(ns_b, name) is None
        first.proc.terminate()
        assert first.wait_exit() == 0
        assert_gone(ns_a, name)


@pytest.mark.parametrize(
    "body, line, key, hint",
    [
        ("[Interface]\nPrivateKey = {key}\nMTU = 13x0\n", 3, "MTU", "whole number"),
        ("[Interface]\nPrivateKey = {key}\n\n[Peer]\nPublicKey = {key}\nAllowedIPs = 10.0.0.0/33\n",
         6, "AllowedIPs", "10.0.0.0/33"),
        ("[Interface]\nPrivateKey = {key}\nListenPrt = 51820\n", 3, "ListenPrt", "unknown key"),
        ("# comment\n[Interface]\nPrivateKey = c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw==\n", 3, "PrivateKey",
         "not a valid key"),
    ],
    ids=["mtu", "allowed-ips", "unknown-key", "bad-private-key"],
)
def test_bad_config_names_file_line_and_key(body: str, line: int, key: str, hint: str, tmp: Path) -> None:
    name = ifname()
    config = write_config(tmp / f"{name}.conf", body.format(key=netns.genkey()))
    with Namespace("badconf") as ns:
        proc = run_fzpoll(ns, "up", str(config))
        assert_clean_failure(proc, f"{config}:{line}: {key}:", hint)
        assert "c2VjcmV0" not in proc.stderr  # a bad key's value is not echoed
        assert link(ns, name) is None
        assert not socket_path(name).exists()


# ---------------------------------------------------------------------------------------------
# fzpoll up CONFIG, against wireguard-go; logs


def _ping(ns: Namespace, address: str, count: int = 2) -> None:
    flag = ["-6"] if ":" in address else []
    result = ns.run(["ping", *flag, "-c", str(count), "-i", "0.2", "-W", "3", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def _routes(ns: Namespace, name: str, family: str) -> set[str]:
    return {r["dst"] for r in ns.ip_json(family, "route", "show", "dev", name)}


def assert_no_secrets(text: str, *keys_base64: str) -> None:
    for key in keys_base64:
        for form in key_forms(key):
            assert form not in text, "a key appears in the log"


def test_up_config_brings_up_a_working_interface(tmp: Path) -> None:
    name = ifname()
    key_a, key_b, psk = netns.genkey(), netns.genkey(), netns.genkey()
    with Namespace("up-a") as ns_a, Namespace("up-b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        peer = WireguardGo(ns_b).start()
        peer.configure(key_b, 51821)
        peer.add_peer(netns.pubkey(key_a), ["100.64.7.1/32", "fd00:7::1/128"], f"{pair.ip_a}:51820",
                      preshared_key=psk)
        peer.address("100.64.7.2/32", "fd00:7::2/128")
        peer.up()
        peer.route("100.64.7.1/32", "fd00:7::1/128")
        config = write_config(tmp / f"{name}.conf", f"""\
# fzpoll up: a wg-quick style file
[Interface]
PrivateKey = {key_a}
Address = 100.64.7.1/32, fd00:7::1/128
MTU = 1380
ListenPort = 51820

[Peer]
PublicKey = {netns.pubkey(key_b)}
PresharedKey = {psk}
AllowedIPs = 100.64.7.2/32, fd00:7::2/128
AllowedIPs = 10.77.0.0/24, fd00:77::/64
Endpoint = {pair.ip_b}:51821
""")
        daemon = Foreground(ns_a, name, ("up", str(config), "--log-level", "debug"), tmp).wait_ready()
        try:
            entry = link(ns_a, name)
            assert entry is not None and entry["mtu"] == 1380 and "UP" in entry["flags"], entry
            (info,) = ns_a.ip_json("addr", "show", "dev", name)
            addresses = {(a["local"], a["prefixlen"]) for a in info["addr_info"]}
            assert {("100.64.7.1", 32), ("fd00:7::1", 128)} <= addresses, addresses
            assert {"100.64.7.2", "10.77.0.0/24"} <= _routes(ns_a, name, "-4")
            assert {"fd00:7::2", "fd00:77::/64"} <= _routes(ns_a, name, "-6")
            assert uapi_get(name)["listen_port"] == "51820"
            _ping(ns_a, "100.64.7.2")
            _ping(ns_a, "fd00:7::2")
            _ping(ns_b, "100.64.7.1")
            dump = netns.parse_wg_dump(ns_a.run(["wg", "show", name, "dump"], timeout=5).stdout)
            (p,) = dump.peers
            assert p.latest_handshake > 0 and p.rx_bytes > 0 and p.tx_bytes > 0
            assert p.preshared_key == psk  # wg shows it; the log must not
        except AssertionError:
            print("--- fzpoll log ---\n" + daemon.log()[-6000:])
            raise
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0, daemon.log()
        assert_gone(ns_a, name)
    text = daemon.log()
    records = log_records(text)
    check_with_jq(daemon.log_path, records)
    assert any(r["message"] == "handshake complete" for r in records), text
    assert any(r["severity"] == "debug" for r in records)
    assert_no_secrets(text, key_a, psk)


def test_logs_are_json_and_never_show_keys_set_through_wg(tmp: Path) -> None:
    """The other way to configure: ``fzpoll -f IFACE --log-level debug`` and ``wg set`` (the
    private key reaches the daemon as hex over the UAPI), a handshake, traffic both ways, a
    malformed packet, a stop: every stderr line is JSON and no key shows in any form."""
    name = ifname()
    key_a, key_b, psk = netns.genkey(), netns.genkey(), netns.genkey()
    with Namespace("log-a") as ns_a, Namespace("log-b") as ns_b:
        pair = veth_pair(ns_a, ns_b)
        daemon = Foreground(ns_a, name, ("-f", "--log-level", "debug", name), tmp).wait_ready()
        peer = WireguardGo(ns_b).start()
        peer.configure(key_b, 51821)
        peer.add_peer(netns.pubkey(key_a), ["100.64.8.1/32"], f"{pair.ip_a}:51820", preshared_key=psk)
        peer.address("100.64.8.2/32")
        peer.up()
        peer.route("100.64.8.1/32")
        keys = tmp / "keys"
        keys.mkdir(mode=0o700)
        write_config(keys / "a", key_a + "\n")
        write_config(keys / "psk", psk + "\n")
        ns_a.run(["wg", "set", name, "private-key", str(keys / "a"), "listen-port", "51820",
                  "peer", netns.pubkey(key_b), "preshared-key", str(keys / "psk"),
                  "allowed-ips", "100.64.8.2/32", "endpoint", f"{pair.ip_b}:51821"], timeout=5)
        ns_a.ip("addr", "add", "100.64.8.1/32", "dev", name)
        ns_a.ip("link", "set", name, "up")
        ns_a.ip("route", "add", "100.64.8.2/32", "dev", name)
        try:
            _ping(ns_a, "100.64.8.2")
            _ping(ns_b, "100.64.8.1")
        except AssertionError:
            print("--- fzpoll log ---\n" + daemon.log()[-6000:])
            raise
        # A bogus initiation to the daemon's port (the shape passes the kernel prefilter, the MAC1
        # does not pass the engine): a drop, which is logged (with its counts).
        ns_b.run([sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                  f".sendto(b'\\x01' + bytes(147), ('{pair.ip_a}', 51820))"], timeout=5)
        ns_a.run(["wg", "showconf", name], timeout=5)  # the private key crosses the UAPI again
        time.sleep(0.2)
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.wait_exit() == 0, daemon.log()
    text = daemon.log()
    records = log_records(text)
    check_with_jq(daemon.log_path, records)
    messages = [r["message"] for r in records]
    assert "handshake complete" in messages and messages[-1] == "stopped", text
    assert any("bad_mac1" in json.dumps(r) for r in records), text
    assert "Traceback" not in text
    assert_no_secrets(text, key_a, key_b, psk)
