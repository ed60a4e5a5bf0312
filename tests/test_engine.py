"""The engine with a fake clock: handshake, data, timers, drops, roaming, cookies."""

from __future__ import annotations

import pytest

from fzpoll.wireguard.constants import (
    KEEPALIVE_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_STAGED_PACKETS,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER_TIME,
)
from fzpoll.errors import DropReason as D
from fzpoll.wireguard.keys import PrivateKey
from helpers import ADDR_A, ADDR_B, TUN_A, TUN_B, Pair, ip4, ip6


def kinds(datagrams):
    return [d[0] for d in datagrams]


def test_handshake_on_demand_then_data_both_ways_v4_and_v6(pair: Pair):
    p = pair
    first = ip4(TUN_A, TUN_B, b"first")
    assert p.a.send(first, p.now) is None
    assert kinds(d for d, *_ in p.out(p.a)) == [1]  # the packet is staged, an initiation goes out
    p.deliver()
    assert p.tun(p.b) == [first]
    p.tun(p.b).clear()
    back = ip6("fd00::2", "fd00::1", b"reply")
    assert p.b.send(back, p.now) is None
    p.deliver()
    assert p.tun(p.a) == [back]
    assert p.peer_b.last_handshake_wall == p.clock.wall()
    assert p.peer_a.rx_bytes > 0 and p.peer_b.tx_bytes > 0


def test_receive_counters_bound_what_a_session_still_accepts(pair: Pair):
    """receive_counters() gives each session's newest accepted counter: the kernel prefilter's
    safe floor is REPLAY_WINDOW_SIZE below it (anything lower the engine refuses as replayed)."""
    p = pair
    p.a.send(ip4(TUN_A, TUN_B, b"first"), p.now)
    p.deliver()
    (index,) = p.b.receive_counters()  # the confirmed session; the handshake index is gone
    assert p.b.receive_counters() == {index: 0} and index in p.b.live_indices()
    datagrams = []
    for i in range(3):
        p.a.send(ip4(TUN_A, TUN_B, bytes([i])), p.now)
        datagrams += p.take(p.a)
    for datagram in datagrams[1:]:
        assert p.b.receive(datagram, ADDR_A, p.now) is None
    assert p.b.receive_counters() == {index: 3}
    assert p.b.receive(datagrams[0], ADDR_A, p.now) is None  # reordered, not below the window
    assert p.b.receive(datagrams[0], ADDR_A, p.now) == D.REPLAYED
    assert p.b.receive_counters() == {index: 3}
    assert list(p.a.receive_counters().values()) == [-1]  # a has received nothing in its session yet


def test_responder_sends_only_after_key_confirmation(pair: Pair):
    p = pair
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    init = p.take(p.a)
    p.b.receive(init[0], ADDR_A, p.now)
    assert p.peer_a.current is None and p.peer_a.next is not None
    # b has something to say before confirmation: it is staged, not sent with the unconfirmed key
    p.b.send(ip4(TUN_B, TUN_A, b"early"), p.now)
    response = p.take(p.b)
    assert kinds(response) == [2]
    p.a.receive(response[0], ADDR_B, p.now)
    p.deliver()  # a's staged packet confirms the key; b then flushes "early"
    assert p.peer_a.current is not None and p.peer_a.next is None
    assert p.tun(p.a) == [ip4(TUN_B, TUN_A, b"early")]


def test_padding_to_multiple_of_16_and_keepalive_size(pair: Pair):
    p = pair
    p.handshake()
    p.a.send(ip4(TUN_A, TUN_B, b"x" * 5), p.now)  # 25 bytes -> padded to 32
    (datagram,) = p.take(p.a)
    assert len(datagram) == 16 + 32 + 16
    p.b.receive(datagram, ADDR_A, p.now)
    assert p.tun(p.b) == [ip4(TUN_A, TUN_B, b"x" * 5)]  # padding removed via the IP length


def test_retransmit_every_rekey_timeout_then_give_up(pair: Pair):
    p = pair
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    sent_at = [p.now] if p.take(p.a) else []
    while p.now < REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT:
        deadline = p.a.next_deadline()
        if deadline is None or deadline > REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT:
            break
        p.clock.now = deadline
        p.a.handle_timer(p.now)
        if any(d[0] == 1 for d in p.take(p.a)):
            sent_at.append(p.now)
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps), gaps
    assert len(sent_at) == 19  # the first try and 18 retries, the last at ~REKEY_ATTEMPT_TIME
    assert REKEY_ATTEMPT_TIME <= sent_at[-1] <= REKEY_ATTEMPT_TIME + 19 * REKEY_TIMEOUT_JITTER_MAX
    assert p.a.drops[D.HANDSHAKE_GAVE_UP] == 1  # the staged packet is dropped, counted
    assert not p.peer_b.staged and p.peer_b.retransmit_at is None


