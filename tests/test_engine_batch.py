"""The engine's batch entry points against one call per packet.

``send_batch`` and ``receive_batch`` do per-run work once (a keypair looked up once per receiver
index, a route once per destination, the timers of a run armed once); they must not change what
the engine does. Two engines built alike (the same keys and seeds) are driven through the same
steps, one with a call per packet (``send``/``receive``), the other with the batch entry points;
after every step their outputs, drops, events, timers, deadlines, peer counters and sessions must
be the same. The batches mix several peers (an initiator's session, a responder's unconfirmed
one, a peer with no session, one with no endpoint), unknown indices, replays, bad tags, expired
keys, keepalives, IPv6, in-tunnel control packets, refused sources and counters that cross
REKEY_AFTER_MESSAGES / REJECT_AFTER_MESSAGES mid-batch.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fzpoll.errors import DropReason as D
from fzpoll.wireguard.constants import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES
from fzpoll.wireguard.crypto import aead_decrypt, aead_encrypt
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.peer import Peer
from helpers import Clock, ip4, ip6, key

HUB = ("192.0.2.1", 51820)
REMOTE = [("192.0.2.11", 51820), ("192.0.2.12", 51820), ("192.0.2.13", 51821)]
LOCAL = "local-a"  # an opaque sticky source, as the IO shell passes it
_header = struct.Struct("<4sIQ").pack


def _deliver(engines: dict, addrs: dict, hold: set) -> None:
    """Hand every datagram over until quiet; those from an engine in ``hold`` are discarded."""
    moved = True
    while moved:
        moved = False
        for src, engine in engines.items():
            for data, endpoint, _ in engine.datagrams_to_send():
                moved = True
                if src not in hold:
                    engines[endpoint].receive(data, addrs[src], 0.0)


class World:
    """An engine ("hub") with four peers: 0 and 1 have sessions (hub initiated 0; 1 initiated,
    and the hub's keypair waits in ``next`` for its first transport packet), 2 has an endpoint but
    no session, 3 has no endpoint. Built the same way every time."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.rng = random.Random(5)
        self.hub = Engine(key(1), random_bytes=self.rng.randbytes, wall_time=self.clock.wall)
        remotes = [Engine(key(10 + i), random_bytes=random.Random(10 + i).randbytes,
                          wall_time=self.clock.wall) for i in range(3)]
        self.remotes = remotes
        self.peers: list[Peer] = []
        for i in range(4):
            peer = self.hub.add_peer(key(10 + i).public_key)
            self.hub.add_allowed_ip(peer, f"10.0.{i + 1}.0/24")
            self.hub.add_allowed_ip(peer, f"fd00::{i + 1}:0/112")
            if i < 3:
                self.hub.set_endpoint(peer, REMOTE[i])
                back = remotes[i].add_peer(self.hub.public_key)
                remotes[i].add_allowed_ip(back, "0.0.0.0/0")
                remotes[i].set_endpoint(back, HUB)
            self.peers.append(peer)
        engines = {HUB: self.hub, REMOTE[0]: remotes[0], REMOTE[1]: remotes[1]}
        addrs = {k: k for k in engines}
        self.hub.send(ip4("10.0.0.1", "10.0.1.1"), 0.0)  # the hub initiates with peer 0
        _deliver(engines, addrs, hold=set())
        remotes[1].send(ip4("10.0.2.1", "10.0.0.1"), 0.0)  # peer 1 initiates; its data is held
        (initiation, _, _), = remotes[1].datagrams_to_send()
        self.hub.receive(initiation, REMOTE[1], 0.0)
        _deliver(engines, addrs, hold={REMOTE[1]})
        self.hub.packets_for_tun()
        self.hub.take_events()
        assert self.peers[0].current is not None and self.peers[1].next is not None
        self.counters: dict[int, int] = {}  # next counter to use, by the hub's receiver index

    # ------------------------------------------------------------------ inputs

    def keypair(self, peer: int, which: str):
        p = self.peers[peer]
        return getattr(p, which) or p.current or p.next or p.previous

    def transport(self, kp, counter: int, plain: bytes) -> bytes:
        """A transport datagram as the peer would send it to the hub with ``kp``."""
        body = aead_encrypt(kp.recv_key, counter, plain, b"")
        return _header(b"\x04\x00\x00\x00", kp.local_index, counter) + body

    def datagram(self, spec: tuple) -> tuple[bytes, tuple, object]:
        kind, peer, which, inner, source = spec
        addr = REMOTE[peer % 3] if source != 2 else ("198.51.100.7", 4000)  # 2: the peer roamed
        local = LOCAL if source == 1 else None
        if kind == "handshake":  # a new initiation from peer 1 (its responder keypair is replaced)
            remote = self.remotes[1]
            back = remote.get_peer(self.hub.public_key)
            back.last_sent_handshake_at = float("-inf")
            remote.initiate_handshake(back, self.clock.now)
            (data, _, _), = remote.datagrams_to_send()
            return data, REMOTE[1], local
        if kind == "junk":
            return [b"\x01", b"\x04\x00\x00\x00" + bytes(20), b"\x09\x00\x00\x00" + bytes(40),
                    b"\x04\x00\x00\x00" + bytes(40)][peer], addr, local  # last: unknown index 0
        kp = self.keypair(peer % 2, "current" if which == "tampered" else which)
        if kp is None:
            return b"\x04\x00\x00\x00" + random.Random(peer).randbytes(40), addr, local
        n = self.counters.get(kp.local_index, 0)
        counter = {"next": n, "replay": max(n - 1, 0), "ahead": n + 3000, "old": 0}[kind]
        if kind in ("next", "ahead"):
            self.counters[kp.local_index] = counter + 1
        src = f"10.0.{peer % 2 + 1}.9"
        plain = [ip4(src, "10.0.0.1", b"x" * 30), ip6(f"fd00::{peer % 2 + 1}:9", "fd00::1"),
                 ip4("10.0.9.9", "10.0.0.1"), b"", b"\x45" + bytes(9),
                 ip6("::", "fd00::1")[:6] + b"\xff" + ip6("::", "fd00::1")[7:]][inner]
        data = self.transport(kp, counter, plain)
        if which == "tampered":
            data = data[:-1] + bytes([data[-1] ^ 1])
        return data, addr, local

    def packet(self, spec: tuple) -> bytes:
        peer, version, size = spec
        if peer == 4:  # no route, multicast, bad inner packets
            return [ip4("10.0.0.1", "10.9.9.9"), ip4("10.0.0.1", "224.0.0.251"),
                    ip6("fd00::1", "ff02::2"), b"", b"\x45\x00"][version]
        payload = bytes([size % 251]) * size
        if version % 2:
            return ip6("fd00::1", f"fd00::{peer + 1}:5", payload)
        return ip4("10.0.0.1", f"10.0.{peer + 1}.5", payload)


def snapshot(world: World) -> tuple:
    """What the hub handed out and everything it keeps that the data path touches."""
    hub = world.hub
    peers = []
    for p in world.peers:
        kps = tuple((kp.local_index, kp.send_counter, kp.replay.newest, tuple(kp.replay.blocks))
                    if kp else None for kp in (p.previous, p.current, p.next))
        peers.append((p.endpoint, p.local, kps, p.handshake_state, p.handshake_index, p.handshake_attempts,
                      p.sent_last_minute_handshake, p.rx_bytes, p.tx_bytes, tuple(p.staged),
                      p.retransmit_at, p.keepalive_at, p.new_handshake_at, p.zero_keys_at, p.persistent_at,
                      p.need_another_keepalive, p.last_handshake_wall))
    return (hub.datagrams_to_send(), hub.packets_for_tun(), hub.take_events(), hub.control_packets_received(),
            dict(hub.drops), hub.next_deadline(), hub.deadline_hint(), hub.timer_entries(),
            hub.staged_packet_count(), sorted(hub.live_indices()), hub.receive_counters(), peers,
            world.rng.getstate())


# ---------------------------------------------------------------------------------------------
# Steps: hypothesis draws them, both worlds run them (one per packet, one in batches)

PEERS = st.integers(0, 3)
DATAGRAM = st.tuples(
    st.sampled_from(["next"] * 6 + ["replay", "ahead", "old", "junk", "handshake"]),
    PEERS,
    st.sampled_from(["current"] * 4 + ["next", "previous", "tampered"]),
    st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5]),
    st.sampled_from([0, 0, 0, 1, 2]),
)
PACKET = st.tuples(st.integers(0, 4), st.integers(0, 4), st.sampled_from([20, 100, 1380, 1391]))
STEP = st.one_of(
    st.tuples(st.just("send"), st.lists(PACKET, max_size=40)),
    st.tuples(st.just("receive"), st.lists(DATAGRAM, max_size=40)),
    st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 5.0, 10.5, 26.0, 60.0, 121.0, 181.0])),
    st.tuples(st.just("limit"), st.tuples(st.sampled_from([REKEY_AFTER_MESSAGES, REJECT_AFTER_MESSAGES]),
                                          st.integers(0, 5))),
    st.tuples(st.just("keepalive"), st.sampled_from([0, 25])),
)


