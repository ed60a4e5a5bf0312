"""wg-quick with fzpoll as its userspace implementation, against wireguard-go.

``WG_QUICK_USERSPACE_IMPLEMENTATION=fzpoll wg-quick up PATH`` runs ``fzpoll IFACE`` (no ``-f``)
when the kernel has no WireGuard, expects it to return once the interface is ready, then
configures everything with ``wg setconf``, ``ip address``, ``ip link set mtu ... up`` and
``ip route``. ``wg-quick down PATH`` deletes the interface, which must end the daemon.

The config is ``<tmp>/wgqN.conf`` (wg-quick names the interface after the file). No DNS (that
would run resolvconf) and no /0 in AllowedIPs (that would add policy routing and fwmarks): this
tests the daemon's contract with wg-quick, not wg-quick's routing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

import netns
from netns import Namespace, WireguardGo, veth_pair
from helpers import (
    alive,
    assert_gone,
    daemon_env,
    link,
    ns_pids,
    socket_owner,
    stop_all,
    uapi_get,
    write_config,
)

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go", "wg-quick", "fzpoll")]


def _kernel_wireguard(ns: Namespace) -> bool:
    """Whether ``ip link add ... type wireguard`` works here: wg-quick would then use the kernel
    module and never start fzpoll."""
    probe = f"wgp{secrets.token_hex(2)}"
    proc = ns.ip("link", "add", probe, "type", "wireguard", check=False)
    if proc.returncode == 0:
        ns.ip("link", "del", probe, check=False)
        return True
    return os.path.exists("/sys/module/wireguard")


def _wg_quick(ns: Namespace, action: str, config: Path, log: Path, env: dict[str, str]) -> int:
    """``wg-quick ACTION CONFIG`` in ``ns``, output appended to ``log`` (a file, not a pipe:
    the daemon it starts may keep the inherited stderr when LOG_LEVEL is set)."""
    with open(log, "a") as out:
        out.write(f"\n$ wg-quick {action} {config}\n")
        out.flush()
        try:
            proc = subprocess.run(ns.exec_argv(["wg-quick", action, str(config)]), stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"wg-quick {action} timed out:\n{log.read_text()}") from None
    return proc.returncode


def _ping(ns: Namespace, address: str) -> None:
    flag = ["-6"] if ":" in address else []
    result = ns.run(["ping", *flag, "-c", "2", "-i", "0.2", "-W", "3", address], check=False, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wg_quick_up_and_down_with_fzpoll(tmp_path: Path) -> None:
    name = f"wgq{secrets.token_hex(2)}"  # random: the socket directory is shared
    tmp_path.chmod(0o700)
    log = tmp_path / "wg-quick.log"
    key_a, key_b = netns.genkey(), netns.genkey()
    with Namespace("wgq-a") as ns_a, Namespace("wgq-b") as ns_b:
        if _kernel_wireguard(ns_a):
            pytest.skip("the kernel has WireGuard: wg-quick would not use a userspace implementation")
        ns_a.on_close(lambda: stop_all(ns_a, name))
        pair = veth_pair(ns_a, ns_b)
        peer = WireguardGo(ns_b).start()
        peer.configure(key_b, 51821)
        peer.add_peer(netns.pubkey(key_a), ["100.64.5.1/32", "fd00:5::1/128"], f"{pair.ip_a}:51820")
        peer.address("100.64.5.2/32", "fd00:5::2/128")
        peer.up()
        peer.route("100.64.5.1/32", "fd00:5::1/128")
        config = write_config(tmp_path / f"{name}.conf", f"""\
[Interface]
PrivateKey = {key_a}
Address = 100.64.5.1/32, fd00:5::1/128
ListenPort = 51820
MTU = 1400

[Peer]
PublicKey = {netns.pubkey(key_b)}
AllowedIPs = 100.64.5.2/32, fd00:5::2/128, 10.55.0.0/24
Endpoint = {pair.ip_b}:51821
""")
        # LOG_LEVEL: the daemon keeps logging into the same file after wg-quick returns.
        env = daemon_env(WG_QUICK_USERSPACE_IMPLEMENTATION="fzpoll", LOG_LEVEL="debug")
        try:
            assert _wg_quick(ns_a, "up", config, log, env) == 0
            pid = socket_owner(name)
            assert alive(pid) and pid in ns_pids(ns_a)
            assert b"fzpoll" in Path(f"/proc/{pid}/cmdline").read_bytes()
            entry = link(ns_a, name)
            assert entry is not None and entry["mtu"] == 1400 and "UP" in entry["flags"], entry
            routes = {r["dst"] for r in ns_a.ip_json("route", "show", "dev", name)}
            assert {"100.64.5.2", "10.55.0.0/24"} <= routes, routes
            assert uapi_get(name)["listen_port"] == "51820"
            _ping(ns_a, "100.64.5.2")
            _ping(ns_a, "fd00:5::2")
            _ping(ns_b, "100.64.5.1")
            show = ns_a.run(["wg", "show", name, "latest-handshakes"], timeout=5).stdout.split()
            assert int(show[1]) > 0, show

            assert _wg_quick(ns_a, "down", config, log, env) == 0
            assert_gone(ns_a, name, pid)
        except AssertionError:
            print(log.read_text()[-8000:])
            raise
    text = log.read_text()
    assert "[!] Missing WireGuard kernel module. Falling back" in text  # it was fzpoll, not the kernel
    assert "interface deleted, exiting" in text, text
    assert "Traceback" not in text
