"""The engine's handshake half: messages 1-3 in and out, and what they do to a peer's sessions.

A mixin of :class:`fzpoll.wireguard.engine.Engine` (which owns the state it uses: the sessions,
timers, outputs and keys); it is kept apart so each file holds one half of the protocol: this one
the handshake (whitepaper 5.4.2-5.4.7 with the timers' handshake rules of section 6), the engine
the data plane, configuration and timers.
"""

from __future__ import annotations

from fzpoll.errors import DropReason as D
from fzpoll.wireguard import handshake
from fzpoll.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    ZERO_KEYS_AFTER_TIME,
)
from fzpoll.wireguard.crypto import CryptoError, InvalidPoint
from fzpoll.wireguard.peer import Endpoint, HandshakeCompleted, HandshakeInitiated, HandshakeState, Local, Peer
from fzpoll.wireguard.session import Keypair
from fzpoll.wireguard.timers import PeerTimer

_RETRANSMIT = PeerTimer.RETRANSMIT_HANDSHAKE
_ZERO_KEYS = PeerTimer.ZERO_KEY_MATERIAL
_PERSISTENT = PeerTimer.PERSISTENT_KEEPALIVE


class HandshakeDriver:
    """Processes handshake messages and sends initiations for the :class:`Engine` it is part of."""

    def _check_load(self, data: bytes, addr: Endpoint, now: float, local: Local) -> D | None:
        cookies = self._cookies
        if cookies is None:
            return D.NO_PRIVATE_KEY
        return self._load.check(cookies, data, addr, now, self._out, local)

    def _on_initiation(self, data: bytes, addr: Endpoint, now: float, local: Local) -> D | None:
        if len(data) != INITIATION_SIZE:
            return D.BAD_LENGTH
        reason = self._check_load(data, addr, now, local)
        if reason is not None:
            return reason
        try:
            init = handshake.parse_initiation(self._private, self._public, data)  # type: ignore[arg-type]
        except (CryptoError, InvalidPoint):
            return D.BAD_HANDSHAKE
        peer = self._peers.get(init.remote_static)
        if peer is None:
            return D.UNKNOWN_PEER
        if init.timestamp <= peer.last_timestamp:
            return D.REPLAYED_HANDSHAKE
        if now - peer.last_initiation_at < HANDSHAKE_INITIATION_RATE:
            return D.HANDSHAKE_FLOOD
        try:
            ephemeral = self.random_bytes(32)
            local_index = self._sessions.new_index()
            body, state = handshake.build_response(init, ephemeral, peer.preshared_key.raw, local_index)
        except InvalidPoint:  # a low-order ephemeral from the initiator
            return D.BAD_HANDSHAKE
        # Accepted: from here on the state changes.
        peer.last_timestamp = init.timestamp
        peer.last_initiation_at = now
        recv_key, send_key = state.split()
        kp = Keypair(peer, send_key, recv_key, local_index, init.sender_index, now, is_initiator=False)
        self._sessions.install_responder(peer, kp)
        peer.endpoint, peer.local = addr, local
        self._out.append((peer.cookies.add_macs(body, now), addr, local))
        peer.tx_bytes += RESPONSE_SIZE
        peer.rx_bytes += len(data)
        self._timers.arm(peer, _ZERO_KEYS, now + ZERO_KEYS_AFTER_TIME)
        self._authenticated_traversal(peer, now)
        peer.keepalive_at = None
        return None

    def _on_response(self, data: bytes, addr: Endpoint, now: float, local: Local) -> D | None:
        if len(data) != RESPONSE_SIZE:
            return D.BAD_LENGTH
        reason = self._check_load(data, addr, now, local)
        if reason is not None:
            return reason
        sender, receiver = handshake.response_indices(data)
        peer = self._sessions.handshakes.get(receiver)
        if peer is None or peer.handshake_state is not HandshakeState.INITIATION_SENT:
            return D.UNEXPECTED_RESPONSE
        try:
            state = handshake.parse_response(
                peer.handshake_state_noise, self._private, peer.handshake_ephemeral,  # type: ignore[arg-type]
                peer.preshared_key.raw, data,
            )
        except (CryptoError, InvalidPoint):
            return D.BAD_HANDSHAKE
        send_key, recv_key = state.split()
        local_index: int = peer.handshake_index  # type: ignore[assignment]
        kp = Keypair(peer, send_key, recv_key, local_index, sender, now, is_initiator=True)
        self._sessions.install_initiator(peer, kp)
        peer.endpoint, peer.local = addr, local
        peer.rx_bytes += len(data)
        self._timers.arm(peer, _ZERO_KEYS, now + ZERO_KEYS_AFTER_TIME)
        self._handshake_complete(peer)
        self._authenticated_traversal(peer, now)
        peer.new_handshake_at = None
        self._send_keepalive(peer, now)  # confirms the key to the responder, or sends what waited
        return None

    def _on_cookie_reply(self, data: bytes, addr: Endpoint, now: float, local: Local) -> D | None:
        if len(data) != COOKIE_REPLY_SIZE:
            return D.BAD_LENGTH
        peer = self._sessions.peer_of(int.from_bytes(data[4:8], "little"))
        if peer is None:
            return D.UNKNOWN_INDEX
        if not peer.cookies.consume_reply(data, now):
            return D.BAD_COOKIE
        return None

    def initiate_handshake(self, peer: Peer, now: float) -> None:
        """Start a new handshake with ``peer`` (retries counted afresh), as its new-handshake
        timer does; none within REKEY_TIMEOUT of the last one sent."""
        self._send_initiation(peer, now, is_retry=False)

    def _send_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> None:
        if not is_retry:
            peer.handshake_attempts = 0
        if now - peer.last_sent_handshake_at < REKEY_TIMEOUT:
            return
        if self._private is None or peer.endpoint is None:
            return
        peer.last_sent_handshake_at = now
        ephemeral = self.random_bytes(32)
        index = self._sessions.new_index()
        body, state = handshake.build_initiation(
            self._private, peer.raw_public, ephemeral, index, self.wall_time()
        )
        self._sessions.begin_initiation(peer, index, state, ephemeral)
        self._out.append((peer.cookies.add_macs(body, now), peer.endpoint, peer.local))
        peer.tx_bytes += INITIATION_SIZE
        self._events.append(HandshakeInitiated(peer.public_key))
        self._authenticated_traversal(peer, now)
        peer.keepalive_at = None
        self._timers.arm(peer, _RETRANSMIT, now + REKEY_TIMEOUT + self._jitter())

    def _handshake_complete(self, peer: Peer) -> None:
        peer.retransmit_at = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake_wall = self.wall_time()
        self._events.append(HandshakeCompleted(peer.public_key))

    def _authenticated_traversal(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive_interval:
            self._timers.arm(peer, _PERSISTENT, now + peer.persistent_keepalive_interval)