def test_keepalive_after_keepalive_timeout_when_nothing_to_send(pair: Pair):
    p = pair
    p.handshake()  # b received data at t=0 and sent nothing back (only the response)
    assert p.b.next_deadline() == pytest.approx(KEEPALIVE_TIMEOUT)
    p.advance(KEEPALIVE_TIMEOUT - 0.001)
    assert not p.out(p.b)
    p.advance(0.001)
    (keepalive,) = p.take(p.b)
    assert len(keepalive) == KEEPALIVE_SIZE
    p.a.receive(keepalive, ADDR_B, p.now)
    assert p.tun(p.a) == [] and not p.a.drops


def test_new_handshake_when_data_sent_but_nothing_received(pair: Pair):
    p = pair
    p.handshake()
    p.run_until(1.0)
    p.b.send(ip4(TUN_B, TUN_A), p.now)  # something received cancels a's pending timer
    p.deliver()
    p.advance(1.0)
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    p.take(p.a)  # b never hears it and never answers
    start = p.now
    while not any(d[0] == 1 for d, *_ in p.out(p.a)):
        p.clock.now = p.a.next_deadline()
        p.a.handle_timer(p.now)
    waited = p.now - start
    assert KEEPALIVE_TIMEOUT + REKEY_TIMEOUT <= waited <= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX


def test_rekey_after_time_by_initiator_and_no_packet_lost(pair: Pair):
    p = pair
    p.handshake()
    first_kp = p.peer_b.current
    delivered = []
    t = 0.0
    n = 0
    while t < REKEY_AFTER_TIME + 30:
        t += 0.5
        p.run_until(t)
        n += 1
        pkt = ip4(TUN_A, TUN_B, b"seq%d" % n)
        p.a.send(pkt, p.now)
        p.b.send(ip4(TUN_B, TUN_A, b"ack%d" % n), p.now)
        p.deliver()
        delivered.extend(p.tun(p.b))
        p.tun(p.b).clear()
        p.tun(p.a).clear()
    assert p.peer_b.current is not first_kp  # rotated
    assert p.peer_b.previous is first_kp or p.peer_b.previous is not None
    assert [x[20:] for x in delivered] == [b"seq%d" % i for i in range(1, n + 1)]
    initiations = [direction for direction, d in p.wire if d[0] == 1]
    assert initiations.count("a->b") >= 2  # the first handshake and the rekey


def test_session_expires_after_reject_after_time(pair: Pair):
    p = pair
    p.handshake()
    old = p.peer_b.current
    p.run_until(REJECT_AFTER_TIME + 1)
    assert p.peer_b.current is old  # nothing was sent meanwhile: no rekey happened
    # a normal send after expiry stages the packet and starts a new handshake
    p.a.send(ip4(TUN_A, TUN_B, b"after"), p.now)
    assert kinds(d for d, *_ in p.out(p.a)) == [1] and len(p.peer_b.staged) == 1
    initiation = p.take(p.a)
    # a packet made with the expired keypair is refused by b
    p.a._encrypt_run(p.peer_b, old, [ip4(TUN_A, TUN_B)], p.now)
    assert p.b.receive(p.take(p.a)[0], ADDR_A, p.now) == D.KEY_EXPIRED
    p.b.receive(initiation[0], ADDR_A, p.now)
    p.deliver()
    assert p.tun(p.b) == [ip4(TUN_A, TUN_B, b"after")]


def test_keys_zeroed_after_three_times_reject_after_time(pair: Pair):
    p = pair
    p.handshake()
    p.run_until(ZERO_KEYS_AFTER_TIME - 1)
    assert p.peer_b.current is not None
    p.run_until(ZERO_KEYS_AFTER_TIME + 1)
    assert p.peer_b.keypairs() == [] and p.peer_a.keypairs() == []
    assert p.a.live_indices() == frozenset() and p.b.live_indices() == frozenset()
    assert p.a.next_deadline() is None and p.b.next_deadline() is None  # idle: no more wakeups


def test_persistent_keepalive(pair: Pair):
    p = pair
    p.handshake()
    p.run_until(20)
    p.a.set_persistent_keepalive(p.peer_b, 25, p.now)
    (first,) = p.take(p.a)  # turning it on sends one at once
    assert len(first) == KEEPALIVE_SIZE
    p.b.receive(first, ADDR_A, p.now)
    p.advance(25)
    sent = p.take(p.a)
    assert [len(d) for d in sent] == [KEEPALIVE_SIZE]