def run_step(world: World, step: tuple, inputs, batched: bool) -> list:
    """Run one step; the drop reasons it returned (a multiset: the order within a batch may
    differ) and the exceptions it raised."""
    hub, now = world.hub, world.clock.now
    kind, arg = step
    if kind == "advance":
        world.clock.now += arg
        hub.handle_timer(world.clock.now)
        return []
    if kind == "limit":  # the current keypair of peer 0 near a limit: crossed within the next batch
        limit, left = arg
        if world.peers[0].current is not None:
            world.peers[0].current.send_counter = limit - left
        return []
    if kind == "keepalive":
        hub.set_persistent_keepalive(world.peers[0], arg, now)
        return []
    if kind == "send":
        if batched:
            return sorted(hub.send_batch(inputs, now))
        return sorted(r for r in map(hub.send, inputs, [now] * len(inputs)) if r is not None)
    if batched:
        return sorted(hub.receive_batch(inputs, now))
    return sorted(r for d, a, loc in inputs if (r := hub.receive(d, a, now, loc)) is not None)


def drive(steps: list) -> Counter:
    """Both worlds through ``steps``, compared after each; the drops seen (for coverage checks)."""
    one, batch = World(), World()
    assert snapshot(one) == snapshot(batch)
    seen: Counter = Counter()
    for step in steps:
        inputs = None
        if step[0] == "send":
            inputs = [one.packet(s) for s in step[1]]
        elif step[0] == "receive":
            inputs = [one.datagram(s) for s in step[1]]
        drops = run_step(one, step, inputs, batched=False)
        assert run_step(batch, step, inputs, batched=True) == drops, step
        assert snapshot(one) == snapshot(batch), step
        seen.update(drops)
    return seen


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEP, min_size=1, max_size=7))
def test_batches_do_what_one_call_per_packet_does(steps):
    drive(steps)


