"""tools/bench_dns.py runs, and every answer its load generator got was the right one.

Correctness only: rates depend on the machine and its load, so nothing here asserts a speed (nor
a loss count). The figures are printed, so ``pytest -s`` and CI logs show them. The end-to-end
run needs root and dnsmasq (skipped otherwise, with the reason); the generator's answer checks
are tested without either.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord


TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_dns.py"
SCENARIOS = {"local-fixed", "recursive", "dnsmasq", "local-new"}


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_dns", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_dns = _load_tool()


def run_tool(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------
# The generator's answer checks (no root)


def _query(name: str, qid: int = 0x1234) -> bytes:
    return qid.to_bytes(2, "big") + bench_dns.QUERY_FLAGS_COUNTS + bench_dns.question(name)


def _answer(name: str, *addresses: str, rcode: int = RCODE.NOERROR, qid: int = 0x1234) -> bytes:
    query = DNSRecord.parse(_query(name, qid))
    reply = query.reply()
    reply.header.rcode = rcode
    for address in addresses:
        reply.add_answer(RR(name, QTYPE.A, rdata=A(address), ttl=1))
    return bytes(reply.pack())


def test_generator_query_is_what_dnslib_reads():
    record = DNSRecord.parse(_query("www.upstream.test", 7))
    assert record.header.id == 7 and record.header.rd == 1 and not record.header.qr
    assert str(record.q.qname) == "www.upstream.test." and record.q.qtype == QTYPE.A


def test_checker_exact():
    q = bench_dns.question("www.upstream.test")
    check = bench_dns.Checker({"kind": "exact", "a": ["198.51.100.7"]})
    assert check.judge(_answer("www.upstream.test", "198.51.100.7"), q) == "ok"
    assert check.judge(_answer("www.upstream.test", "198.51.100.7"), q) == "ok"  # the cached path
    assert check.judge(_answer("www.upstream.test", "198.51.100.8"), q) == "wrong"
    assert check.judge(_answer("www.upstream.test"), q) == "wrong"  # NOERROR, no record
    assert check.judge(_answer("other.test", "198.51.100.7"), q) == "wrong"  # another question
    assert check.judge(_answer("www.upstream.test", rcode=RCODE.SERVFAIL), q) == "error"
    assert check.judge(_query("www.upstream.test"), q) == "wrong"  # a query is no answer
    assert check.judge(b"\x12\x34\x81", q) == "wrong"
    assert check.judge(_answer("www.upstream.test", "198.51.100.7")[:-2], q) == "wrong"  # cut short
    assert check.reasons == {"wrong_address": 2, "mismatch": 1, "rcode2": 1, "malformed": 3}


def test_checker_stable_and_unique_proxy_addresses():
    q = bench_dns.question("app.corp.test")
    stable = bench_dns.Checker({"kind": "stable", "net": "100.96.0.0/11"})
    assert stable.judge(_answer("app.corp.test", "100.96.0.1"), q) == "ok"
    assert stable.judge(_answer("app.corp.test", "100.96.0.1", qid=9), q) == "ok"
    assert stable.judge(_answer("app.corp.test", "100.96.0.2"), q) == "wrong"  # changed
    assert stable.judge(_answer("app.corp.test", "100.128.0.1"), q) == "wrong"  # outside the pool
    assert stable.judge(_answer("app.corp.test", "100.96.0.1", "100.96.0.1"), q) == "wrong"  # two

    unique = bench_dns.Checker({"kind": "unique", "net": "100.96.0.0/11"})
    q1, q2, q3 = (bench_dns.question(f"app{i}.corp.test") for i in (1, 2, 3))
    assert unique.judge(_answer("app1.corp.test", "100.96.0.5"), q1) == "ok"
    assert unique.judge(_answer("app2.corp.test", "100.127.255.254"), q2) == "ok"
    assert unique.judge(_answer("app3.corp.test", "100.96.0.5"), q3) == "wrong"  # reused
    assert unique.reasons == {"address_reused": 1}


def test_bad_arguments_are_refused():
    assert run_tool("--seconds", "0").returncode == 2
    assert run_tool("--window", "0").returncode == 2
    assert run_tool("--window", "1001").returncode == 2  # the stub SERVFAILs beyond 1000 in flight


# ---------------------------------------------------------------------------------------------
# The end-to-end run (root, dnsmasq)


@pytest.mark.netns
@pytest.mark.needs("netns", "dnsmasq")
def test_quick_json_run_gets_right_answers_in_every_scenario():
    proc = run_tool("--quick", "--json")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(proc.stdout)
    print()
    print(bench_dns.table(r))

    assert r["ok"] is True and r["daemon_alive"] is True
    assert r["quick"] is True and r["wall_s"] > 0
    rows = {row["scenario"]: row for row in r["scenarios"] if row["engine"] == "python"}
    assert set(rows) == SCENARIOS
    for name, row in rows.items():
        assert row["qps"] > 0 and row["answered"] > 0, name
        assert row["verified"] >= row["answered"], name
        assert row["wrong"] == 0 and row["errors"] == 0 and row["reasons"] == {}, (name, row["reasons"])
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"], name
    assert r["wrong_total"] == 0 and r["errors_total"] == 0

    # The answers went where the scenario says: the stub's own counters agree.
    assert rows["local-fixed"]["stub_counters"].get("dns_resource_answer", 0) >= rows["local-fixed"]["verified"]
    assert rows["local-new"]["stub_counters"].get("dns_resource_answer", 0) >= rows["local-new"]["verified"]
    assert rows["recursive"]["stub_counters"].get("dns_forwarded_answer", 0) >= rows["recursive"]["verified"]
    assert "dns_forwarded" not in rows["dnsmasq"]["stub_counters"]  # the baseline bypasses the stub
    assert "dns_resource_answer" not in rows["dnsmasq"]["stub_counters"]
    for row in rows.values():
        assert not any(k.startswith("dns_servfail") for k in row["stub_counters"]), row["stub_counters"]
    # One proxy address for the fixed name, a new one for every new name.
    assert rows["local-fixed"]["address"].startswith("100.")
    assert rows["local-new"]["distinct_addresses"] == rows["local-new"]["verified"]

    for key in ("python:recursive/dnsmasq", "python:local-fixed/dnsmasq", "python:local-new/dnsmasq"):
        assert r["ratios"][key] > 0, key
    assert r["machine"]["nproc"] >= 1 and r["machine"]["kernel"]