def test_staged_queue_is_bounded(pair: Pair):
    p = pair
    reasons = [p.a.send(ip4(TUN_A, TUN_B, b"%d" % i), p.now) for i in range(MAX_STAGED_PACKETS + 3)]
    assert reasons.count(D.STAGED_QUEUE_FULL) == 3
    assert len(p.peer_b.staged) == MAX_STAGED_PACKETS
    p.deliver()
    assert len(p.tun(p.b)) == MAX_STAGED_PACKETS  # the newest survive, in order
    assert p.tun(p.b)[-1] == ip4(TUN_A, TUN_B, b"%d" % (MAX_STAGED_PACKETS + 2))


def test_roaming_follows_latest_authenticated_packet(pair: Pair):
    p = pair
    p.handshake()
    p.b.send(ip4(TUN_B, TUN_A), p.now)
    (datagram,) = p.take(p.b)
    new_addr = ("192.0.2.99", 40000)
    p.a.receive(datagram, new_addr, p.now)
    assert p.peer_b.endpoint == new_addr
    # a forged datagram from elsewhere does not move it
    assert p.a.receive(datagram[:-1] + bytes([datagram[-1] ^ 1]), ("192.0.2.66", 1), p.now) is not None
    assert p.peer_b.endpoint == new_addr


def test_psk_mismatch_fails_and_psk_match_works():
    good = Pair(psk=b"k" * 32)
    good.handshake()
    bad = Pair(psk=b"k" * 32)
    from fzpoll.wireguard.keys import PresharedKey

    bad.b.set_preshared_key(bad.peer_a, PresharedKey(b"j" * 32))
    bad.a.send(ip4(TUN_A, TUN_B), bad.now)
    bad.deliver()
    assert bad.a.drops[D.BAD_HANDSHAKE] == 1 and not bad.tun(bad.b)


def test_under_load_cookie_reply_then_mac2_accepted(pair: Pair):
    p = pair
    p.b.assume_under_load(1e9)  # as if a flood had just been seen
    p.a.send(ip4(TUN_A, TUN_B), p.now)
    (init,) = p.take(p.a)
    assert p.b.receive(init, ADDR_A, p.now) == D.BAD_MAC2
    (cookie_reply,) = p.take(p.b)
    assert cookie_reply[0] == 3 and len(cookie_reply) == 64
    assert p.a.receive(cookie_reply, ADDR_B, p.now) is None
    p.run_until(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)  # the retry carries MAC2
    assert p.tun(p.b) == [ip4(TUN_A, TUN_B)]


def test_flood_turns_on_under_load_and_rate_limits_per_source(pair: Pair):
    p = pair
    attacker = PrivateKey.generate(lambda n: b"\x07" * n)
    from fzpoll.wireguard.engine import Engine

    evil = Engine(attacker, random_bytes=__import__("random").Random(5).randbytes, wall_time=p.clock.wall)
    target = evil.add_peer(p.key_b.public_key)
    evil.set_endpoint(target, ADDR_B)
    results = []
    for i in range(40):
        evil.initiate_handshake(target, p.now + 10 * i)
        ((msg, _, _),) = evil.datagrams_to_send()
        results.append(p.b.receive(msg, ("192.0.2.50", 1000 + i), p.now + 0.001 * i))
    assert results[0] == D.UNKNOWN_PEER  # valid MAC1, unknown static key
    assert p.b.is_under_load(p.now + 0.05)
    assert D.BAD_MAC2 in results  # answered with cookie replies instead of DH work


def test_repr_never_shows_keys():
    p = Pair(psk=b"s" * 32)
    p.handshake()
    texts = [repr(p.key_a), str(p.key_a), repr(p.peer_b), repr(p.peer_b.current), repr(p.peer_b.preshared_key),
             repr(p.a.private_key)]
    secrets = [p.key_a.hex(), p.key_a.base64(), p.peer_b.current.send_key.hex(), (b"s" * 32).hex()]
    for t in texts:
        for s in secrets:
            assert s not in t


def test_timer_heap_stays_small_under_traffic(pair: Pair):
    """Re-arming timers per packet must not grow the heap (a regression: it once did)."""
    p = pair
    p.handshake()
    for _ in range(2000):
        p.a.send(ip4(TUN_A, TUN_B), p.now)
        p.a.next_deadline()
        p.deliver()
        p.b.send(ip4(TUN_B, TUN_A), p.now)
        p.b.next_deadline()
        p.deliver()
        p.advance(0.001)
    assert p.a.timer_entries() <= 10 and p.b.timer_entries() <= 10


def test_an_engine_has_fewer_than_30_attributes(pair: Pair):
    """CPython 3.11's fast attribute lookups (shared-key inline values) stop at 30 attributes of
    an instance: the 30th cost the data path 1,100 instructions per round trip (see _ON_TIMER)."""
    assert len(vars(pair.a)) < 30
