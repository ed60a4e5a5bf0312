"""The DNS stub's kernel rate limit (fzpoll/dns/shaper.py) against the real kernel, on a TUN
device in a namespace of our own: installed twice (a persistent device the previous daemon left
limited), and an install the kernel (or pyroute2) refuses midway, which must leave no HTB root."""

from __future__ import annotations

import json

import pytest

from netns import Namespace
from fzpoll.dns.shaper import CLASS_ID, QDISC_HANDLE, SOURCE_BUCKETS

pytestmark = [pytest.mark.netns, pytest.mark.needs("netns")]

_INSTALL = """
import sys
from fzpoll.dns import shaper
from fzpoll.dns.stub import SENTINELS_V4, SENTINELS_V6
print(repr(shaper.install("fzsh0", [str(SENTINELS_V4), str(SENTINELS_V6)], {rate})))
"""


@pytest.fixture()
def tun():
    with Namespace("shaper") as ns:
        ns.ip("tuntap", "add", "dev", "fzsh0", "mode", "tun")  # persistent: outlives its daemons
        ns.ip("link", "set", "fzsh0", "up")
        yield ns


def _install(ns: Namespace, rate: int) -> str:
    return ns.python(_INSTALL.format(rate=rate)).stdout.strip()


def _root(ns: Namespace) -> list[tuple[str, str]]:
    qdiscs = json.loads(ns.run(["tc", "-j", "qdisc", "show", "dev", "fzsh0"]).stdout or "[]")
    return [(q["kind"], q["handle"]) for q in qdiscs if q.get("root")]


def _classes(ns: Namespace) -> str:
    return ns.run(["tc", "class", "show", "dev", "fzsh0"]).stdout


def test_a_second_install_on_a_limited_device_is_a_success(tun) -> None:
    assert _install(tun, 1000) == "None"
    assert _install(tun, 500) == "None"  # e.g. the next daemon on a persistent device
    assert _root(tun) == [("htb", f"{QDISC_HANDLE >> 16:x}:")]
    classes = _classes(tun)
    assert classes.count("class htb ") == 1 + SOURCE_BUCKETS, classes
    assert f"class htb 53:{CLASS_ID & 0xFFFF:x} root rate 2048Kbit" in classes  # the new rate
    filters = tun.run(["tc", "filter", "show", "dev", "fzsh0"]).stdout
    assert filters.count("flowid") == 2 * SOURCE_BUCKETS, filters  # one set, not two


@pytest.mark.parametrize("rate", [1, 2])  # pyroute2 cannot encode the burst's time at these rates
def test_a_refused_install_is_a_reason_and_leaves_the_default_root(tun, rate: int) -> None:
    reason = _install(tun, rate)
    assert reason != "None" and "Traceback" not in reason, reason
    assert ("htb", f"{QDISC_HANDLE >> 16:x}:") not in _root(tun)
    assert "class htb" not in _classes(tun)


def test_a_root_qdisc_the_user_set_is_left_alone(tun) -> None:
    tun.run(["tc", "qdisc", "add", "dev", "fzsh0", "root", "handle", "7:", "pfifo", "limit", "100"])
    reason = _install(tun, 1000)
    assert reason != "None" and "pfifo" in reason, reason  # the warning says whose qdisc is there
    assert _root(tun) == [("pfifo", "7:")]
    assert "class htb" not in _classes(tun)
