"""Every drop reason of the engine: counted, returned, and no state changed."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fzpoll.wireguard.constants import (
    HANDSHAKE_INITIATION_RATE,
    MAX_STAGED_PACKETS,
    MAX_STAGED_PACKETS_TOTAL,
    MAX_TIMER_HANDSHAKES,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
)
from fzpoll.wireguard.engine import Engine
from fzpoll.errors import DropReason as D
from fzpoll.wireguard.keys import PrivateKey, PublicKey
from helpers import ADDR_A, ADDR_B, TUN_A, TUN_B, Pair, established, ip4, ip6


def snapshot(engine: Engine):
    peers = []
    for peer in engine.peers.values():
        kps = tuple(
            (kp.local_index, kp.send_counter, kp.replay.newest, tuple(kp.replay.blocks)) if kp else None
            for kp in (peer.previous, peer.current, peer.next)
        )
        peers.append((
            peer.endpoint, kps, peer.last_timestamp, peer.last_initiation_at, peer.handshake_state,
            peer.handshake_index, peer.rx_bytes, peer.tx_bytes, tuple(peer.staged),
            peer.retransmit_at, peer.keepalive_at, peer.new_handshake_at, peer.zero_keys_at,
        ))
    # Then what the engine handed out since the last snapshot: after a drop, nothing.
    return (sorted(engine.live_indices()), peers), (engine.packets_for_tun(), engine.take_events())


def transport_from_a(p: Pair, packet: bytes) -> bytes:
    p.a.send(packet, p.now)
    return p.take(p.a)[0]


def fresh_initiation(p: Pair) -> bytes:
    p.peer_b.last_sent_handshake_at = float("-inf")
    p.a.initiate_handshake(p.peer_b, p.now)
    return p.take(p.a)[0]


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:]


def case_too_short(p):
    return b"\x04\x00", D.TOO_SHORT


def case_bad_type(p):
    return b"\x09\x00\x00\x00" + bytes(40), D.BAD_TYPE


def case_reserved_not_zero(p):
    return b"\x04\x01\x00\x00" + bytes(40), D.BAD_TYPE


def case_bad_length_initiation(p):
    return fresh_initiation(p)[:-1], D.BAD_LENGTH


def case_bad_length_transport(p):
    return transport_from_a(p, ip4(TUN_A, TUN_B))[:20], D.BAD_LENGTH


def case_bad_mac1(p):
    return flip(fresh_initiation(p), 120), D.BAD_MAC1


def case_bad_handshake(p):
    init = fresh_initiation(p)
    body = flip(init, 50)[:116]  # corrupt the encrypted static, then re-MAC so MAC1 passes
    return p.peer_b.cookies.add_macs(body, p.now), D.BAD_HANDSHAKE


def case_low_order_ephemeral(p):
    init = fresh_initiation(p)
    body = init[:8] + bytes(32) + init[40:116]
    return p.peer_b.cookies.add_macs(body, p.now), D.BAD_HANDSHAKE


def case_unknown_peer(p):
    stranger = PrivateKey.generate(random.Random(9).randbytes)
    evil = Engine(stranger, random_bytes=random.Random(10).randbytes, wall_time=p.clock.wall)
    peer = evil.add_peer(p.key_b.public_key)
    evil.set_endpoint(peer, ADDR_B)
    evil.initiate_handshake(peer, p.now)
    return evil.datagrams_to_send()[0][0], D.UNKNOWN_PEER


def case_replayed_initiation(p):
    return p.wire[0][1], D.REPLAYED_HANDSHAKE  # the very first initiation, seen already


def case_handshake_flood(p):
    p.clock.now += 1.0
    p.b.receive(fresh_initiation(p), ADDR_A, p.now)
    p.deliver()
    # 5 ms later by the monotonic clock, but a newer TAI64N (so only the 20 ms rule applies)
    p.clock.now += HANDSHAKE_INITIATION_RATE / 4
    wall = p.clock.wall
    p.a.wall_time = lambda: wall() + 1.0
    return fresh_initiation(p), D.HANDSHAKE_FLOOD


def case_unexpected_response(p):
    p.peer_a.last_sent_handshake_at = float("-inf")
    p.b.initiate_handshake(p.peer_a, p.now)
    p.a.receive(p.take(p.b)[0], ADDR_B, p.now)
    response = p.take(p.a)[0]
    assert p.b.receive(response, ADDR_A, p.now) is None
    return response, D.UNEXPECTED_RESPONSE  # the same response again


def case_unknown_index(p):
    data = transport_from_a(p, ip4(TUN_A, TUN_B))
    return data[:4] + b"\xde\xad\xbe\xef" + data[8:], D.UNKNOWN_INDEX


def case_bad_tag(p):
    return flip(transport_from_a(p, ip4(TUN_A, TUN_B)), 30), D.BAD_TAG


def case_replayed_transport(p):
    data = transport_from_a(p, ip4(TUN_A, TUN_B))
    assert p.b.receive(data, ADDR_A, p.now) is None
    p.tun(p.b).clear()
    return data, D.REPLAYED


def authentic_not_allowed_source(p):
    return transport_from_a(p, ip4("10.9.9.9", TUN_B)), D.NOT_ALLOWED_SOURCE


def authentic_bad_inner_packet(p):
    kp = p.peer_b.current
    p.a._encrypt_run(p.peer_b, kp, [b"\x45" + bytes(10)], p.now)  # too short for an IPv4 header
    return p.take(p.a)[0], D.BAD_INNER_PACKET


def case_bad_cookie(p):
    p.peer_a.last_sent_handshake_at = float("-inf")
    p.b.initiate_handshake(p.peer_a, p.now)
    init = p.take(p.b)[0]
    return b"\x03\x00\x00\x00" + init[4:8] + bytes(56), D.BAD_COOKIE


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[5:])
def test_invalid_datagram_is_dropped_counted_and_changes_nothing(case):
    p = established()
    data, reason = case(p)
    p.tun(p.b).clear()
    p.out(p.b).clear()
    before, _ = snapshot(p.b)
    drops_before = p.b.drops[reason]
    assert p.b.receive(data, ADDR_A, p.now) == reason
    assert p.b.drops[reason] == drops_before + 1
    assert snapshot(p.b) == (before, ([], []))
    assert p.out(p.b) == []


ADDR_ROAMED = ("198.51.100.7", 40000)


@pytest.mark.parametrize("case", [authentic_not_allowed_source, authentic_bad_inner_packet],
                         ids=lambda c: c.__name__[10:])
def test_authentic_packet_refused_by_routing_still_roams_and_counts(case):
    """Cryptokey routing refuses the inner packet, but the datagram authenticated: as in the
    kernel and wireguard-go, the endpoint follows it, its counter is used up and it counts."""
    p = established()
    data, reason = case(p)
    p.tun(p.b).clear()
    rx = p.peer_a.rx_bytes
    assert p.b.receive(data, ADDR_ROAMED, p.now) == reason
    assert p.b.drops[reason] == 1
    assert p.tun(p.b) == []  # not delivered
    assert p.peer_a.endpoint == ADDR_ROAMED  # roamed
    assert p.peer_a.rx_bytes == rx + len(data)
    assert p.b.receive(data, ADDR_A, p.now) == D.REPLAYED  # the counter is spent
    assert p.peer_a.endpoint == ADDR_ROAMED  # and a replay moves nothing


def test_outgoing_drop_reasons(pair: Pair):
    p = pair
    assert p.a.send(b"", p.now) == D.BAD_INNER_PACKET
    assert p.a.send(b"\x70" + bytes(40), p.now) == D.BAD_INNER_PACKET
    assert p.a.send(ip4(TUN_A, "10.77.0.1"), p.now) == D.NO_ROUTE
    assert p.a.send(ip6("fd00::1", "fd00::99"), p.now) == D.NO_ROUTE
    assert p.a.send(ip6("fe80::1", "ff02::2"), p.now) == D.MULTICAST  # a router solicitation
    p.a.set_endpoint(p.peer_b, None)
    assert p.a.send(ip4(TUN_A, TUN_B), p.now) == D.NO_ENDPOINT
    assert p.a.drops == {D.BAD_INNER_PACKET: 2, D.NO_ROUTE: 2, D.MULTICAST: 1, D.NO_ENDPOINT: 1}


def test_no_private_key_drops_handshakes(pair: Pair):
    p = pair
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    (init,) = p.take(p.a)
    p.b.set_private_key(None)
    assert p.b.receive(init, ADDR_A, p.now) == D.NO_PRIVATE_KEY


def test_rate_limited_per_source_under_load(pair: Pair):
    p = pair
    p.b.assume_under_load(1e9)
    results = []
    for i in range(12):
        p.clock.now += 0.021  # beyond the per-peer 20 ms rule
        init = fresh_initiation(p)
        p.b.receive(init, ADDR_A, p.now)  # first: cookie reply
        if p.out(p.b):
            p.a.receive(p.take(p.b)[0], ADDR_B, p.now)
        results.append(p.b.receive(fresh_initiation(p), ADDR_A, p.now))
        p.out(p.b).clear()
    assert D.RATE_LIMITED in results
    assert results[0] is None


def test_handshake_gave_up_counts_staged_packets(pair: Pair):
    p = pair
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    for _ in range(MAX_TIMER_HANDSHAKES + 2):
        p.clock.now = p.a.next_deadline() or p.now
        p.a.handle_timer(p.now)
    assert p.a.drops[D.HANDSHAKE_GAVE_UP] == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([1, 2, 3, 4]))
def test_arbitrary_datagrams_never_raise_nor_change_state(blob, kind):
    p = established()
    before, _ = snapshot(p.b)
    data = bytes([kind, 0, 0, 0]) + blob
    reason = p.b.receive(data, ADDR_A, p.now)
    assert reason is not None
    assert snapshot(p.b) == (before, ([], []))
    assert sum(p.b.drops.values()) == 1


def _silent_peers(engine, count: int) -> list[str]:
    """``count`` peers with endpoints that never answer; returns an address routed to each."""
    rng = random.Random(7)
    addresses = []
    for i in range(count):
        peer = engine.add_peer(PrivateKey.generate(rng.randbytes).public_key)
        address = f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}"
        engine.add_allowed_ip(peer, f"{address}/32")
        engine.set_endpoint(peer, ("192.0.2.9", 1000 + i))
        addresses.append(address)
    return addresses


def test_one_global_bound_on_staged_packets():
    """Per peer, the oldest staged packet gives way; over all peers, new packets are dropped
    once MAX_STAGED_PACKETS_TOTAL wait; both counted. Removing peers gives the budget back."""
    p = Pair()
    silent = _silent_peers(p.a, 2 * MAX_STAGED_PACKETS_TOTAL // MAX_STAGED_PACKETS)
    for address in silent:
        for _ in range(MAX_STAGED_PACKETS + 3):
            p.a.send(ip4(TUN_A, address), p.now)
    half = len(silent) // 2
    assert p.a.staged_packet_count() == MAX_STAGED_PACKETS_TOTAL
    assert p.a.bounds()["staged_packets"] == {"used": MAX_STAGED_PACKETS_TOTAL, "limit": MAX_STAGED_PACKETS_TOTAL}
    assert p.a.drops[D.STAGED_QUEUE_FULL] == 3 * half  # the first half each filled its own queue
    assert p.a.drops[D.STAGED_TOTAL_FULL] == (MAX_STAGED_PACKETS + 3) * half  # the rest found none
    assert p.a.staged_packet_count() == sum(len(peer.staged) for peer in p.a.peers.values())
    for key in list(p.a.peers)[:4]:
        p.a.remove_peer(PublicKey(key))
    assert p.a.staged_packet_count() == sum(len(peer.staged) for peer in p.a.peers.values())
    assert p.a.staged_packet_count() < MAX_STAGED_PACKETS_TOTAL


def test_staged_budget_comes_back_when_handshakes_give_up_or_complete():
    p = Pair()
    silent = _silent_peers(p.a, 3)
    for address in [*silent, TUN_B]:
        p.a.send(ip4(TUN_A, address), p.now)
    assert p.a.staged_packet_count() == 4
    p.deliver()  # b answers: its packet is sent, the silent ones still wait
    assert p.a.staged_packet_count() == 3
    while p.now < REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT:  # every silent handshake gives up
        p.clock.now = p.a.next_deadline() or p.now + 1.0
        p.a.handle_timer(p.now)
        p.out(p.a).clear()
    assert p.a.staged_packet_count() == 0 and p.a.drops[D.HANDSHAKE_GAVE_UP] == 3
