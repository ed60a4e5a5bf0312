"""The link watcher: its rtnetlink parser on recorded and hand-built messages, and the daemon's
MTU following ``ip link set mtu`` in a namespace (issue 12), with wireguard-go as the peer."""

from __future__ import annotations

import json
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import netns
from fzpoll.io.linkwatch import (
    NLMSG_DONE,
    RTM_DELLINK,
    RTM_NEWLINK,
    LinkEvent,
    build_link_message,
    parse_link_messages,
)

RECORDED = json.loads((Path(__file__).parent / "data" / "rtnl_link_messages.json").read_text())


def test_recorded_newlink_carries_index_name_and_mtu() -> None:
    events = parse_link_messages(bytes.fromhex(RECORDED["newlink_mtu_1280"]))
    assert events == [LinkEvent(RECORDED["ifindex"], False, 1280, "fzrec0")]


def test_recorded_dellink() -> None:
    (event,) = parse_link_messages(bytes.fromhex(RECORDED["dellink"]))
    assert event.deleted and event.index == RECORDED["ifindex"] and event.name == "fzrec0"


def test_several_messages_in_one_datagram_and_other_types_skipped() -> None:
    done = struct.pack("=IHHIIi", 20, NLMSG_DONE, 0, 0, 0, 0)
    data = (build_link_message(RTM_NEWLINK, 7, mtu=1400, name="wg0") + done
            + build_link_message(RTM_NEWLINK, 8) + build_link_message(RTM_DELLINK, 7, name="wg0"))
    assert parse_link_messages(data) == [
        LinkEvent(7, False, 1400, "wg0"), LinkEvent(8, False, None, None), LinkEvent(7, True, None, "wg0"),
    ]


def test_truncated_input_keeps_what_came_before() -> None:
    first = build_link_message(RTM_NEWLINK, 3, mtu=1280)
    second = build_link_message(RTM_NEWLINK, 4, mtu=1300)
    for cut in range(len(second)):
        assert parse_link_messages(first + second[:cut]) == [LinkEvent(3, False, 1280, None)]


def test_bad_attribute_lengths_end_the_attributes_not_the_parse() -> None:
    msg = bytearray(build_link_message(RTM_NEWLINK, 5, mtu=1280, name="x"))
    msg[32:34] = (2).to_bytes(2, "little")  # the first rtattr claims less than its own header
    assert parse_link_messages(bytes(msg) + build_link_message(RTM_DELLINK, 5)) == [
        LinkEvent(5, False, None, None), LinkEvent(5, True, None, None)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_never_raises_on_any_bytes(data: bytes) -> None:
    for event in parse_link_messages(data):
        assert isinstance(event, LinkEvent)


@settings(max_examples=200, deadline=None)
@given(st.integers(-2**31, 2**31 - 1), st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       st.one_of(st.none(), st.text("abcwg0123", min_size=1, max_size=15)), st.booleans())
def test_build_and_parse_round_trip(index: int, mtu: int | None, name: str | None, deleted: bool) -> None:
    kind = RTM_DELLINK if deleted else RTM_NEWLINK
    assert parse_link_messages(build_link_message(kind, index, mtu=mtu, name=name)) == [
        LinkEvent(index, deleted, mtu, name)]


# ---------------------------------------------------------------------------- in a namespace

_WATCH = r"""
import json, subprocess, sys
from fzpoll.io.linkwatch import LinkWatcher
from fzpoll.io.tun import TunDevice
tun = TunDevice("fzlw0"); tun.set_mtu(1420)
w = LinkWatcher("fzlw0", 1420)
out = {"idle": w.read()}
subprocess.run(["ip", "link", "set", "fzlw0", "mtu", "1280"], check=True)
subprocess.run(["ip", "link", "set", "fzlw0", "up"], check=True)  # a change that is not the MTU
out["mtu"] = w.read()
out["resync"] = w.resync()
subprocess.run(["ip", "link", "del", "fzlw0"], check=True)
out["deleted"] = w.read()
print(json.dumps(out))
"""


@pytest.mark.netns
@pytest.mark.needs("netns")
def test_watcher_sees_mtu_change_and_deletion_in_a_namespace() -> None:
    with netns.Namespace("lw") as ns:
        out = json.loads(ns.python(_WATCH).stdout)
    assert out == {"idle": [False, None], "mtu": [False, 1280], "resync": [False, None], "deleted": [True, None]}


def _wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def _engine_mtu(ifname: str) -> int:
    from fzpoll.show import interface_status

    stats = interface_status(ifname).stats
    assert stats is not None
    return stats["daemon"]["mtu"]


def _ping(ns: netns.Namespace, payload: int) -> subprocess.CompletedProcess[str]:
    """One IPv4 ping of ``payload`` ICMP data bytes (IP packet: payload + 28), never fragmented."""
    return ns.run(["ping", "-c", "1", "-W", "3", "-M", "do", "-s", str(payload), "100.64.0.2"],
                  check=False, timeout=10)


def _set_mtu(ns: netns.Namespace, ifname: str, mtu: int) -> None:
    ns.ip("link", "set", ifname, "mtu", str(mtu))
    _wait_until(lambda: _engine_mtu(ifname) == mtu, 5, f"the engine's MTU did not follow the link to {mtu}")


def _wire_size_of_ping(ns: netns.Namespace, peer: netns.WireguardGo, payload: int) -> int:
    """Bytes the peer received for one echo request: the encrypted, padded datagram."""
    before = peer.wg_show_dump().peers[0].rx_bytes
    assert _ping(ns, payload).returncode == 0
    return peer.wg_show_dump().peers[0].rx_bytes - before


@pytest.mark.netns
@pytest.mark.needs("wireguard-go")
def test_mtu_follows_the_link() -> None:
    """`ip link set mtu` after start-up: pings that fit the new MTU go through, and the engine
    pads (whitepaper 5.4.6: to a multiple of 16, capped at the MTU) to the new MTU; with
    wireguard-go as the peer (its rx bytes are our datagrams' sizes)."""
    with netns.Namespace("a") as ns_a, netns.Namespace("b") as ns_b:
        pair = netns.veth_pair(ns_a, ns_b)
        a, b = netns.wg_pair(ns_a, ns_b, pair, kind_a=netns.Fzpoll, kind_b=netns.WireguardGo)
        try:
            assert _ping(ns_a, 56).returncode == 0  # handshake
            assert _engine_mtu(a.ifname) == 1420
            _set_mtu(ns_a, a.ifname, 1280)
            assert _ping(ns_a, 1280 - 28).returncode == 0  # the largest packet that fits
            assert _ping(ns_a, 1280 - 28 + 1).returncode != 0  # the kernel refuses one more byte
            # 1297-byte packet: padded to 1312 under 1420 and 1280, but capped at 1300 under 1300
            _set_mtu(ns_a, a.ifname, 1300)
            assert _wire_size_of_ping(ns_a, b, 1297 - 28) == 1300 + 32
            _set_mtu(ns_a, a.ifname, 1420)
            assert _wire_size_of_ping(ns_a, b, 1297 - 28) == 1312 + 32
            assert _ping(ns_a, 1420 - 28).returncode == 0
            assert _wire_size_of_ping(ns_a, b, 1415 - 28) == 1420 + 32  # capped at 1420, not 1424
            assert '"MTU changed"' in a.log()
        except AssertionError:
            print("--- a log ---\n" + a.log()[-4000:])
            raise
