"""tools/bench_floor.py: its minimal forwarders carry pings and TCP between its namespaces, fzpoll
runs beside them, and bad arguments are refused. Correctness only: nothing here asserts a speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_floor.py"


def run_tool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.needs("netns", "wg", "ping", "iperf3", "ss")
def test_both_forwarders_and_fzpoll_carry_pings_and_tcp():
    proc = run_tool("--rounds", "1", "--tests", "ping,tcp", "--duration", "1", "--count", "5",
                    "--impls", "floor,floor-batch,fzpoll")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for impl in ("floor", "floor-batch", "fzpoll"):
        rows = re.findall(rf"^{re.escape(impl)} +([\d.]+)", proc.stdout, re.M)
        assert len(rows) == 2, f"{impl}: a ping and a TCP figure expected\n{proc.stdout}"
        rtt, mbps = (float(v) for v in rows)
        assert 0 < rtt < 100, rtt  # ms: every ping answered (a lost one gives no figure)
        assert mbps > 1, mbps  # Mbit/s actually carried through the forwarders
    # the namespaces it made are gone
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "fzfl" not in left


@pytest.mark.parametrize("args, message", [
    (("--impls", "floor,bogus"), "unknown implementation(s): bogus"),
    (("--tests", "ping,udp"), "--tests: a comma-separated subset of ping, tcp"),
])
def test_bad_arguments_are_refused_with_the_reason(args, message):
    proc = run_tool(*args, timeout=30)
    assert proc.returncode == 2
    assert message in proc.stderr
