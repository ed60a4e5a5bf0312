"""tools/bench_lone_pass.py runs both directions, plain and with a daemon's extras, and every pass
puts its one packet out at the other side (it exits 1 otherwise). No speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_lone_pass.py"


@pytest.mark.parametrize("extra", [[], ["--daemon"]])
def test_every_pass_delivers_and_every_figure_is_printed(extra: list[str]) -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--runs", "1", "--samples", "3",
                             "--gaps", "warm,evict", *extra], capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    kind = "daemon" if extra else "plain"
    for direction in ("in", "out"):
        for gap in ("warm", "evict"):
            assert sum(line.startswith(f"{kind} {direction:3} {gap:5}:") for line in lines) == 1


def test_bad_gaps_are_refused() -> None:
    result = subprocess.run([sys.executable, str(TOOL), "--gaps", "hot"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--gaps" in result.stderr