def test_a_mixed_batch_covers_every_drop_and_matches(monkeypatch):
    """A fixed sequence that goes through every rule the batches hoist, checked like the property."""
    to = [(p, v, 1380) for p in range(4) for v in (0, 1)] + [(4, v, 0) for v in range(5)]
    ok, replay = ("next", 0, "current", 0, 0), ("replay", 0, "current", 0, 0)
    steps = [
        ("advance", 1.0),
        # peer 1 starts a new handshake between datagrams to its old responder keypair (forgotten)
        ("receive", [("next", 1, "tampered", 0, 0), ("handshake", 1, "next", 0, 0), ("next", 1, "next", 0, 0)]),
        ("send", to * 2),  # peer 2: staged and a handshake; peer 3: no endpoint; no route etc.
        ("receive", [ok, ok, ("next", 1, "next", 0, 0), ("next", 1, "next", 3, 1), replay,
                     ("next", 0, "tampered", 0, 0), *[("junk", i, "current", 0, 0) for i in range(4)],
                     ("next", 0, "current", 2, 0), ("next", 0, "current", 4, 0), ("next", 0, "current", 5, 0),
                     ("next", 0, "current", 1, 2), ok, ("ahead", 0, "current", 0, 0), ("old", 0, "current", 0, 0)]),
        ("keepalive", 25),
        ("advance", 5.5),  # past REKEY_TIMEOUT: the rekey below sends an initiation, mid-run
        ("limit", (REKEY_AFTER_MESSAGES, 2)),
        ("send", [(0, 0, 100)] * 6 + [(1, 1, 20)] * 3 + [(0, 1, 100)] * 2),
        ("limit", (REJECT_AFTER_MESSAGES, 3)),
        ("send", [(0, 0, 100)] * 6),
        ("advance", 10.5),
        ("advance", 181.0),
        ("receive", [ok, ok, ("next", 1, "current", 0, 0)]),
        ("send", to),
    ]
    seen = drive(steps)
    assert seen[D.UNKNOWN_INDEX] >= 2  # the junk index 0, and peer 1's forgotten keypair
    expected = {D.NO_ENDPOINT, D.NO_ROUTE, D.MULTICAST, D.BAD_INNER_PACKET, D.UNKNOWN_INDEX, D.REPLAYED,
                D.BAD_TAG, D.TOO_SHORT, D.BAD_LENGTH, D.BAD_TYPE, D.NOT_ALLOWED_SOURCE, D.KEY_EXPIRED}
    assert expected <= set(seen), expected - set(seen)


