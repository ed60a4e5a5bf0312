"""The UAPI: get/set against a real Engine, connection framing, and the server on real sockets.

Expected answers and errno values were recorded from Debian's wireguard-go v0.0.20220316 (see
/work/shared/harness/uapi-probe.txt and the probes described in fzpoll/uapi.py's docstring).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fzpoll.uapi import protocol as uapi
from fzpoll.wireguard.constants import INITIATION_SIZE
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from fzpoll.uapi.protocol import (
    UapiConnection,
    UapiError,
    format_endpoint,
    handle_get,
    handle_set,
    parse_endpoint,
    parse_prefix,
)
from fzpoll.uapi.server import UapiServer
from fzpoll.uapi.transaction import _DEVICE_KEYS
from helpers import FakeHost, SelectorLoop, key

# The peer of the recorded probe (uapi-probe.txt): AOD66E7iP1GtkGq//rVPjgFwGy28pO+XtlhCA9FK82E=
PROBE_PEER = "00e0fae84ee23f51ad906abffeb54f8e01701b2dbca4ef97b6584203d14af361"
PEER2 = "0909090909090909090909090909090909090909090909090909090909090909"
PEER3 = "0a" * 32
ZEROS = "0" * 64


def run_set(host: FakeHost, body: str, now: float = 0.0) -> int:
    return handle_set(host, body.strip("\n").split("\n"), now)


def snapshot(host: FakeHost) -> str:
    """Everything the UAPI can observe (the get answer) plus the peers' identities."""
    return handle_get(host) + repr([id(p) for p in host.engine.peers.values()])


# ---------------------------------------------------------------------------------------------
# get=1


def test_get_of_an_empty_interface_is_just_errno() -> None:
    assert handle_get(FakeHost()) == "errno=0\n\n"


def test_get_matches_the_recorded_wireguard_go_answer(host: FakeHost) -> None:
    priv = key(1)
    host.engine.set_private_key(priv)
    host.listen_port = 51820
    peer = host.engine.add_peer(PublicKey.from_hex(PROBE_PEER))
    host.engine.set_endpoint(peer, ("10.231.0.2", 51820))
    peer.last_handshake_wall = 1795541407.252294162
    peer.tx_bytes, peer.rx_bytes = 564, 476
    peer.persistent_keepalive_interval = 25
    host.engine.add_allowed_ip(peer, "100.64.0.2/32")
    host.engine.add_allowed_ip(peer, "10.99.0.0/16")
    answer = handle_get(host)
    expected = (
        f"private_key={priv.hex()}\n"
        "listen_port=51820\n"
        f"public_key={PROBE_PEER}\n"
        f"preshared_key={ZEROS}\n"
        "protocol_version=1\n"
        "endpoint=10.231.0.2:51820\n"
        "last_handshake_time_sec=1795541407\n"
        "last_handshake_time_nsec=252294\n"  # the float's precision; wireguard-go has ns
        "tx_bytes=564\n"
        "rx_bytes=476\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=100.64.0.2/32\n"
        "allowed_ip=10.99.0.0/16\n"
        "errno=0\n\n"
    )
    # Compare all but the nanoseconds digits, which a float cannot carry exactly.
    got_lines, want_lines = answer.split("\n"), expected.split("\n")
    assert len(got_lines) == len(want_lines)
    for got, want in zip(got_lines, want_lines):
        if want.startswith("last_handshake_time_nsec="):
            assert abs(int(got.split("=")[1]) - 252294162) < 1000
        else:
            assert got == want


def test_get_fwmark_psk_ipv6_endpoint_and_order(host: FakeHost) -> None:
    host.fwmark = 0x33
    host.listen_port = 1
    a = host.engine.add_peer(PublicKey.from_hex(PEER2))
    b = host.engine.add_peer(PublicKey.from_hex(PROBE_PEER))
    host.engine.set_preshared_key(a, PresharedKey(bytes(range(32))))
    host.engine.set_endpoint(a, ("2001:db8::1:0:0:1", 51820, 0, 0))
    host.engine.set_endpoint(b, ("::ffff:1.2.3.4", 9, 0, 0))
    host.engine.add_allowed_ip(a, "fd00::1/64")
    host.engine.add_allowed_ip(a, "10.0.0.0/8")
    lines = handle_get(host).split("\n")
    assert lines[:3] == ["listen_port=1", "fwmark=51", f"public_key={PEER2}"]
    assert lines[3] == f"preshared_key={bytes(range(32)).hex()}"
    assert "endpoint=[2001:db8::1:0:0:1]:51820" in lines
    assert "endpoint=[::ffff:1.2.3.4]:9" in lines
    # allowed IPs in insertion order, masked, as wireguard-go lists them
    assert [l for l in lines if l.startswith("allowed_ip=")] == ["allowed_ip=fd00::/64", "allowed_ip=10.0.0.0/8"]
    assert lines.index(f"public_key={PEER2}") < lines.index(f"public_key={PROBE_PEER}")
    assert lines[-3:] == ["errno=0", "", ""]


def test_get_never_handshaked_is_zero_and_epoch_otherwise(host: FakeHost) -> None:
    p = host.engine.add_peer(PublicKey.from_hex(PEER2))
    assert "last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n" in handle_get(host)
    p.last_handshake_wall = 1_700_000_000.5
    assert "last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n" in handle_get(host)


def test_get_shows_the_private_key_clamped(host: FakeHost) -> None:
    host.engine.set_private_key(PrivateKey(b"\xaa" * 32))
    assert handle_get(host).startswith("private_key=a8" + "aa" * 30 + "6a\n")


# ---------------------------------------------------------------------------------------------
# set=1: every key


