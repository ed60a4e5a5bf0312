#!/usr/bin/env python3
"""Gateway NAT throughput: iperf3 from the client through the gateway to the resource site via a
proxy address, beside plain tunnel throughput (client to the gateway's own tunnel address).

Topology: tests/gwsite.py (three namespaces created and removed here; run as root). Scenarios,
interleaved over ``--rounds`` rounds, each one iperf3 TCP run of ``--seconds``:

  tunnel   iperf3 -c 100.64.0.1 (the gateway's tunnel address): encryption both ends, no NAT;
  nat      iperf3 -c <proxy address of app.corp.test> (the server runs at the resource site):
           the same tunnel, plus the gateway's NAT (both ways), the kernel's forwarding and
           masquerade, and the client's check that the name is Active.

Prints Mbit/s per run, the median per scenario and the nat/tunnel ratio; ``--json`` for a
document. The machine has 2 CPUs shared by both daemons and iperf3: medians, noisy.

    sudo flock /tmp/fzpoll-bench.lock python3 tools/bench_gateway.py [--seconds 5] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gwsite import Site, dig  # noqa: E402


def iperf(site: Site, address: str, seconds: int) -> float:
    result = site.client.run(["iperf3", "-c", address, "-t", str(seconds), "-J"], check=False,
                             timeout=seconds + 30)
    data = json.loads(result.stdout or "{}")
    if "end" not in data:
        raise RuntimeError(f"iperf3 to {address} failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        site = Site(Path(tmp), log_level="info")
        try:
            site.start()
            site.gw.popen(["iperf3", "-s", "-B", "100.64.0.1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
            site.site.popen(["iperf3", "-s", "-B", site.b.ip_b], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            proxy = dig(site.client, "@100.100.111.1", "app.corp.test", "A")[0]
            targets = {"tunnel": "100.64.0.1", "nat": proxy}
            runs: dict[str, list[float]] = {name: [] for name in targets}
            iperf(site, proxy, 1)  # warm-up: the name becomes Active, sessions and caches exist
            for _ in range(args.rounds):
                for name, address in targets.items():
                    runs[name].append(iperf(site, address, args.seconds))
            sessions = site.stats(site.gw, site.gw_if)["resources"]["gateway"]["nat_sessions"]
        finally:
            site.close()
    medians = {name: statistics.median(values) for name, values in runs.items()}
    result = {"seconds": args.seconds, "rounds": args.rounds, "mbit_s": runs, "median_mbit_s": medians,
              "ratio_nat_over_tunnel": medians["nat"] / medians["tunnel"], "nat_sessions_at_end": sessions}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, values in runs.items():
            shown = "  ".join(f"{v:7.1f}" for v in values)
            print(f"{name:7s} Mbit/s per run: {shown}   median {medians[name]:7.1f}")
        print(f"ratio nat/tunnel (medians): {result['ratio_nat_over_tunnel']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