def test_the_rekey_initiation_goes_out_right_after_the_packet_that_crossed():
    for batched in (False, True):
        world = World()
        world.clock.now = 5.5  # past REKEY_TIMEOUT since the set-up's handshake
        world.peers[0].current.send_counter = REKEY_AFTER_MESSAGES - 3
        packets = [world.packet((0, 0, 100))] * 5
        run_step(world, ("send", None), packets, batched)
        kinds = [d[0] for d, *_ in world.hub.datagrams_to_send()]
        assert kinds == [4, 4, 4, 1, 4, 4], batched


def test_the_datagram_that_confirms_a_keypair_is_delivered_intact_with_what_waited():
    """Confirming a responder's keypair sends the packets staged for it (sealed in the engine's
    scratch buffer, where the confirming datagram was just opened): both arrive whole."""
    for batched in (False, True):
        world = World()
        staged = world.packet((1, 0, 1380))
        assert run_step(world, ("send", None), [staged], batched) == []
        assert world.hub.datagrams_to_send() == []  # it waits for the keypair's confirmation
        datagram = world.datagram(("next", 1, "next", 0, 0))
        assert run_step(world, ("receive", None), [datagram], batched) == []
        assert world.hub.packets_for_tun() == [ip4("10.0.2.9", "10.0.0.1", b"x" * 30)]
        (out, endpoint, _), = world.hub.datagrams_to_send()
        kp = world.peers[1].current
        assert endpoint == REMOTE[1] and kp.send_counter == 1
        plain = aead_decrypt(kp.send_key, 0, out[16:], b"")
        assert plain[:len(staged)] == staged


# ---------------------------------------------------------------------------------------------
# A bug on one packet costs that packet


def _flaky(monkeypatch, engine: object, name: str, fail_on: int) -> None:
    """Make ``engine.<name>`` raise on its ``fail_on``-th call (1-based)."""
    real = getattr(engine, name)
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == fail_on:
            raise RuntimeError("a bug on one packet")
        return real(*args)

    monkeypatch.setattr(engine, name, flaky)


@pytest.mark.parametrize("fail_on", [1, 3, 6])
def test_an_exception_in_send_batch_costs_only_its_packet(monkeypatch, fail_on):
    one, batch = World(), World()
    packets = [one.packet((0, 0, 100 + i)) for i in range(6)]
    _flaky(monkeypatch, one.hub, "_seal", fail_on)
    _flaky(monkeypatch, batch.hub, "_seal", fail_on)
    raised = 0
    for p in packets:
        try:
            one.hub.send(p, 0.0)
        except RuntimeError:
            raised += 1
    failures: list[Exception] = []
    assert batch.hub.send_batch(packets, 0.0, failures) == []
    assert raised == len(failures) == 1 and isinstance(failures[0], RuntimeError)
    expected = snapshot(one)
    assert len(expected[0]) == 5  # the other five were sent
    assert snapshot(batch) == expected
    monkeypatch.undo()
    _flaky(monkeypatch, batch.hub, "_seal", 1)
    with pytest.raises(RuntimeError):  # without a failures list, the bug is raised as before
        batch.hub.send_batch(packets[:2], 0.0)


@pytest.mark.parametrize("name", ["_open", "_deliver"])
@pytest.mark.parametrize("fail_on", [1, 2, 4])
def test_an_exception_in_receive_batch_costs_only_its_datagram(monkeypatch, name, fail_on):
    one, batch = World(), World()
    datagrams = [one.datagram(("next", 0, "current", 0, 0)) for _ in range(5)]
    datagrams.insert(3, one.datagram(("next", 1, "next", 0, 1)))  # confirms peer 1's keypair
    _flaky(monkeypatch, one.hub, name, fail_on)
    _flaky(monkeypatch, batch.hub, name, fail_on)
    raised = 0
    for d, a, loc in datagrams:
        try:
            one.hub.receive(d, a, 0.0, loc)
        except RuntimeError:
            raised += 1
    failures: list[Exception] = []
    drops = batch.hub.receive_batch(datagrams, 0.0, failures)
    assert raised == len(failures) == 1
    expected = snapshot(one)
    assert snapshot(batch) == expected
    assert len(expected[1]) == 5  # every other datagram delivered
    assert drops == []


def test_an_exception_while_routing_costs_only_its_packet(monkeypatch):
    world = World()
    packets = [world.packet((0, 0, 100)), world.packet((1, 0, 100)), world.packet((0, 0, 100))]
    _flaky(monkeypatch, world.hub._allowed_ips, "lookup_v4", 2)  # the packet for peer 1
    failures: list[Exception] = []
    assert world.hub.send_batch(packets, 0.0, failures) == []
    assert len(failures) == 1
    assert [endpoint for _, endpoint, _ in world.hub.datagrams_to_send()] == [REMOTE[0], REMOTE[0]]
