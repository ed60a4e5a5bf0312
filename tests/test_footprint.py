"""The daemon's footprint by design: what the running daemon imports (issue 17)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import pytest

from fzpoll.wireguard.crypto import hmac_

_MODULES = "import json, sys; {}; print(json.dumps(sorted(sys.modules)))"
# What `fzpoll [-f] IFACE` and `fzpoll up` load to run: the command line, the daemon, its UAPI.
_DAEMON = ("import argparse, fzpoll.cli, fzpoll.daemon, fzpoll.uapi.server, fzpoll.jsonlog, fzpoll.sdnotify; "
           "fzpoll.cli._setup_logging(argparse.Namespace(log_level='error'))")
# Loaded only where used: pyroute2 and its asyncio in the configuration child (up/forked.py),
# dnslib with the DNS stub, OpenSSL's libcrypto (hashlib/hmac) never, pickle with a config file.
_NOT_AT_START = ("pyroute2", "asyncio", "dnslib", "_hashlib", "hashlib", "hmac", "pickle", "datetime",
                 "fzpoll.config", "fzpoll.dns.stub", "fzpoll.io.netlink")


def _imported(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _MODULES.format(code)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(json.loads(out))


def test_the_running_daemon_imports_nothing_it_does_not_need() -> None:
    new = _imported(_DAEMON) - _imported("pass")
    assert "fzpoll.io.linkwatch" in new and "fzpoll.wireguard.engine" in new
    loaded = sorted(m for m in new if m.split(".")[0] in _NOT_AT_START or m in _NOT_AT_START)
    assert loaded == []


@pytest.mark.parametrize("key_size", [0, 1, 16, 32, 63, 64, 65, 130])
def test_hmac_blake2s_is_rfc2104(key_size: int) -> None:
    """crypto.hmac_ writes HMAC out (no hashlib/hmac, so no libcrypto): same as the stdlib's."""
    key = bytes(range(key_size))
    for data in (b"", b"\x01", bytes(range(200))):
        assert hmac_(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


# ---------------------------------------------------------------------------- a flood at silent peers

SILENT_PEERS = 5000
# The bound we chose (the unit's MemoryMax=): the daemon with 5,000 peers and every table full
# (4,096 staged packets, write buffers) stays under it, whatever arrives.
RSS_BOUND_MIB = 64
FLOOD_SECONDS = 6.0

_FLOOD = r"""
import socket, sys, time
peers, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
payload = bytes(1372)  # a 1400-byte IP packet
targets = [(f"100.64.{i >> 8}.{i & 255}", 9) for i in range(peers)]
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for t in targets:
        try:
            s.sendto(payload, t)
            sent += 1
        except (BlockingIOError, OSError):
            pass
print(sent)
"""


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.netns
@pytest.mark.needs("netns")
def test_flood_at_5000_silent_peers_stays_under_the_memory_bound() -> None:
    import netns
    from fzpoll.show import interface_status, query

    with netns.Namespace("flood") as ns:
        daemon = netns.Fzpoll(ns, log_level="error").start()
        # silent endpoints: routed into a TUN device nobody reads, nothing ever answers
        ns.ip("tuntap", "add", "dev", "silent0", "mode", "tun")
        ns.ip("link", "set", "silent0", "up")
        ns.ip("route", "add", "10.200.0.0/16", "dev", "silent0")
        lines = [f"private_key={netns.secrets.token_hex(32)}"]
        for i in range(SILENT_PEERS):
            lines += [f"public_key={netns.secrets.token_hex(32)}", f"endpoint=10.200.{i >> 8}.{i & 255}:51820",
                      f"allowed_ip=100.64.{i >> 8}.{i & 255}/32"]
        answer, _ = query(str(daemon.socket_path), ("set=1\n" + "\n".join(lines) + "\n\n").encode(), timeout=60)
        assert "errno=0" in answer
        ns.ip("addr", "add", "100.127.0.1/32", "dev", daemon.ifname)
        ns.ip("link", "set", daemon.ifname, "up")
        ns.ip("route", "add", "100.64.0.0/16", "dev", daemon.ifname)
        pid = daemon.proc.pid
        before = _rss_mib(pid)
        flood = ns.popen(["env", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", sys.executable, "-c", _FLOOD,
                          str(SILENT_PEERS), str(FLOOD_SECONDS)], stdout=subprocess.PIPE, text=True)
        peak = before
        while flood.poll() is None:
            peak = max(peak, _rss_mib(pid))
            time.sleep(0.1)
        sent = int(flood.communicate(timeout=10)[0])
        peak = max(peak, _rss_mib(pid))
        stats = interface_status(daemon.ifname).stats
        assert stats is not None
        print(f"RSS before {before:.1f} MiB, peak {peak:.1f} MiB under {sent} packets; "
              f"bounds {stats['bounds']}, drops {stats['drops']}")
        assert daemon.proc.poll() is None, "the daemon died"
        assert stats["bounds"]["staged_packets"]["used"] <= stats["bounds"]["staged_packets"]["limit"]
        assert stats["drops"].get("staged_total_full", 0) > 0  # the global bound was reached, counted
        assert peak < RSS_BOUND_MIB
