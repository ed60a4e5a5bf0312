"""The DNS stub's kernel rate limit (fzpoll/dns/shaper.py) without a kernel: the u32 keys it
matches the sentinels with, the parser of the class counters it reads back, the rate's override,
and the warning (not a failed start) when the limit cannot be installed. The real qdisc, and a
real flood, are in tests/test_dns_flood_netns.py."""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest

from fzpoll.dns import shaper
from fzpoll.dns.stub import SENTINELS_V4, SENTINELS_V6
from fzpoll.up import forked


def _rtattr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def _class_message(handle: int, packets: int, drops: int, qlen: int, overlimits: int) -> bytes:
    stats2 = _rtattr(shaper.TCA_STATS_BASIC, struct.pack("=QI", 999, packets) + bytes(4)) + \
        _rtattr(shaper.TCA_STATS_QUEUE, struct.pack("=IIIII", qlen, 100, drops, 0, overlimits))
    body = struct.pack("=BxxxiIII", 0, 7, handle, 0xFFFFFFFF, 0) + _rtattr(1, b"htb\0") + \
        _rtattr(shaper.TCA_STATS2 | 0x8000, stats2)  # NLA_F_NESTED, as the kernel sends it
    return struct.pack("=IHHII", 16 + len(body), shaper.RTM_NEWTCLASS, 2, 1, 0) + body


def test_u32_keys_match_the_sentinel_ranges() -> None:
    assert shaper.u32_keys(SENTINELS_V4) == ["0x64646f00/0xffffff00+16"]  # 100.100.111.0/24 at dst
    assert shaper.u32_keys(SENTINELS_V6) == [  # fd00:2021:1111:8000:100:100:111:0/120 at dst (24)
        "0xfd002021/0xffffffff+24", "0x11118000/0xffffffff+28",
        "0x01000100/0xffffffff+32", "0x01110000/0xffffff00+36"]
    assert shaper.u32_keys(ipaddress.ip_network("fd00::/8")) == ["0xfd000000/0xff000000+24"]


def test_u32_key_on_the_source_port_bucket() -> None:
    # the word after the IP header: source port (high half), destination port (low half)
    assert shaper.source_port_key(4, 5) == "0x00050000/0x000f0000+20"
    assert shaper.source_port_key(6, 15) == "0x000f0000/0x000f0000+40"
    assert shaper.bucket_class(15) == 0x53010F


def test_class_counters_are_read_from_the_dump() -> None:
    data = _class_message(0x10001, 5, 6, 7, 8) + _class_message(shaper.CLASS_ID, 1234, 0, 0, 321) + \
        _class_message(shaper.bucket_class(0), 1000, 56000, 8, 0) + _class_message(shaper.bucket_class(9), 234, 789, 3, 0)
    classes = shaper.parse_classes(data)
    assert classes[0x10001] == (5, 6, 7)
    assert shaper.limit_counters(classes) == {"passed": 1234, "dropped": 56789, "queued": 11}
    assert shaper.limit_counters(shaper.parse_classes(_class_message(0x10001, 5, 6, 7, 8))) is None


@pytest.mark.parametrize("cut", [3, 20, 40, 60])
def test_a_truncated_dump_gives_no_counters_not_an_error(cut: int) -> None:
    data = _class_message(shaper.CLASS_ID, 1, 2, 3, 4)
    assert shaper.parse_classes(data[:cut]) == {}


@pytest.mark.parametrize("value, rate", [("", shaper.DNS_QUERY_RATE), ("0", 0), ("250", 250),
                                         ("fast", shaper.DNS_QUERY_RATE), ("-5", shaper.DNS_QUERY_RATE),
                                         ("²", shaper.DNS_QUERY_RATE), (" 250 ", 250)])
def test_the_rate_can_be_overridden_or_turned_off(monkeypatch, value: str, rate: int) -> None:
    monkeypatch.setenv(shaper.ENV_RATE, value)
    assert shaper.configured_rate() == rate


@pytest.mark.parametrize("value", ["fast", "-5", "²", "1e3"])
def test_a_rate_that_is_not_a_number_is_a_warning(monkeypatch, caplog, value: str) -> None:
    monkeypatch.setenv(shaper.ENV_RATE, value)
    with caplog.at_level(logging.INFO, logger="fzpoll.dns.shaper"):
        assert shaper.configured_rate() == shaper.DNS_QUERY_RATE
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert shaper.ENV_RATE in caplog.records[0].getMessage()


def test_a_limit_that_cannot_be_installed_is_a_warning_and_no_limit(monkeypatch, caplog) -> None:
    monkeypatch.delenv(shaper.ENV_RATE, raising=False)
    # the real install, in a forked child as the daemon runs it: no such interface (as a kernel
    # without HTB, a refused netlink request or a missing pyroute2: a reason, never an exception)
    rate, problem = forked.call(shaper.install_sentinel_limit, "fznosuch0")
    assert rate == shaper.DNS_QUERY_RATE and "fznosuch0" in problem
    with caplog.at_level(logging.INFO, logger="fzpoll.dns.shaper"):
        limit = shaper.DnsRateLimit("fznosuch0", rate, problem)
    assert limit.rate == 0 and limit.stats() == {"rate": 0, "off": problem}
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "not rate-limited" in caplog.records[0].getMessage()


def test_a_limit_turned_off_is_no_warning(monkeypatch, caplog) -> None:
    monkeypatch.setenv(shaper.ENV_RATE, "0")
    assert shaper.install_sentinel_limit("fznosuch0") == (0, "FZPOLL_DNS_RATE=0")  # nothing asked of the kernel
    with caplog.at_level(logging.INFO, logger="fzpoll.dns.shaper"):
        limit = shaper.DnsRateLimit("fznosuch0", 0, "FZPOLL_DNS_RATE=0")
    assert limit.stats() == {"rate": 0, "off": "FZPOLL_DNS_RATE=0"} and not caplog.records