def test_set_the_probe_body_then_get(host: FakeHost) -> None:
    priv = key(2)
    body = (
        f"private_key={priv.hex()}\nlisten_port=51820\nfwmark=0\n"
        f"public_key={PROBE_PEER}\npersistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\nallowed_ip=10.99.0.0/16\n"
    )
    assert run_set(host, body) == 0
    assert host.engine.private_key == priv
    assert host.listen_port == 51820 and host.fwmark == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PROBE_PEER))
    assert peer is not None and peer.persistent_keepalive_interval == 25
    assert [str(n) for n in host.engine.allowed_ips_of(peer)] == ["10.99.0.0/16", "100.64.0.2/32"]


def test_private_key_is_clamped_upper_case_ok_and_zero_clears(host: FakeHost) -> None:
    assert run_set(host, "private_key=" + "A" * 64) == 0
    assert host.engine.private_key.hex() == "a8" + "aa" * 30 + "6a"
    assert run_set(host, "private_key=" + ZEROS) == 0
    assert host.engine.private_key is None
    for bad in ("a" * 63, " " + "a" * 63, "a" * 65, "", "g" * 64, "a" * 63 + "\u00e9"):
        assert run_set(host, "private_key=" + bad) == errno.EINVAL


def test_private_key_equal_to_a_peer_removes_that_peer(host: FakeHost) -> None:
    priv = key(3)
    assert run_set(host, f"public_key={priv.public_key.hex()}\npublic_key={PEER2}") == 0
    assert run_set(host, f"private_key={priv.hex()}") == 0
    assert list(host.engine.peers) == [bytes.fromhex(PEER2)]


@pytest.mark.parametrize("value,port", [("51820", 51820), ("0040000", 40000), ("65535", 65535), ("0", 40000)])
def test_listen_port_values(host: FakeHost, value: str, port: int) -> None:
    assert run_set(host, f"listen_port={value}") == 0
    assert host.listen_port == port


@pytest.mark.parametrize("value", ["65536", "-1", "+1", "1=2", "", " 1", "0x10", "1_0", "\u0661"])
def test_listen_port_invalid(host: FakeHost, value: str) -> None:
    assert run_set(host, f"listen_port={value}") == errno.EINVAL
    assert host.listen_port == 0


def test_listen_port_in_use_is_eaddrinuse_and_stops_the_request(host: FakeHost) -> None:
    host.busy.add(40100)
    assert run_set(host, "fwmark=3\nlisten_port=40100\nfwmark=4") == errno.EADDRINUSE
    assert host.fwmark == 0  # all or nothing: the fwmark before it is undone


def test_host_oserror_maps_to_eaddrinuse_like_wireguard_go(host: FakeHost) -> None:
    host.fwmark_error = PermissionError(errno.EPERM, "no")
    assert run_set(host, "fwmark=1") == errno.EADDRINUSE


@pytest.mark.parametrize("value,ok", [("0", True), ("4294967295", True), ("007", True),
                                      ("4294967296", False), ("0x10", False), ("", False)])
def test_fwmark_values(host: FakeHost, value: str, ok: bool) -> None:
    assert run_set(host, f"fwmark={value}") == (0 if ok else errno.EINVAL)
    if ok:
        assert host.fwmark == int(value)


def test_replace_peers(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nallowed_ip=10.0.0.0/8") == 0
    assert run_set(host, "replace_peers=false") == errno.EINVAL
    assert run_set(host, "replace_peers=TRUE") == errno.EINVAL
    assert len(host.engine.peers) == 1
    assert run_set(host, f"replace_peers=true\npublic_key={PEER3}") == 0
    assert list(host.engine.peers) == [bytes.fromhex(PEER3)]
    assert len(list(host.engine.allowed_ips())) == 0


def test_public_key_creates_once_and_rejects_bad_hex(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert run_set(host, f"public_key={PEER2.upper()}") == 0
    assert host.engine.get_peer(PublicKey.from_hex(PEER2)) is peer
    assert run_set(host, "public_key=" + PEER2[:-1] + "g") == errno.EINVAL
    assert len(host.engine.peers) == 1


def test_own_public_key_is_ignored(host: FakeHost) -> None:
    priv = key(4)
    body = f"private_key={priv.hex()}\npublic_key={priv.public_key.hex()}\nallowed_ip=10.0.0.0/8\nendpoint=1.2.3.4:5"
    assert run_set(host, body) == 0
    assert host.engine.peers == {} and len(list(host.engine.allowed_ips())) == 0
    # its lines are still validated
    assert run_set(host, f"public_key={priv.public_key.hex()}\nendpoint=nope") == errno.EINVAL


def test_zero_public_key_is_our_own_while_no_private_key_is_set(host: FakeHost) -> None:
    assert run_set(host, f"public_key={ZEROS}") == 0
    assert host.engine.peers == {}
    host.engine.set_private_key(key(5))
    assert run_set(host, f"public_key={ZEROS}") == 0
    assert list(host.engine.peers) == [bytes(32)]


def test_remove(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nallowed_ip=10.0.0.0/8") == 0
    assert run_set(host, f"public_key={PEER2}\nremove=false") == errno.EINVAL
    assert len(host.engine.peers) == 1
    assert run_set(host, f"public_key={PEER2}\nremove=true\nallowed_ip=11.0.0.0/8\nendpoint=1.1.1.1:1") == 0
    assert host.engine.peers == {} and len(list(host.engine.allowed_ips())) == 0
    # removing an unknown peer is fine (and creates nothing); later lines are still validated
    assert run_set(host, f"public_key={PEER3}\nremove=true") == 0
    assert run_set(host, f"public_key={PEER3}\nremove=true\nendpoint=garbage") == errno.EINVAL
    assert host.engine.peers == {}


def test_update_only(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nupdate_only=true\nallowed_ip=10.0.0.0/8") == 0
    assert host.engine.peers == {}
    assert run_set(host, f"public_key={PEER2}") == 0
    assert run_set(host, f"public_key={PEER2}\nupdate_only=true\nallowed_ip=10.0.0.0/8") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert [str(n) for n in host.engine.allowed_ips_of(peer)] == ["10.0.0.0/8"]
    # wireguard-go keeps the peer created by public_key= before an EINVAL; we apply nothing
    assert run_set(host, f"public_key={PEER3}\nupdate_only=false") == errno.EINVAL
    assert bytes.fromhex(PEER3) not in host.engine.peers


def test_preshared_key(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\npreshared_key={'B' * 64}") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert peer.preshared_key.hex() == "b" * 64
    assert run_set(host, f"public_key={PEER2}\npreshared_key={ZEROS}") == 0
    assert peer.preshared_key.is_zero()
    assert run_set(host, f"public_key={PEER2}\npreshared_key=abc") == errno.EINVAL


ENDPOINTS_OK = [
    ("1.2.3.4:51820", ("1.2.3.4", 51820), "1.2.3.4:51820"),
    ("1.2.3.4:080", ("1.2.3.4", 80), "1.2.3.4:80"),
    ("1.2.3.4:0", ("1.2.3.4", 0), "1.2.3.4:0"),
    ("[::1]:5", ("::1", 5, 0, 0), "[::1]:5"),
    ("[::0:0:1]:80", ("::1", 80, 0, 0), "[::1]:80"),
    ("[2001:db8:0:0:1:0:0:1]:51820", ("2001:db8::1:0:0:1", 51820, 0, 0), "[2001:db8::1:0:0:1]:51820"),
    ("[::ffff:1.2.3.4]:80", ("::ffff:1.2.3.4", 80, 0, 0), "[::ffff:1.2.3.4]:80"),
    ("[FD00::A]:1", ("fd00::a", 1, 0, 0), "[fd00::a]:1"),
    ("[fe80::1%1]:80", ("fe80::1", 80, 0, 0), "[fe80::1]:80"),  # a numeric zone is dropped
    # stored as glibc's inet_ntop writes it (as recvfrom would return it), shown as Go prints it
    ("[::1.2.3.4]:7", ("::1.2.3.4", 7, 0, 0), "[::102:304]:7"),
]
ENDPOINTS_BAD = [
    "[1.2.3.4]:80", "::1:80", "01.2.3.4:80", "1.2.3.4:+80", "1.2.3.4:65536", "localhost:80",
    "1.2.3.4", "1.2.3.4:", "[::1]", "[::1:80", "::1]:80", "", ":80", "1.2.3.4%eth0:80",
    "[fe80::1%]:80", " 1.2.3.4:80", "1.2.3.4:80 ", "[]:80",
    "[fe80::1%eth0]:5",  # wireguard-go: EINVAL when no interface has that name
]


@pytest.mark.parametrize("value,stored,shown", ENDPOINTS_OK)
def test_endpoint_accepted(host: FakeHost, value: str, stored: tuple, shown: str) -> None:
    assert parse_endpoint(value) == stored
    assert run_set(host, f"public_key={PEER2}\nendpoint={value}") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert peer.endpoint == stored
    assert format_endpoint(peer.endpoint) == shown
    assert f"\nendpoint={shown}\n" in handle_get(host)


def test_stored_ipv6_endpoint_is_what_recvfrom_returns() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
        rx.bind(("::1", 0))
        tx.bind(("::1", 0))
        tx.sendto(b"x", rx.getsockname())
        _, addr = rx.recvfrom(10)
    assert parse_endpoint(f"[::1]:{addr[1]}") == addr
    for value, stored, _ in ENDPOINTS_OK:
        if len(stored) == 4:
            packed = ipaddress.IPv6Address(stored[0]).packed
            assert socket.inet_ntop(socket.AF_INET6, packed) == stored[0]


@pytest.mark.parametrize("value", ENDPOINTS_BAD)
def test_endpoint_rejected(host: FakeHost, value: str) -> None:
    with pytest.raises(UapiError) as info:
        parse_endpoint(value)
    assert info.value.errno == errno.EINVAL
    assert run_set(host, f"public_key={PEER2}\nendpoint={value}") == errno.EINVAL
    assert host.engine.get_peer(PublicKey.from_hex(PEER2)) is None  # nothing applied


def test_endpoint_zone_naming_an_interface_is_dropped_like_wireguard_go(host: FakeHost) -> None:
    host.zone_exists = lambda name: name == "lo"  # type: ignore[attr-defined]
    assert run_set(host, f"public_key={PEER2}\nendpoint=[fe80::1%lo]:80") == 0
    assert host.engine.get_peer(PublicKey.from_hex(PEER2)).endpoint == ("fe80::1", 80, 0, 0)
    assert run_set(host, f"public_key={PEER2}\nendpoint=[fe80::1%eth0]:80") == errno.EINVAL


def test_format_endpoint_keeps_a_zone_seen_by_recvfrom() -> None:
    assert format_endpoint(("fe80::1%eth0", 51820, 0, 2)) == "[fe80::1%eth0]:51820"
    assert format_endpoint(("not-an-ip", 1)) == "not-an-ip:1"


def test_persistent_keepalive_interval(host: FakeHost) -> None:
    host.engine.set_private_key(key(6))
    # the interval before the endpoint: the keepalive (here an initiation) still goes out at the
    # end of the peer's section, as wireguard-go's handlePostConfig sends it
    assert run_set(host, f"public_key={PEER2}\npersistent_keepalive_interval=25\nendpoint=127.0.0.1:5555") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert peer.persistent_keepalive_interval == 25
    sent = host.engine.datagrams_to_send()
    assert [len(d) for d, _, _ in sent] == [INITIATION_SIZE]
    assert sent[0][1] == ("127.0.0.1", 5555)
    assert run_set(host, f"public_key={PEER2}\npersistent_keepalive_interval=65535") == 0
    assert peer.persistent_keepalive_interval == 65535
    assert run_set(host, f"public_key={PEER2}\npersistent_keepalive_interval=65536") == errno.EINVAL
    assert run_set(host, f"public_key={PEER2}\npersistent_keepalive_interval=0") == 0
    assert peer.persistent_keepalive_interval == 0 and peer.persistent_at is None


def test_persistent_keepalive_interval_is_not_applied_when_a_later_line_fails(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\npersistent_keepalive_interval=5\nbogus=1") == errno.EINVAL
    assert host.engine.get_peer(PublicKey.from_hex(PEER2)) is None


def test_persistent_keepalive_of_a_removed_peer_is_dropped(host: FakeHost) -> None:
    host.engine.set_private_key(key(6))
    assert run_set(host, f"public_key={PEER2}\nendpoint=127.0.0.1:1\npersistent_keepalive_interval=5\nremove=true") == 0
    assert host.engine.peers == {} and host.engine.datagrams_to_send() == []


def test_replace_allowed_ips(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nallowed_ip=10.0.0.0/8\nallowed_ip=fd00::/8") == 0
    assert run_set(host, f"public_key={PEER2}\nreplace_allowed_ips=yes") == errno.EINVAL
    assert run_set(host, f"public_key={PEER2}\nreplace_allowed_ips=true\nallowed_ip=11.0.0.0/8") == 0
    peer = host.engine.get_peer(PublicKey.from_hex(PEER2))
    assert [str(n) for n in host.engine.allowed_ips_of(peer)] == ["11.0.0.0/8"]


PREFIXES_OK = [
    ("10.1.0.5/24", "10.1.0.0/24"), ("fd00::1/64", "fd00::/64"), ("10.0.0.0/024", "10.0.0.0/24"),
    ("11.0.0.0/+8", "11.0.0.0/8"), ("12.0.0.0/-0", "0.0.0.0/0"), ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"),
    ("::1.2.3.4/128", "::102:304/128"), ("0.0.0.0/0", "0.0.0.0/0"), ("::/0", "::/0"),
    ("FD00::/8", "fd00::/8"), ("1.2.3.4/32", "1.2.3.4/32"),
]
PREFIXES_BAD = ["12.0.0.0/33", "::/129", "12.0.0.0", "12.0.0.0/8 ", "fe80::1%lo/64", "1.2.3/8",
                "/8", "1.2.3.4/", "1.2.3.4/-1", "1.2.3.4/8/8", "01.2.3.4/8", "1.2.3.4/0x8", "x/8"]


@pytest.mark.parametrize("value,shown", PREFIXES_OK)
def test_allowed_ip_accepted(host: FakeHost, value: str, shown: str) -> None:
    assert run_set(host, f"public_key={PEER2}\nallowed_ip={value}") == 0
    assert f"\nallowed_ip={shown}\n" in handle_get(host)


@pytest.mark.parametrize("value", PREFIXES_BAD)
def test_allowed_ip_rejected(host: FakeHost, value: str) -> None:
    with pytest.raises(UapiError):
        parse_prefix(value)
    assert run_set(host, f"public_key={PEER2}\nallowed_ip={value}") == errno.EINVAL
    assert len(list(host.engine.allowed_ips())) == 0


def test_allowed_ip_moves_between_peers(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nallowed_ip=10.0.0.0/8\npublic_key={PEER3}\nallowed_ip=10.0.0.0/8") == 0
    assert host.engine.peer_for("10.1.2.3").public_key.hex() == PEER3


def test_protocol_version(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nprotocol_version=1") == 0
    assert run_set(host, f"public_key={PEER2}\nprotocol_version=2") == errno.EINVAL
    assert run_set(host, "protocol_version=1") == errno.EINVAL  # not a device key


# ---------------------------------------------------------------------------------------------
# set=1: errors


def test_line_without_equals_is_eproto(host: FakeHost) -> None:
    assert run_set(host, "bogus") == errno.EPROTO
    assert run_set(host, "fwmark=5\nbogus\nfwmark=6") == errno.EPROTO
    assert host.fwmark == 0


def test_unknown_or_empty_key_is_einval(host: FakeHost) -> None:
    assert run_set(host, "bogus=1") == errno.EINVAL
    assert run_set(host, "=x") == errno.EINVAL
    assert run_set(host, f"public_key={PEER2}\nlisten_port=5") == errno.EINVAL  # device key in a peer


def test_a_failure_rejects_the_whole_request(host: FakeHost) -> None:
    body = f"listen_port=40005\nfwmark=9\npublic_key={PEER2}\nallowed_ip=10.0.0.0/8\nendpoint=x\nallowed_ip=11.0.0.0/8"
    assert run_set(host, body) == errno.EINVAL
    assert host.listen_port == 0 and host.fwmark == 0
    assert host.engine.peers == {} and len(list(host.engine.allowed_ips())) == 0


def test_a_blank_line_ends_the_body(host: FakeHost) -> None:
    assert handle_set(host, ["fwmark=1", "", "bogus"], 0.0) == 0
    assert host.fwmark == 1


def test_invalid_first_line_leaves_the_engine_unchanged(host: FakeHost) -> None:
    assert run_set(host, f"private_key={key(8).hex()}\npublic_key={PEER2}\nallowed_ip=10.0.0.0/8") == 0
    before = snapshot(host)
    for body in ("bogus", "bogus=1", "private_key=1", f"public_key={PEER2[:-2]}", "listen_port=x"):
        assert run_set(host, body) != 0
        assert snapshot(host) == before


# ---------------------------------------------------------------------------------------------
# UapiConnection


def conn_for(host: FakeHost, **kw) -> UapiConnection:
    return UapiConnection(host, **kw)


def test_connection_get_and_set(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"get=1\n\n", 0.0) == b"errno=0\n\n"
    assert c.receive_data(b"set=1\nlisten_port=7\n\n", 0.0) == b"errno=0\n\n"
    assert c.receive_data(b"get=1\n\n", 0.0) == b"listen_port=7\nerrno=0\n\n"
    assert c.receive_data(b"set=1\nbogus=1\n\n", 0.0) == b"errno=-22\n\n"
    assert c.receive_data(b"set=1\nbogus\n\n", 0.0) == b"errno=-71\n\n"
    assert not c.closing and c.requests == 5
    assert c.receive_data(b"", 0.0) == b""
    assert c.closing


def test_connection_immediate_eof_is_fine(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"", 0.0) == b""
    assert c.closing and c.requests == 0


def test_connection_pipelined_requests_all_answered(host: FakeHost) -> None:
    c = conn_for(host)
    out = c.receive_data(b"set=1\nlisten_port=40003\n\nget=1\n\nget=1\n\n", 0.0)
    assert out == b"errno=0\n\n" + b"listen_port=40003\nerrno=0\n\n" * 2


def test_connection_byte_by_byte(host: FakeHost) -> None:
    c = conn_for(host)
    data = f"set=1\npublic_key={PEER2}\nallowed_ip=10.0.0.0/8\n\nget=1\n\n".encode()
    out = b"".join(c.receive_data(data[i:i + 1], 0.0) for i in range(len(data)))
    assert out == b"errno=0\n\n" + handle_get(host).encode()


def test_connection_crlf_lines_as_go_scanner(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"set=1\nlisten_port=40001\r\n\r\n", 0.0) == b"errno=0\n\n"
    assert host.listen_port == 40001
    assert c.receive_data(b"get=1\r\n\r\n", 0.0) == b"errno=-71\n\n" and c.closing


def test_connection_eof_inside_set_applies_every_line_as_go_scanner(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"set=1\nlisten_port=40004\nfwmark=12", 0.0) == b""
    assert host.listen_port == 0  # nothing before the request ends
    assert c.receive_data(b"", 0.0) == b"errno=0\n\n"
    assert host.listen_port == 40004 and host.fwmark == 12  # the unterminated last line too
    assert c.closing


def test_connection_eof_after_get_line_closes_silently(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"get=1\n", 0.0) == b""
    assert c.receive_data(b"", 0.0) == b"" and c.closing


def test_connection_get_with_trailing_character_is_einval(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"get=1\nxget=1\n\n", 0.0) == b"errno=-22\n\nerrno=0\n\n"
    assert not c.closing


@pytest.mark.parametrize("data", [b"hello\n\n", b"get=2\n\n", b"\n", b"set=1 \n\n", b"GET=1\n\n"])
def test_connection_unknown_operation_is_eproto_then_close(host: FakeHost, data: bytes) -> None:
    c = conn_for(host)
    assert c.receive_data(data, 0.0) == b"errno=-71\n\n"
    assert c.closing
    assert c.receive_data(b"get=1\n\n", 0.0) == b""


def test_connection_line_too_long(host: FakeHost) -> None:
    c = conn_for(host)
    assert c.receive_data(b"set=1\nallowed_ip=" + b"1" * 4096, 0.0) == b"errno=-71\n\n"
    assert c.closing
    c = conn_for(host)
    assert c.receive_data(b"x" * 5000, 0.0) == b"errno=-71\n\n" and c.closing
    c = conn_for(host)
    assert c.receive_data(b"x" * 4096, 0.0) == b""  # exactly the limit: still waiting
    assert not c.closing


def _big_set(peer: str = PEER2) -> bytes:
    """wireguard-go's own big request: a.b.0.0/16 and a::b/128 for a in 1..255, b in 0..255."""
    lines = [f"set=1\npublic_key={peer}\n"]
    for a in range(1, 256):
        lines.append("".join(f"allowed_ip={a}.{b}.0.0/16\nallowed_ip={a:x}::{b:x}/128\n" for b in range(256)))
    return ("".join(lines) + "\n").encode()


def test_connection_has_no_size_cap_and_works_in_bounded_slices(host: FakeHost) -> None:
    c = conn_for(host)
    data = _big_set()
    assert len(data) > 3_000_000
    out = b""
    calls = 0
    body, end = data[:-1], data[-1:]
    for i in range(0, len(body), 65536):
        out += c.receive_data(body[i:i + 65536], 0.0)
        calls += 1
        while c.has_pending:
            out += c.process(0.0, budget=512)
            calls += 1
        assert len(c._buf) <= 4096  # parsed as it comes: never the whole request in memory
    assert out == b"" and len(list(host.engine.allowed_ips())) == 0  # staged: nothing applied yet
    out += c.receive_data(end, 0.0)
    while c.has_pending:
        assert out == b""  # answered once, at the end
        out += c.process(0.0, budget=512)
        calls += 1
    assert out == b"errno=0\n\n"
    assert len(list(host.engine.allowed_ips())) == 130_560
    assert calls > 200  # spread over many slices
    peer = host.engine.get_peer(PublicKey(bytes.fromhex(PEER2)))
    assert host.engine.peer_for("200.7.1.1") is peer
    assert host.engine.peer_for("c8::7") is peer
    g = conn_for(host)
    answer = g.receive_data(b"get=1\n\n", 0.0)
    slices = 1
    while g.has_pending:
        answer += g.process(0.0)
        slices += 1
    assert slices > 10  # streamed in slices of at most the output budget
    assert answer.count(b"\nallowed_ip=") == 130_560 and answer.endswith(b"errno=0\n\n")


def test_connection_a_bad_line_anywhere_applies_nothing(host: FakeHost) -> None:
    run_set(host, f"listen_port=40001\npublic_key={PEER3}\nallowed_ip=10.0.0.0/8")
    before = snapshot(host)
    c = conn_for(host)
    body = f"set=1\nlisten_port=40002\nreplace_peers=true\npublic_key={PEER2}\n".encode()
    body += b"allowed_ip=10.1.0.0/16\n" * 5000 + b"allowed_ip=10.1.0.0/99\n" + b"allowed_ip=10.2.0.0/16\n" * 10 + b"\n"
    out = c.receive_data(body, 0.0)
    while c.has_pending:
        out += c.process(0.0)
    assert out == b"errno=-22\n\n" and not c.closing
    assert snapshot(host) == before and host.listen_port == 40001


def test_connection_a_failed_port_undoes_the_fwmark_and_applies_nothing(host: FakeHost) -> None:
    host.busy.add(40100)
    before = snapshot(host)
    assert run_set(host, f"fwmark=3\nlisten_port=40100\npublic_key={PEER2}") == errno.EADDRINUSE
    assert host.fwmark == 0 and snapshot(host) == before


def test_connection_endpoint_with_a_zone_is_einval(host: FakeHost) -> None:
    assert run_set(host, f"public_key={PEER2}\nendpoint=[fe80::1%eth0]:5") == errno.EINVAL
    assert host.engine.peers == {}


def test_commits_of_two_clients_are_not_interleaved(host: FakeHost) -> None:
    lock = uapi.CommitLock()
    a, b = conn_for(host, lock=lock), conn_for(host, lock=lock)
    a.feed(_big_set(PEER2))
    b.feed(f"set=1\npublic_key={PEER2}\nremove=true\n\n".encode())
    out_a = out_b = b""
    while not out_a:
        out_a += a.process(0.0, budget=4096)
        if a.committing:
            break
    assert a.committing and lock.owner is a
    for _ in range(3):
        out_b += b.process(0.0)
        assert out_b == b"" and b.committing  # waits for a's commit
    while a.has_pending:
        out_a += a.process(0.0)
    assert out_a == b"errno=0\n\n" and len(list(host.engine.allowed_ips())) == 130_560
    while b.has_pending:
        out_b += b.process(0.0)
    assert out_b == b"errno=0\n\n" and host.engine.peers == {} and len(list(host.engine.allowed_ips())) == 0


def test_connection_output_budget_and_process(host: FakeHost) -> None:
    for i in range(50):
        host.engine.add_peer(PublicKey(bytes([i + 1]) * 32))
    answer = handle_get(host).encode()
    c = conn_for(host, output_budget=len(answer) * 2)
    out = c.receive_data(b"get=1\n\n" * 5, 0.0)
    assert out == answer * 2 and c.has_pending
    out = c.process(0.0)
    assert out == answer * 2 and c.has_pending
    assert c.process(0.0) == answer and not c.has_pending
    assert c.process(0.0) == b""


def test_connection_host_bug_answers_eio_and_closes(host: FakeHost) -> None:
    def boom(port: int) -> None:
        raise RuntimeError("bug")

    host.set_listen_port = boom  # type: ignore[method-assign]
    c = conn_for(host)
    logging.getLogger("fzpoll.uapi.protocol").disabled = True
    try:
        assert c.receive_data(b"set=1\nlisten_port=1\n\n", 0.0) == b"errno=-5\n\n"
    finally:
        logging.getLogger("fzpoll.uapi.protocol").disabled = False
    assert c.closing


def _split_responses(out: bytes) -> list[bytes]:
    parts = out.split(b"\n\n")
    assert parts[-1] == b""
    return parts[:-1]


_LINES = st.sampled_from([
    b"get=1\n", b"set=1\n", b"\n", b"\r\n", b"listen_port=1\n", b"listen_port=99999\n", b"fwmark=5\n",
    f"public_key={PEER2}\n".encode(), b"public_key=zz\n", b"allowed_ip=10.0.0.0/8\n",
    b"allowed_ip=fd00::/300\n", b"endpoint=[::1]:5\n", b"endpoint=1.2.3.4\n", b"remove=true\n",
    b"update_only=true\n", b"replace_peers=true\n", b"replace_allowed_ips=true\n",
    b"persistent_keepalive_interval=3\n", f"private_key={'1' * 64}\n".encode(), b"bogus\n",
    b"protocol_version=1\n", b"x=y=z\n", b"\xff\xfe=\x00\n",
])
_STREAMS = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(_LINES, st.binary(max_size=8)), max_size=40).map(b"".join),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_STREAMS, cuts=st.lists(st.integers(0, 400), max_size=6), eof=st.booleans())
def test_fuzz_connection_never_raises(data: bytes, cuts: list[int], eof: bool) -> None:
    h = FakeHost()
    h.busy.add(1)
    c = UapiConnection(h, max_line=64)
    out = b""
    points = sorted({min(x, len(data)) for x in cuts} | {0, len(data)})
    for a, b in zip(points, points[1:]):
        out += c.receive_data(data[a:b], 1.0)
        while c.has_pending:
            out += c.process(1.0)
    if eof:
        out += c.receive_data(b"", 1.0)
        assert c.closing
    # every answer is well formed and ends with an errno line
    for response in _split_responses(out) if out else []:
        last = response.split(b"\n")[-1]
        assert last.startswith(b"errno=")
        int(last[6:])
    if c.closing:
        assert c.receive_data(b"get=1\n\n", 1.0) == b""


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300).filter(lambda d: b"set=1\n" not in d and b"set=1\r" not in d))
def test_fuzz_input_without_a_set_leaves_the_engine_unchanged(data: bytes) -> None:
    h = FakeHost()
    handle_set(h, [f"private_key={key(9).hex()}", f"public_key={PEER2}", "allowed_ip=10.0.0.0/8"], 0.0)
    before = snapshot(h)
    c = UapiConnection(h)
    c.receive_data(data, 0.0)
    c.receive_data(b"", 0.0)
    assert snapshot(h) == before


@settings(max_examples=200, deadline=None)
@given(key_=st.text(max_size=20).filter(lambda k: k not in _DEVICE_KEYS and k != "public_key" and "=" not in k),
       value=st.text(max_size=20), rest=st.lists(st.sampled_from(["fwmark=1", f"public_key={PEER3}", "replace_peers=true"])))
def test_fuzz_a_bad_first_line_changes_nothing(key_: str, value: str, rest: list[str]) -> None:
    h = FakeHost()
    handle_set(h, [f"public_key={PEER2}", "allowed_ip=10.0.0.0/8"], 0.0)
    before = snapshot(h)
    if not key_:
        key_ = "x"
    code = handle_set(h, [f"{key_}={value}", *rest], 0.0)
    assert code == errno.EINVAL
    assert snapshot(h) == before


# ---------------------------------------------------------------------------------------------
# UapiServer on real sockets, with a tiny selectors loop


@pytest.fixture
def server_env(tmp_path):
    loop = SelectorLoop()
    h = FakeHost()
    servers: list[UapiServer] = []

    def start(name: str = "fzt0", **kw) -> UapiServer:
        s = UapiServer(name, h, loop, socket_dir=str(tmp_path / "wg"), **kw)
        servers.append(s)
        return s

    yield loop, h, start
    for s in servers:
        s.close()


_open_clients: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _open_clients:
        _open_clients.pop().close()


def client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _open_clients.append(s)
    s.connect(path)
    s.setblocking(False)
    return s


def recv_until(loop: SelectorLoop, sock: socket.socket, suffix: bytes = b"\n\n") -> bytes:
    buf = bytearray()

    def done() -> bool:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        buf.extend(chunk)
        return bytes(buf).endswith(suffix)

    loop.run_until(done)
    return bytes(buf)


def test_server_socket_mode_directory_and_close(server_env, tmp_path) -> None:
    loop, h, start = server_env
    s = start()
    assert stat.S_ISSOCK(os.stat(s.path).st_mode)
    assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "wg").st_mode) == 0o755
    s.close()
    assert not os.path.exists(s.path)
    assert loop.readers == {} and loop.writers == {}


def test_server_answers_several_clients_at_once(server_env) -> None:
    loop, h, start = server_env
    s = start()
    socks = [client(s.path) for _ in range(5)]
    loop.run_until(lambda: s.client_count == 5)
    # interleave partial requests from every client
    for i, c in enumerate(socks):
        c.send(b"set=1\nlisten_")
    loop.run_once(0.05)
    for i, c in enumerate(socks):
        c.send(f"port={40000 + i}\n\n".encode())
        assert recv_until(loop, c) == b"errno=0\n\n"
    for c in socks:
        c.send(b"get=1\n\n")
    for c in socks:
        assert recv_until(loop, c) == b"listen_port=40004\nerrno=0\n\n"
    for c in socks:
        c.close()
    loop.run_until(lambda: s.client_count == 0)


def test_server_serves_others_during_a_huge_rejected_set(server_env) -> None:
    """No size cap: 10 MB of invalid lines are read and discarded in bounded slices (nothing
    buffered), the other client is answered meanwhile, and the set answers once, EINVAL."""
    loop, h, start = server_env
    s = start()
    bad, good = client(s.path), client(s.path)
    loop.run_until(lambda: s.client_count == 2)
    flood = b"set=1\n" + b"x=y\n" * (10 * 1024 * 1024 // 4)
    sent = rounds = 0
    while sent < len(flood):
        try:
            sent += bad.send(flood[sent:sent + 65536])
        except BlockingIOError:
            pass
        loop.run_once(0)
        rounds += 1
        (cl,) = [c for c in s._clients.values() if c.sock.fileno() != -1 and c.conn.requests == 0
                 and c.conn._txn is not None] or [None]
        if cl is not None:
            assert len(cl.conn._buf) <= uapi.MAX_BUFFERED_INPUT + 65536  # bounded memory
        if rounds % 4 == 0:  # meanwhile the good client is served at once
            good.send(b"get=1\n\n")
            assert recv_until(loop, good) == b"errno=0\n\n"
    def sent_end() -> bool:
        try:
            return bad.send(b"\n") == 1
        except BlockingIOError:
            return False
    loop.run_until(sent_end)
    assert recv_until(loop, bad) == b"errno=-22\n\n"
    assert s.client_count == 2


def test_server_newline_free_garbage_is_cut_after_4k(server_env) -> None:
    loop, h, start = server_env
    s = start()
    bad = client(s.path)
    loop.run_until(lambda: s.client_count == 1)
    bad.send(b"A" * 5000)
    assert recv_until(loop, bad, b"") == b"errno=-71\n\n"
    assert s.client_count == 0


def test_server_immediate_eof_as_wg_probes(server_env) -> None:
    loop, h, start = server_env
    s = start()
    for _ in range(3):
        c = client(s.path)
        c.close()
    loop.run_until(lambda: s.client_count == 0 and loop.run_once(0) == 0)
    c = client(s.path)
    c.send(b"get=1\n\n")
    assert recv_until(loop, c) == b"errno=0\n\n"


def test_server_full_drops_the_longest_idle_client_so_the_operator_gets_in(server_env, caplog) -> None:
    loop, h, start = server_env
    s = start(max_clients=2)
    loop.now = 1.0
    a = client(s.path)
    loop.run_until(lambda: s.client_count == 1)
    loop.now = 2.0
    b = client(s.path)
    loop.run_until(lambda: s.client_count == 2)
    loop.now = 3.0
    with caplog.at_level(logging.WARNING, logger="fzpoll.uapi.server"):
        for _ in range(5):  # idle squatters keep coming: each evicts the oldest
            c = client(s.path)
            c.send(b"get=1\n\n")
            assert recv_until(loop, c) == b"errno=0\n\n"
    assert recv_until(loop, a, b"") == b""  # the longest idle was closed
    assert s.client_count == 2 and s.counters["evicted"] == 5
    warnings = [r for r in caplog.records if "too many clients" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line a second


def test_server_idle_timeout(server_env) -> None:
    loop, h, start = server_env
    s = start(idle_timeout=10.0)
    assert s.next_deadline() is None
    loop.now = 100.0
    a = client(s.path)
    loop.run_until(lambda: s.client_count == 1)
    assert s.next_deadline() == 110.0
    loop.now = 105.0
    b = client(s.path)
    loop.run_until(lambda: s.client_count == 2)
    s.expire_idle(109.9)
    assert s.client_count == 2
    s.expire_idle(110.0)
    assert s.client_count == 1 and s.next_deadline() == 115.0
    assert recv_until(loop, a, b"") == b""  # closed by the server
    loop.now = 112.0
    b.send(b"get=1\n\n")
    assert recv_until(loop, b) == b"errno=0\n\n"
    assert s.next_deadline() == 122.0


def test_server_does_not_buffer_without_bound_for_a_client_that_does_not_read(server_env) -> None:
    loop, h, start = server_env
    for i in range(200):
        h.engine.add_peer(PublicKey(bytes([i % 255 + 1, i // 255]) + bytes(30)))
    answer_len = len(handle_get(h))
    s = start()
    c = client(s.path)
    loop.run_until(lambda: s.client_count == 1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pipelined = b"get=1\n\n" * 2000
    sent = 0
    for _ in range(200):
        try:
            sent += c.send(pipelined[sent:])
        except BlockingIOError:
            pass
        loop.run_once(0)
        if sent == len(pipelined):
            break
    (cl,) = s._clients.values()
    assert len(cl.out) <= uapi.OUTPUT_BUDGET + answer_len
    assert not cl.reading  # backpressure: not read while an answer waits
    # now read everything: all 2000 answers arrive, in order
    total = 0
    def drain() -> bool:
        nonlocal total
        try:
            total += len(c.recv(1 << 20))
        except BlockingIOError:
            pass
        return total >= answer_len * (sent // 7)
    loop.run_until(drain, rounds=20000)
    assert total == answer_len * (sent // 7)


def test_server_removes_a_stale_socket(tmp_path, caplog) -> None:
    d = tmp_path / "wg"
    d.mkdir()
    path = str(d / "fzt1.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    loop = SelectorLoop()
    with caplog.at_level(logging.WARNING, logger="fzpoll.uapi.server"):
        s = UapiServer("fzt1", FakeHost(), loop, socket_dir=str(d))
    try:
        assert any("stale" in r.getMessage() for r in caplog.records)
        c = client(path)
        c.send(b"get=1\n\n")
        assert recv_until(loop, c) == b"errno=0\n\n"
    finally:
        s.close()


def test_server_refuses_a_served_interface_and_a_non_socket(tmp_path) -> None:
    loop = SelectorLoop()
    s = UapiServer("fzt2", FakeHost(), loop, socket_dir=str(tmp_path))
    try:
        with pytest.raises(LocalError, match="interface fzt2 is already served"):
            UapiServer("fzt2", FakeHost(), SelectorLoop(), socket_dir=str(tmp_path))
        assert os.path.exists(s.path)  # the live socket was left alone
    finally:
        s.close()
    (tmp_path / "fzt3.sock").write_text("not a socket")
    with pytest.raises(LocalError, match="not a socket"):
        UapiServer("fzt3", FakeHost(), loop, socket_dir=str(tmp_path))
    for bad in ("", "a/b", "..", "x" * 200):
        with pytest.raises(LocalError):
            UapiServer(bad, FakeHost(), loop, socket_dir=str(tmp_path))


def test_server_callback_errors_close_only_that_client(server_env) -> None:
    loop, h, start = server_env
    s = start()
    a, b = client(s.path), client(s.path)
    loop.run_until(lambda: s.client_count == 2)
    (ca, cb) = s._clients.values()
    ca.conn.feed = None  # type: ignore[assignment]  # any bug in handling a
    logging.getLogger("fzpoll.uapi.protocol").disabled = True
    try:
        a.send(b"get=1\n\n")
        loop.run_until(lambda: s.client_count == 1)
    finally:
        logging.getLogger("fzpoll.uapi.protocol").disabled = False
    b.send(b"get=1\n\n")
    assert recv_until(loop, b) == b"errno=0\n\n"


@pytest.mark.parametrize("line_of", [
    lambda k: f"endpoint={k.hex()}", lambda k: f"allowed_ip={k.hex()}", lambda k: k.hex(),
    lambda k: f"{k.hex()}=1", lambda k: f"persistent_keepalive_interval={k.base64()}",
    lambda k: f"bogus={k.base64()}",
])
def test_a_key_in_the_wrong_line_never_reaches_the_log(host: FakeHost, caplog, line_of) -> None:
    from fzpoll.jsonlog import JsonFormatter

    secret = key(11)
    with caplog.at_level(logging.DEBUG):
        c = conn_for(host)
        out = c.receive_data(f"set=1\npublic_key={PEER2}\n{line_of(secret)}\n\n".encode(), 0.0)
    assert out in (b"errno=-22\n\n", b"errno=-71\n\n")
    text = "\n".join(JsonFormatter().format(r) for r in caplog.records) + out.decode()
    assert caplog.records and "uapi set failed" in text
    for form in (secret.hex(), secret.base64(), secret.base64().rstrip("="), secret.hex()[:32]):
        assert form not in text
