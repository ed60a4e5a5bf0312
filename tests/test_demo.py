"""`fzpoll demo`, the README's "run the main job" command: its output, and that it leaves nothing."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest


pytestmark = [pytest.mark.netns, pytest.mark.needs("netns")]


def leftovers() -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [n for n in ("fzdemo-a", "fzdemo-b") if n in names]


def test_demo_moves_data_through_a_tunnel_and_cleans_up():
    result = subprocess.run([sys.executable, "-m", "fzpoll", "demo", "--seconds", "1"],
                            capture_output=True, text=True, timeout=90)
    out = result.stdout
    print(out)
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"ping 100\.64\.250\.2 through the tunnel: 5/5 replies, first \(with handshake\) [\d.]+ ms, "
                     r"rtt min/avg/max [\d.]+/[\d.]+/[\d.]+ ms", out)
    assert "(IPv6 inside the tunnel): ok" in out
    mbits = float(re.search(r"= (\d+) Mbit/s", out).group(1))
    assert mbits > 0
    assert "demo succeeded" in out and "removed the namespaces" in out
    assert leftovers() == []


def test_interrupted_demo_still_cleans_up():
    proc = subprocess.Popen([sys.executable, "-m", "fzpoll", "demo", "--seconds", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "started two fzpoll daemons" in line or not line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    seen += out
    assert proc.returncode == 130, seen
    assert "interrupted: cleaning up" in seen and "removed the namespaces" in seen
    assert leftovers() == []
