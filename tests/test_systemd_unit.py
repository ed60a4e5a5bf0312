"""Checks systemd/fzpoll@.service with systemd-analyze, when the machine has it.

`systemd-analyze verify` fails if ExecStart's binary does not exist, and /usr/local/bin/fzpoll is
only there once the package is installed system-wide. So the test verifies a copy of the unit in
a temp dir whose ExecStart binary is replaced by the installed `fzpoll` console script if there is
one, else by /bin/true: everything else in the unit (every sandboxing directive, the template
specifiers) is verified as shipped; only the existence of the binary path is not.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "fzpoll@.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _unit_copy(tmp_path: Path) -> Path:
    binary = shutil.which("fzpoll") or "/bin/true"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/fzpoll up /etc/fzpoll/%i.conf" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("ExecStart=/usr/local/bin/fzpoll ", f"ExecStart={binary} "))
    return copy


def test_unit_has_the_essentials():
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=wireguard",
        "RuntimeDirectoryPreserve=yes",  # /run/wireguard is shared by all tunnels
        "DeviceAllow=/dev/net/tun rw",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert not re.search(r"^PrivateDevices=yes", text, re.M)  # would hide /dev/net/tun


@needs_analyze
def test_systemd_analyze_verify(tmp_path):
    copy = _unit_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on unknown or unparsable directives (it only warns): fail on any warning
    # about our unit too. Lines about other units on the machine are not ours to judge.
    ours = [line for line in output.splitlines() if "fzpoll@" in line or str(tmp_path) in line]
    assert ours == [], output


@needs_analyze
def test_systemd_analyze_security(tmp_path):
    copy = _unit_copy(tmp_path)
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip("systemd-analyze security has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout
