"""The in-tunnel control protocol (fzpoll.gateway.control): encode/decode and fuzzing."""

from __future__ import annotations

import json
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.gateway.control import (
    MAX_CONTROL_PACKET,
    AssignedIps,
    DomainStatus,
    Goodbye,
    NatStatus,
    decode,
    encode,
    is_control_packet,
    resource_id,
)

FUZZ = settings(max_examples=400, deadline=None, derandomize=True)
RID = resource_id("*.corp.test")
IPS = (ip_address("100.96.0.1"), ip_address("fd00:2021:1111:8000::1"))


def raw(kind: int, body: bytes, *, hop: int = 0) -> bytes:
    payload = bytes([kind]) + bytes(7) + body
    return bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + bytes([0xFF, hop]) + bytes(32) + payload


def test_wire_format_is_connlibs() -> None:
    packet = encode(DomainStatus(RID, "app.corp.test", NatStatus.ACTIVE))
    assert packet[0] >> 4 == 6 and packet[6] == 0xFF and packet[7] == 0
    assert packet[8:40] == bytes(32)
    assert int.from_bytes(packet[4:6], "big") == len(packet) - 40
    assert packet[40:48] == bytes([1]) + bytes(7)
    assert json.loads(packet[48:]) == {"resource": RID, "domain": "app.corp.test", "status": "Active"}


@pytest.mark.parametrize("event", [
    AssignedIps(RID, "app.corp.test", IPS),
    AssignedIps(RID, "app.corp.test", ()),
    DomainStatus(RID, "app.corp.test", NatStatus.ACTIVE),
    DomainStatus(RID, "db.internal.test", NatStatus.INACTIVE),
    Goodbye(),
])
def test_round_trip(event) -> None:
    packet = encode(event)
    assert is_control_packet(packet)
    assert decode(packet) == event


def test_resource_id_is_a_stable_uuid() -> None:
    assert resource_id("*.Corp.test") == RID != resource_id("*.other.test")
    assert len(RID) == 36


def test_unknown_status_reads_inactive() -> None:
    body = json.dumps({"resource": RID, "domain": "a.test", "status": "what_is_this"}).encode()
    assert decode(raw(1, body)) == DomainStatus(RID, "a.test", NatStatus.INACTIVE)


def test_domain_is_normalized() -> None:
    body = json.dumps({"resource": RID, "domain": "App.Corp.Test.", "proxy_ips": []}).encode()
    assert decode(raw(0, body)) == AssignedIps(RID, "app.corp.test", ())


def test_longest_name_and_eight_addresses_fit() -> None:
    name = ".".join(["a" * 63] * 3 + ["a" * 61])
    ips = tuple(ip_address(f"100.96.0.{i}") for i in range(4)) + tuple(
        ip_address(f"fd00:2021:1111:8000:ffff:ffff:ffff:{i:x}") for i in range(4))
    packet = encode(AssignedIps(RID, name, ips))
    assert len(packet) <= MAX_CONTROL_PACKET
    assert decode(packet) == AssignedIps(RID, name, ips)


@pytest.mark.parametrize("packet", [
    b"",
    raw(0, b"{}"),  # missing fields
    raw(0, b"not json"),
    raw(0, b"\xff\xfe"),
    raw(0, b"[1,2]"),
    raw(0, json.dumps({"resource": RID, "domain": "a.test", "proxy_ips": ["999.1.1.1"]}).encode()),
    raw(0, json.dumps({"resource": RID, "domain": "a.test", "proxy_ips": [5]}).encode()),
    raw(0, json.dumps({"resource": RID, "domain": "a..test", "proxy_ips": []}).encode()),
    raw(0, json.dumps({"resource": RID, "domain": "a.test", "proxy_ips": ["1.1.1.1"] * 17}).encode()),
    raw(1, json.dumps({"resource": RID, "domain": "a.test", "status": 1}).encode()),
    raw(1, json.dumps({"resource": "", "domain": "a.test", "status": "Active"}).encode()),
    raw(3, b"{}"),  # unknown event type
    raw(2, b"{}", hop=1),  # hop limit must be 0
    raw(2, b"") + b"trailing",  # payload length disagrees
    raw(0, b"[" * 2000)[:MAX_CONTROL_PACKET],  # truncated: lengths disagree
    raw(0, b"x" * 1300),  # too big
    raw(0, b"[" * 1000 + b"]" * 1000),  # deep nesting
])
def test_malformed_is_a_drop(packet: bytes) -> None:
    assert decode(packet) == D.CONTROL_MALFORMED


def test_encode_refuses_what_cannot_be_sent() -> None:
    with pytest.raises(LocalError):
        encode(AssignedIps(RID, "a..b", ()))
    with pytest.raises(LocalError):
        encode(AssignedIps(RID, "a.test", (ip_address("1.1.1.1"),) * 17))
    with pytest.raises(LocalError):
        encode("hello")  # type: ignore[arg-type]


def test_ordinary_packets_are_not_control() -> None:
    assert not is_control_packet(bytes([0x45]) + bytes(59))
    udp6 = bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + bytes(32) + bytes(8)
    assert not is_control_packet(udp6)
    v6_from_host = bytearray(raw(2, b""))
    v6_from_host[23] = 1  # source ::1
    assert not is_control_packet(v6_from_host)


@FUZZ
@given(st.binary(max_size=1400))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    result = decode(data)
    assert result == D.CONTROL_MALFORMED or isinstance(result, (AssignedIps, DomainStatus, Goodbye))


@FUZZ
@given(st.sampled_from([0, 1, 2, 3, 255]), st.dictionaries(
    st.sampled_from(["resource", "domain", "proxy_ips", "status", "x"]),
    st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.text(max_size=40), max_size=3)),
))
def test_fuzz_structured_bodies(kind: int, body: dict) -> None:
    result = decode(raw(kind, json.dumps(body).encode()))
    if result != D.CONTROL_MALFORMED:
        assert decode(encode(result)) == result  # whatever decodes re-encodes to itself


@FUZZ
@given(st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutations_of_a_valid_packet(position: int, value: int) -> None:
    packet = bytearray(encode(AssignedIps(RID, "app.corp.test", IPS)))
    position %= len(packet)
    packet[position] = value
    result = decode(packet)
    assert result == D.CONTROL_MALFORMED or isinstance(result, (AssignedIps, DomainStatus, Goodbye))


# ------------------------------------------------------------------------------- the engine's hook


def test_engine_hands_control_packets_out_and_never_to_tun(pair) -> None:
    from helpers import ip6

    p = pair
    p.handshake()
    packet = encode(AssignedIps(RID, "app.corp.test", IPS))
    assert p.a.send_to_peer(p.peer_b, packet, p.now) is None
    p.deliver()
    assert p.b.packets_for_tun() == []
    assert p.b.control_packets_received() == [(p.key_a.public_key, packet)]
    assert p.b.control_packets_received() == []
    # an ordinary IPv6 packet from :: (not control) is still checked against the allowed IPs
    p.a.send_to_peer(p.peer_b, ip6("::", "fd00::2"), p.now)
    p.deliver()
    assert p.b.packets_for_tun() == [] and p.b.drops[D.NOT_ALLOWED_SOURCE] == 1
    p.a.send(ip6("fd00::1", "fd00::2"), p.now)
    p.deliver()
    assert len(p.b.packets_for_tun()) == 1 and p.b.control_packets_received() == []


def test_engine_bounds_control_packets_nobody_takes(pair) -> None:
    from fzpoll.wireguard.constants import MAX_QUEUED_CONTROL_PACKETS

    p = pair
    p.handshake()
    packet = encode(Goodbye())
    for _ in range(MAX_QUEUED_CONTROL_PACKETS + 10):
        p.a.send_to_peer(p.peer_b, packet, p.now)
    p.deliver()
    assert len(p.b.control_packets_received()) == MAX_QUEUED_CONTROL_PACKETS
    assert p.b.drops[D.CONTROL_UNEXPECTED] == 10
