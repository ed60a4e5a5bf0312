"""The daemon's footprint by design: what the running daemon imports (issue 17)."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys

import pytest

from fzpoll.wireguard.crypto import hmac_

_MODULES = "import json, sys; {}; print(json.dumps(sorted(sys.modules)))"
# What `fzpoll [-f] IFACE` and `fzpoll up` load to run: the command line, the daemon, its UAPI.
_DAEMON = "import fzpoll.cli, fzpoll.daemon, fzpoll.uapi.server, fzpoll.jsonlog, fzpoll.sdnotify"
# Loaded only where used: pyroute2 and its asyncio in the configuration child (io/forked.py),
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
