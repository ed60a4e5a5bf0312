"""tools/bench_engine.py runs, reports every figure, and its decrypted packets equal their inputs.

Correctness only: timings depend on the machine and its load, so nothing here asserts a speed.
The figures are printed, so ``pytest -s`` and CI logs show them.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_engine.py"

POSITIVE = (
    "encrypt_pps", "decrypt_pps", "roundtrip_pps", "roundtrip_mbps", "handshakes_per_s",
    "raw_encrypt_us", "raw_decrypt_us", "libsodium_encrypt_us", "libsodium_decrypt_us",
    "engine_encrypt_us", "engine_decrypt_us", "engine_roundtrip_us", "handshake_us",
)
FINITE = (
    "encrypt_overhead_us", "encrypt_overhead_fraction", "decrypt_overhead_us", "decrypt_overhead_fraction",
    "roundtrip_overhead_us", "roundtrip_overhead_fraction",
    "encrypt_overhead_vs_libsodium_us", "decrypt_overhead_vs_libsodium_us", "roundtrip_overhead_vs_libsodium_us",
)


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_quick_json_run_has_every_figure_and_decrypts_what_was_sent():
    proc = run_tool("--seconds", "0.2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(proc.stdout)
    print()
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1))

    for key in POSITIVE:
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    for key in FINITE:
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["size"] == 1420 and r["datagram_size"] == 1420 + 32  # header 16 + tag 16, no padding at the MTU
    assert r["runs"] == 5
    for key, samples in r["samples"].items():
        assert len(samples) == r["runs"] and all(s > 0 for s in samples), key
    # Throughput is the round-trip rate times the inner packet size (payload), in Mbit/s.
    assert math.isclose(r["roundtrip_mbps"], r["roundtrip_pps"] * 1420 * 8 / 1e6)

    # Correctness: every packet came out of b exactly as it went into a; nothing dropped.
    assert r["decrypt_matches_input"] is True
    assert r["packets_mismatched"] == 0
    assert r["packets_verified"] == r["packets_encrypted"] > 0
    assert r["handshakes"] > 0 and r["handshakes_completed"] == r["handshakes"]
    assert r["drops"] == {}


def test_table_output_and_other_packet_size():
    proc = run_tool("--seconds", "0.1", "--size", "100", "--runs", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print()
    print(proc.stdout)
    out = proc.stdout
    assert "100-byte IPv4 packets (144-byte datagrams)" in out  # 100 padded to 112, plus 32
    for label in ("encrypt (a.send)", "decrypt (b.receive)", "round trip", "handshakes", "libsodium encrypt",
                  "engine overhead, encrypt"):
        assert label in out
    assert "all equal to their inputs" in out and "MISMATCH" not in out


def test_bad_arguments_are_refused():
    assert run_tool("--seconds", "0").returncode == 2
    assert run_tool("--size", "10", "--seconds", "0.05").returncode != 0
