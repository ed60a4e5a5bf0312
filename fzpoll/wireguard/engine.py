"""The WireGuard protocol engine: sans-IO, driven by datagrams, packets and ``now``.

Inputs (as aioquic's connection): :meth:`Engine.receive` (a UDP datagram and its source
address), :meth:`Engine.send` (an IP packet read from the TUN device), both also by the batch
(:meth:`Engine.receive_batch`, :meth:`Engine.send_batch`: the one implementation, which does
per-run work once), :meth:`Engine.handle_timer`, and the configuration methods. Outputs are
handed over once: :meth:`datagrams_to_send`, :meth:`packets_for_tun`, :meth:`take_events`;
:meth:`next_deadline` says when to call :meth:`handle_timer` next. Time is always the ``now``
argument (monotonic seconds); wall-clock time (TAI64N) and randomness are injected at construction.

Remote input never raises: an invalid datagram is dropped and its :class:`DropReason` counted and
returned. A datagram that fails authentication (unknown index, bad tag, replay, expired key, bad
MAC) changes no state; one that authenticates counts for the session, the endpoint (roaming) and
the timers even when cryptokey routing then refuses its inner packet, as in the kernel and
wireguard-go. Timers follow wireguard-go's timers.go (whitepaper section 6); the parts live in
:mod:`.handshaking` (the handshake half of this class), :mod:`.session` (keypairs and indices),
:mod:`.timers` (the heap, and what each timer does), :mod:`.handshake` (messages, cookies and
rate limits under load) and :mod:`.allowedips` (cryptokey routing).
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from types import MappingProxyType
from typing import Callable, Iterable, Iterator, Mapping

from fzpoll.wireguard import handshake
from fzpoll.wireguard.allowedips import AllowedIPs, Network
from fzpoll.wireguard.constants import (
    AEAD_TAG_SIZE,
    DEFAULT_MTU,
    FZ_P2P_CONTROL_NEXT_HEADER,
    KEEPALIVE_SIZE,
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_CONTROL_PACKETS,
    MESSAGE_HANDSHAKE_COOKIE,
    MESSAGE_HANDSHAKE_INITIATION,
    MESSAGE_HANDSHAKE_RESPONSE,
    MESSAGE_TRANSPORT_DATA,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_TIMEOUT,
)
from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from fzpoll.wireguard.peer import Event
from fzpoll.wireguard.handshake import LoadGuard
from fzpoll.wireguard.handshaking import HandshakeDriver
from fzpoll.wireguard.peer import Endpoint, Local, Peer, StagedBudget
from fzpoll.wireguard.session import Keypair, Sessions
from fzpoll.wireguard.sodium import Backend, choose
from fzpoll.wireguard.timers import PeerTimer, TimerDriver, TimerHeap

from nacl._sodium import ffi as _ffi

# Transport AEAD: libsodium straight through cffi (the fastest one found: :mod:`.sodium`), not
# nacl.bindings, whose wrapper checks each argument in Python and allocates a fresh output per call
# -- more than the ChaCha20-Poly1305 of a 1420-byte packet costs. Our keys and nonces always have
# the right sizes; each engine seals into and opens from one scratch buffer of its own (grown if a
# bigger packet ever comes).
_NULL = _ffi.NULL
_OVERHEAD = 16 + AEAD_TAG_SIZE  # transport header + tag
# Transport header (5.4.6): type and reserved (4 bytes), receiver index (u32le), counter (u64le);
# the AEAD nonce is 4 zero bytes and the counter.
_pack_header = struct.Struct("<8sQ").pack_into  # our remote-index header, then the counter
_unpack_header = struct.Struct("<IIQ").unpack_from  # type and reserved as one u32le, receiver index, counter
_pack_nonce = struct.Struct("<4xQ").pack
_PADDING = bytes(16)
_TRANSPORT_TYPE = bytes([MESSAGE_TRANSPORT_DATA, 0, 0, 0])  # type and reserved of a transport message
_TRANSPORT_WORD = MESSAGE_TRANSPORT_DATA  # the same, read as a u32le
_KEEPALIVE = PeerTimer.SEND_KEEPALIVE
_NEW_HANDSHAKE = PeerTimer.NEW_HANDSHAKE
_PERSISTENT = PeerTimer.PERSISTENT_KEEPALIVE
_UNSPECIFIED_V6 = bytes(16)
_REKEY_COUNTER = REKEY_AFTER_MESSAGES - 1  # the counter whose packet starts a rekey


def _is_control(plain: bytes) -> bool:
    """An in-tunnel control packet: IPv6, next header 0xFF, source :: (fzpoll.gateway.control)."""
    return plain[0] >> 4 == 6 and plain[6] == FZ_P2P_CONTROL_NEXT_HEADER and plain[8:24] == _UNSPECIFIED_V6


def _room(kp: Keypair | None, now: float, want: int) -> int:
    """How many of ``want`` more packets ``kp`` may encrypt at ``now``: none without a keypair, or
    once it has reached REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES (whitepaper 6.2)."""
    if kp is None or now - kp.created_at >= REJECT_AFTER_TIME:
        return 0
    if kp.send_counter + want <= REJECT_AFTER_MESSAGES:
        return want  # (the usual case, without a big-int subtraction)
    return max(REJECT_AFTER_MESSAGES - kp.send_counter, 0)


class Engine(HandshakeDriver, TimerDriver):
    """One WireGuard interface's protocol state: our static key, peers, sessions and timers."""

    def __init__(
        self,
        private_key: PrivateKey | None = None,
        *,
        random_bytes: Callable[[int], bytes],
        wall_time: Callable[[], float],
        mtu: int = DEFAULT_MTU,
        aead: Backend | None = None,
    ) -> None:
        self.random_bytes = random_bytes
        self.aead = aead or choose()  # which libsodium seals and opens transport data
        self._seal, self._open = self.aead.seal, self.aead.open
        self._jitter_rng = random.Random(random_bytes(16))
        self.wall_time = wall_time
        self.mtu = mtu
        self._peers: dict[bytes, Peer] = {}
        self.peers: Mapping[bytes, Peer] = MappingProxyType(self._peers)  # read-only view, by raw key
        self._allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self._out: list[tuple[bytes, Endpoint, Local]] = []
        self._to_tun: list[bytes] = []
        self._events: list[Event] = []
        self._drops: Counter[str] = Counter()
        self.drops: Mapping[str, int] = MappingProxyType(self._drops)  # read-only view, 0 if never
        # Receiver indices (5.4.2): ours in sessions, and ours in handshakes we initiated.
        self._sessions = Sessions(random_bytes)
        self._keypairs = self._sessions.keypairs  # the transport path's one dict probe
        self._timers = TimerHeap()
        self._load = LoadGuard()
        self._control: list[tuple[PublicKey, bytes]] = []  # in-tunnel control packets (never to TUN)
        self._staged = StagedBudget()  # one bound on staged packets over every peer
        self._private: bytes | None = None
        self._public: bytes = b""
        self._cookies: handshake.CookieChecker | None = None
        self._grow_scratch(65536 + _OVERHEAD)
        self._handlers = {
            MESSAGE_HANDSHAKE_INITIATION: self._on_initiation,
            MESSAGE_HANDSHAKE_RESPONSE: self._on_response,
            MESSAGE_HANDSHAKE_COOKIE: self._on_cookie_reply,
        }
        self.set_private_key(private_key)

    # ------------------------------------------------------------------ configuration

    @property
    def private_key(self) -> PrivateKey | None:
        return None if self._private is None else PrivateKey(self._private)

    @property
    def public_key(self) -> PublicKey | None:
        return None if self._private is None else PublicKey(self._public)

    def set_private_key(self, key: PrivateKey | None) -> None:
        """Set (or clear) our static key; every session and handshake in progress is dropped."""
        if key is not None and self._private == key.raw:
            return
        for peer in self._peers.values():
            self._clear_sessions(peer)
        if key is None or key.is_zero():
            self._private, self._public, self._cookies = None, b"", None
            return
        self._private = key.raw
        self._public = key.public_key.raw
        self._cookies = handshake.CookieChecker(self._public, self.random_bytes)
        # A peer with our own public key makes no sense (wireguard-go removes it too).
        if self._public in self._peers:
            self.remove_peer(PublicKey(self._public))

    def get_peer(self, public_key: PublicKey) -> Peer | None:
        return self._peers.get(public_key.raw)

    def add_peer(self, public_key: PublicKey) -> Peer:
        """The peer with this key, created if new."""
        peer = self._peers.get(public_key.raw)
        if peer is None:
            if public_key.raw == self._public:
                raise LocalError("a peer cannot have the interface's own public key")
            peer = self._peers[public_key.raw] = Peer(public_key, self._staged)
        return peer

    def remove_peer(self, public_key: PublicKey) -> None:
        peer = self._peers.pop(public_key.raw, None)
        if peer is None:
            return
        self._clear_sessions(peer)
        self._allowed_ips.remove_value(peer)
        peer.removed = True

    def remove_all_peers(self) -> None:
        for peer in list(self._peers.values()):
            self.remove_peer(peer.public_key)

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float) -> None:
        """Set the interval (0 = off); turning it on sends a keepalive at once, as wireguard-go."""
        was_off = peer.persistent_keepalive_interval == 0
        peer.persistent_keepalive_interval = interval
        if interval == 0:
            peer.persistent_at = None
        elif was_off and self._private is not None and peer.endpoint is not None:
            self._send_keepalive(peer, now)

    def set_preshared_key(self, peer: Peer, key: PresharedKey) -> None:
        """Mixed into the peer's next handshakes (whitepaper 5.4.2, the psk of IKpsk2)."""
        peer.preshared_key = key

    def set_mtu(self, mtu: int) -> None:
        """The interface's MTU changed (``ip link set mtu``): padding is capped at it from now on."""
        self.mtu = mtu

    def set_endpoint(self, peer: Peer, endpoint: Endpoint | None) -> None:
        """Where to send to ``peer`` until an authenticated packet from elsewhere moves it (from
        the source address the kernel picks: the sticky one is forgotten)."""
        peer.endpoint = endpoint
        peer.local = None

    def forget_local(self, local: Local = None) -> None:
        """The IO shell could not send from ``local`` (the address has gone): every peer sticky
        to it sends from the kernel's choice until its next authenticated packet. Without
        ``local``, every peer's (new sockets or fwmark, as the kernel and wireguard-go do)."""
        for peer in self._peers.values():
            if local is None or peer.local == local:
                peer.local = None

    # ------------------------------------------------------------------ cryptokey routing

    def add_allowed_ip(self, peer: Peer, network: Network | str) -> None:
        """Route ``network`` to ``peer`` (taking it from any other peer), and accept it as a
        source from ``peer``."""
        self._allowed_ips.insert(network, peer)

    def remove_allowed_ip(self, network: Network | str) -> None:
        self._allowed_ips.remove(network)

    def clear_allowed_ips(self, peer: Peer) -> None:
        self._allowed_ips.remove_value(peer)

    def add_allowed_prefixes(self, peer: Peer, prefixes: list[int]) -> None:
        """:meth:`add_allowed_ip` for many prefix keys (:func:`.allowedips.make_prefix`) at once:
        the UAPI's bulk path (130,000 of them in one request)."""
        self._allowed_ips.insert_prefixes(prefixes, peer)

    def allowed_prefixes_of(self, peer: Peer) -> list[int]:
        """The prefix keys routed to ``peer`` in insertion order (what ``get=1`` lists)."""
        return self._allowed_ips.entries(peer)

    def allowed_ips(self) -> Iterator[tuple[Network, Peer]]:
        """Every ``(network, peer)`` of the routing table."""
        return iter(self._allowed_ips)

    def allowed_ips_of(self, peer: Peer) -> list[Network]:
        """The prefixes routed to ``peer``, in a stable order (v4 first, then by address)."""
        return self._allowed_ips.prefixes(peer)

    def peer_for(self, address: bytes | str) -> Peer | None:
        """The peer whose allowed IPs hold ``address`` (packed or text; longest prefix), or None."""
        return self._allowed_ips.lookup(address)

    def is_under_load(self, now: float) -> bool:
        """Handshakes need a cookie now (a flood was seen within UNDER_LOAD_AFTER_TIME). Asked in
        every pass (the datapath, the kernel prefilter): the guard's field, without its call."""
        return now < self._load.under_load_until

    def assume_under_load(self, until: float) -> None:
        """Require cookies until ``until`` as if a flood had been seen (tests, and an operator
        who expects one)."""
        self._load.under_load_until = until

    # ------------------------------------------------------------------ outputs (the IO shell's seam)

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint, Local]]:
        """Take the ``(datagram, endpoint, local)`` triples produced since the last call: ``local``
        is what :meth:`receive` was given with the peer's latest authenticated datagram (the
        source to send from, "sticky"), or None for the kernel's choice."""
        out, self._out = self._out, []
        return out

    def packets_for_tun(self) -> list[bytes]:
        """Take the decrypted IP packets produced since the last call."""
        packets, self._to_tun = self._to_tun, []
        return packets

    def take_events(self) -> list[Event]:
        """Take the events (:mod:`fzpoll.wireguard.peer`) produced since the last call."""
        events, self._events = self._events, []
        return events

    def control_packets_received(self) -> list[tuple[PublicKey, bytes]]:
        """Take the in-tunnel control packets (Firezone's p2p control: IPv6 from ``::`` with
        next header 0xFF) decrypted since the last call, with the peer each came from. They are
        exempt from the allowed-IPs source check and never reach :meth:`packets_for_tun`."""
        packets, self._control = self._control, []
        return packets

    def count_drop(self, reason: D, count: int = 1) -> None:
        """Count drops the IO shell decided on the engine's behalf (e.g. handshakes shed under load)."""
        self._drops[reason] += count

    def staged_packet_count(self) -> int:
        """Packets waiting for a session, over every peer."""
        return self._staged.count

    def bounds(self) -> dict[str, dict[str, int]]:
        """The engine's tables that remote input can fill: in use and limit (``fzpoll show``);
        what each does when full is counted among the drops or here."""
        return {"staged_packets": {"used": self._staged.count, "limit": self._staged.limit},
                "control_packets": {"used": len(self._control), "limit": MAX_QUEUED_CONTROL_PACKETS},
                **self._load.bounds()}

    def live_indices(self) -> frozenset[int]:
        """Our receiver indices in use (sessions and handshakes in flight)."""
        return self._sessions.live_indices()

    def receive_counters(self) -> dict[int, int]:
        """The newest counter each session has accepted, by our receiver index (-1: none yet).
        Every counter the session can still accept is above ``newest - REPLAY_WINDOW_SIZE``: what
        the kernel prefilter may drop below (O(sessions): for a caller that samples it)."""
        return self._sessions.newest_counters()

    def index_generation(self) -> int:
        """A number that changes whenever :meth:`live_indices` may have: O(1), for a caller that
        mirrors the indices (the kernel prefilter) and must not rebuild them every pass."""
        return self._sessions.generation

    def timer_entries(self) -> int:
        """Entries on the timer heap (bounded by a few per peer: see :mod:`.timers`)."""
        return len(self._timers)

    # ------------------------------------------------------------------ data plane: outgoing

    def send(self, packet: bytes, now: float) -> D | None:
        """Encrypt an IP packet from the TUN device for the peer its destination routes to."""
        drops = self.send_batch((packet,), now)
        return drops[0] if drops else None

    def send_batch(self, packets: Iterable[bytes], now: float,
                   failures: list[Exception] | None = None) -> list[D]:
        """:meth:`send` each packet in order, as one call each would; the drop reasons (one per drop,
        counted too). Consecutive packets for one peer are a run (:meth:`_send_run`); a repeated
        destination is not looked up again. An exception costs only its packet: it goes to
        ``failures`` (raised at once without)."""
        drops: list[D] = []
        run: list[bytes] = []
        run_peer = peer = None
        last = b""  # the last destination looked up, routed to ``peer``
        for packet in packets:
            n = len(packet)
            version = packet[0] >> 4 if n else 0
            try:
                if n >= 20 and version == 4:
                    dst = packet[16:20]
                    if dst != last:
                        last, peer = dst, self._allowed_ips.lookup_v4(dst)
                elif n >= 40 and version == 6:
                    dst = packet[24:40]
                    if dst != last:
                        last, peer = dst, self._allowed_ips.lookup_v6(dst)
                else:
                    self._drop(D.BAD_INNER_PACKET, drops)
                    continue
            except Exception as exc:  # a bug: it costs this packet
                last = b""
                if failures is None:
                    raise
                failures.append(exc)
                continue
            if peer is None:
                # multicast (IPv6 router solicitations, MLD): the kernel's own, no peer asked for it
                multicast = dst[0] == 0xFF if version == 6 else dst[0] >> 4 == 14
                self._drop(D.MULTICAST if multicast else D.NO_ROUTE, drops)
            elif peer is run_peer:
                run.append(packet)
            else:
                if run:
                    self._send_run(run_peer, run, now, drops, failures)  # type: ignore[arg-type]
                run_peer, run = peer, [packet]
        if run:
            self._send_run(run_peer, run, now, drops, failures)  # type: ignore[arg-type]
        return drops

    def send_to_peer(self, peer: Peer, packet: bytes, now: float) -> D | None:
        """Encrypt ``packet`` for ``peer`` now if a session is usable, else stage it and handshake."""
        drops: list[D] = []
        self._send_run(peer, [packet], now, drops, None)
        return drops[0] if drops else None

    def _send_run(self, peer: Peer, run: list[bytes], now: float, drops: list[D],
                  failures: list[Exception] | None) -> None:
        """Consecutive packets for ``peer``: what its session may send now is encrypted in one go;
        the rest (no endpoint or usable session, packets staged before, or REJECT_AFTER_MESSAGES
        reached mid-run) is staged one by one, and a handshake started."""
        kp = peer.current
        n = len(run)
        usable = 0 if peer.endpoint is None or peer.staged else _room(kp, now, n)
        done = 0
        if usable:
            start = kp.send_counter  # type: ignore[union-attr]
            try:
                self._encrypt_run(peer, kp, run if usable == n else run[:usable], now)  # type: ignore
            except Exception as exc:  # a bug: it costs the packet it happened on (the last counted)
                if failures is None:
                    raise
                failures.append(exc)
                done = max(kp.send_counter - start, 1)  # type: ignore[union-attr]
            else:
                if usable == n:
                    return  # all sent (the usual case)
                done = usable
        for packet in run[done:]:
            try:
                reason = self._stage(peer, packet, now)
            except Exception as exc:
                if failures is None:
                    raise
                failures.append(exc)
                continue
            if reason is not None:
                self._drop(reason, drops)

    def _stage(self, peer: Peer, packet: bytes, now: float) -> D | None:
        """Keep ``packet`` until ``peer`` has a usable session, and see to one (a handshake)."""
        if peer.endpoint is None:
            return D.NO_ENDPOINT
        reason = peer.stage(packet)
        self._flush_staged(peer, now)
        return reason

    def _encrypt_run(self, peer: Peer, kp: Keypair, packets: Iterable[bytes], now: float) -> None:
        """Encrypt ``packets`` with ``kp``, which may send them all (:func:`_room`); the timers
        (wireguard-go's timers.go) and the rekey as for each, the deadlines that are the same for
        every packet of the run set once."""
        # timers: any authenticated packet traversal / sent, data sent
        if peer.persistent_keepalive_interval:
            self._timers.arm(peer, _PERSISTENT, now + peer.persistent_keepalive_interval)
        peer.keepalive_at = None
        # keep the key fresh: from the packet whose counter reaches rekey_at (0: the session is old)
        rekey_at = 0 if kp.is_initiator and now - kp.created_at >= REKEY_AFTER_TIME else _REKEY_COUNTER
        out, seal, mtu = self._out, self._seal, self.mtu
        endpoint, local, header, key = peer.endpoint, peer.local, kp.header, kp.send_key
        for packet in packets:
            counter = kp.send_counter
            kp.send_counter = counter + 1
            n = len(packet)
            if n & 15:
                pad = min(-n & 15, mtu - n) if n < mtu else 0
                if pad > 0:
                    packet = packet + _PADDING[:pad]
            size = len(packet) + _OVERHEAD
            if size > self._scratch_size:
                self._grow_scratch(size)
            view = self._scratch_view
            _pack_header(view, 0, header, counter)
            seal(self._scratch_body, _NULL, packet, len(packet), _NULL, 0, _NULL, _pack_nonce(counter), key)
            out.append((view[0:size], endpoint, local))
            peer.tx_bytes += size
            if n and peer.new_handshake_at is None:
                self._timers.arm(peer, _NEW_HANDSHAKE, now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter())
            if counter >= rekey_at:
                self._send_initiation(peer, now, is_retry=False)
                rekey_at = REJECT_AFTER_MESSAGES  # once: at this ``now`` another sends nothing (REKEY_TIMEOUT)

    def _grow_scratch(self, size: int) -> None:
        self._scratch = _ffi.new("unsigned char[]", size)
        self._scratch_body = self._scratch + 16  # where the ciphertext of a datagram starts
        self._scratch_view = _ffi.buffer(self._scratch)
        self._scratch_size = size

    def _flush_staged(self, peer: Peer, now: float) -> None:
        kp = peer.current
        if not _room(kp, now, 1):
            # A responder whose fresh ``next`` keypair waits for the initiator's first packet
            # holds its packets rather than crossing handshakes: confirmation is one RTT away.
            if peer.next is None or now - peer.next.created_at >= REKEY_TIMEOUT:
                self._send_initiation(peer, now, is_retry=False)
            return
        staged = peer.staged
        if staged:
            packets = list(staged)
            staged.clear()
            self._encrypt_run(peer, kp, packets, now)  # type: ignore[arg-type]

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._flush_staged(peer, now)

    def _drop(self, reason: D, drops: list[D]) -> None:
        self._drops[reason] += 1
        drops.append(reason)

    # ------------------------------------------------------------------ data plane: incoming

    def receive(self, data: bytes, addr: Endpoint, now: float, local: Local = None) -> D | None:
        """Process one UDP datagram from ``addr``; decrypted packets go to :meth:`packets_for_tun`.
        ``local`` (opaque here) says which of our addresses it was sent to: if it authenticates,
        what we send to its peer carries it back, as the kernel and wireguard-go answer from the
        address the peer used."""
        drops = self.receive_batch(((data, addr, local),), now)
        return drops[0] if drops else None

    def receive_batch(self, datagrams: Iterable[tuple[bytes, Endpoint, Local]], now: float,
                      failures: list[Exception] | None = None) -> list[D]:
        """:meth:`receive` each ``(data, addr, local)`` in order, as one call each would; the drop
        reasons (one per drop, counted too). Transport datagrams in a row to one receiver index
        are a run: its keypair is looked up once, and :meth:`_authenticated` done once per source.
        An exception costs only its datagram: it goes to ``failures`` (raised at once without)."""
        drops: list[D] = []
        run_index = -1  # the receiver index of the run (-1: none yet)
        kp: Keypair | D | None = None
        run_addr: Endpoint | None = None  # the source its peer was last authenticated from in the run
        run_local: Local = None
        for data, addr, local in datagrams:
            try:
                if len(data) < KEEPALIVE_SIZE or (header := _unpack_header(data))[0] != _TRANSPORT_WORD:
                    run_index = -1  # a handshake message may rotate sessions: look indices up again
                    reason = self._on_message(data, addr, now, local)
                    if reason is not None:
                        self._drop(reason, drops)
                    continue
                _, index, counter = header
                if index != run_index:  # a new run: its keypair, or why there is none
                    run_index, run_addr, kp = index, None, self._keypairs.get(index)
                    if kp is None:  # (not a D.X default: an Enum member costs ~80 ns in 3.11, a __getattr__)
                        kp = D.UNKNOWN_INDEX
                    elif now - kp.created_at >= REJECT_AFTER_TIME:  # type: ignore[union-attr]
                        kp = D.KEY_EXPIRED
                if kp.__class__ is D:
                    self._drop(kp, drops)  # type: ignore[arg-type]
                    continue
                replay = kp.replay  # type: ignore[union-attr]
                if (counter <= replay.newest or counter >= REJECT_AFTER_MESSAGES) and not replay.may_accept(counter):
                    self._drop(D.REPLAYED, drops)  # (in order, the usual case, needs no call)
                    continue
                size = len(data) - _OVERHEAD
                if size > self._scratch_size:
                    self._grow_scratch(size)
                if self._open(self._scratch, _NULL, _NULL, data[16:], size + AEAD_TAG_SIZE, _NULL, 0,
                              _pack_nonce(counter), kp.recv_key):  # type: ignore[union-attr]
                    self._drop(D.BAD_TAG, drops)
                    continue
                # Authentic from here on: the packet counts for the session, the endpoint and the
                # timers even if cryptokey routing then refuses its inner packet (whitepaper 2, as
                # the kernel and wireguard-go do). Only failures of authentication leave state alone.
                if not replay.accept(counter):
                    self._drop(D.REPLAYED, drops)
                    continue
                plain = self._scratch_view[0:size]  # before anything else may seal into the scratch
                peer = kp.peer  # type: ignore[union-attr]
                if run_addr is None or addr != run_addr or local != run_local:
                    self._authenticated(peer, kp, addr, now, local)  # type: ignore[arg-type]
                    run_addr, run_local = addr, local
                reason = self._deliver(peer, plain, size + _OVERHEAD, now)
                if reason is not None:
                    self._drop(reason, drops)
            except Exception as exc:  # a bug: it costs this datagram; the next one starts afresh
                run_index = -1
                if failures is None:
                    raise
                failures.append(exc)
        return drops

    def _on_message(self, data: bytes, addr: Endpoint, now: float, local: Local) -> D | None:
        """A datagram other than transport data of at least a keepalive's size."""
        if data[:4] == _TRANSPORT_TYPE:
            return D.BAD_LENGTH
        if len(data) < 4:
            return D.TOO_SHORT
        if data[1] or data[2] or data[3]:
            return D.BAD_TYPE
        handler = self._handlers.get(data[0])
        return D.BAD_TYPE if handler is None else handler(data, addr, now, local)

    def _authenticated(self, peer: Peer, kp: Keypair, addr: Endpoint, now: float, local: Local) -> None:
        """What an authenticated transport datagram does to its peer (confirm a responder's keypair,
        follow its source, the timers): the same for each datagram of a run from one source."""
        if kp is peer.next:
            self._sessions.confirm_next(peer)
            self._handshake_complete(peer)
            self._flush_staged(peer, now)
        if peer.endpoint != addr:
            peer.endpoint = addr  # roaming: follow the latest authenticated packet
        peer.local = local
        # timers: keep key fresh, traversal, any authenticated packet received
        if (
            kp.is_initiator
            and not peer.sent_last_minute_handshake
            and now - kp.created_at >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
        ):
            peer.sent_last_minute_handshake = True
            self._send_initiation(peer, now, is_retry=False)
        if peer.persistent_keepalive_interval:
            self._timers.arm(peer, _PERSISTENT, now + peer.persistent_keepalive_interval)
        peer.new_handshake_at = None

    def _take_control(self, peer: Peer, packet: bytes) -> D | None:
        if len(self._control) >= MAX_QUEUED_CONTROL_PACKETS:  # nobody takes them (no resources)
            return D.CONTROL_UNEXPECTED
        self._control.append((peer.public_key, packet))
        return None

    def _deliver(self, peer: Peer, plain: bytes, size: int, now: float) -> D | None:
        """An authenticated datagram of ``size`` bytes, ``plain`` inside: counted, the keepalive
        timer, then ``plain``'s length and source checked against the peer's allowed IPs and it
        is queued for TUN without padding (an in-tunnel control packet, exempt, for its taker)."""
        peer.rx_bytes += size
        if not plain:
            return None  # a keepalive
        if peer.keepalive_at is None:
            self._timers.arm(peer, _KEEPALIVE, now + KEEPALIVE_TIMEOUT)
        else:
            peer.need_another_keepalive = True
        n = len(plain)
        version = plain[0] >> 4
        if version == 4 and n >= 20:
            length = (plain[2] << 8) | plain[3]
            if length > n or length < 20:
                return D.BAD_INNER_PACKET
            if self._allowed_ips.lookup_v4(plain[12:16]) is not peer:
                return D.NOT_ALLOWED_SOURCE
        elif version == 6 and n >= 40:
            length = ((plain[4] << 8) | plain[5]) + 40
            if length > n:
                return D.BAD_INNER_PACKET
            if _is_control(plain):
                return self._take_control(peer, plain[:length])
            if self._allowed_ips.lookup_v6(plain[8:24]) is not peer:
                return D.NOT_ALLOWED_SOURCE
        else:
            return D.BAD_INNER_PACKET
        self._to_tun.append(plain if length == n else plain[:length])
        return None

    # ------------------------------------------------------------------ cleanup

    def _clear_sessions(self, peer: Peer) -> None:
        """Zero every key of ``peer`` (whitepaper 6.3: after 3 x REJECT_AFTER_TIME, or removal)."""
        self._sessions.clear(peer)
        peer.staged.clear()
        for timer in PeerTimer:
            setattr(peer, timer, None)
