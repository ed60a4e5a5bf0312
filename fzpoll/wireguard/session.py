"""Sessions and receiver indices: which keypair or handshake a received index names, and the
rotation of a peer's keypairs (whitepaper 5.4.6 and 6.1, wireguard-go's keypairs).

A peer has up to three keypairs: ``previous`` (still accepted for packets in flight), ``current``
(used to send) and ``next`` (a responder's fresh keypair, not used to send until the initiator's
first transport packet confirms it). Our side of a handshake in flight is named by its own index.
The two index maps are kept apart so a transport packet can never select a handshake and a
response never a session.
"""

from __future__ import annotations

from typing import Callable

from fzpoll.wireguard.peer import HandshakeState, Keypair, Peer


class Sessions:
    """Every receiver index of one engine, and the keypair rotation rules."""

    __slots__ = ("keypairs", "handshakes", "_random_bytes")

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self.keypairs: dict[int, Keypair] = {}  # our index in a session -> its keypair
        self.handshakes: dict[int, Peer] = {}  # our index in an initiation in flight -> its peer
        self._random_bytes = random_bytes

    def new_index(self) -> int:
        """A random receiver index that no session or handshake of ours uses."""
        while True:
            index = int.from_bytes(self._random_bytes(4), "little")
            if index not in self.keypairs and index not in self.handshakes:
                return index

    def peer_of(self, index: int) -> Peer | None:
        """The peer a session or handshake index belongs to (a cookie reply may name either)."""
        kp = self.keypairs.get(index)
        return kp.peer if kp is not None else self.handshakes.get(index)

    def live_indices(self) -> frozenset[int]:
        return frozenset(self.keypairs) | frozenset(self.handshakes)

    # ------------------------------------------------------------------ handshakes

    def begin_initiation(self, peer: Peer, index: int, noise_state: object, ephemeral: bytes) -> None:
        """We sent an initiation under ``index``: a response naming it completes it."""
        self.clear_handshake(peer)
        self.handshakes[index] = peer
        peer.handshake_state = HandshakeState.INITIATION_SENT
        peer.handshake_index = index
        peer.handshake_state_noise = noise_state
        peer.handshake_ephemeral = ephemeral

    def clear_handshake(self, peer: Peer) -> None:
        if peer.handshake_index is not None and self.handshakes.get(peer.handshake_index) is peer:
            del self.handshakes[peer.handshake_index]
        peer.handshake_index = None
        peer.handshake_state = HandshakeState.NONE
        peer.handshake_state_noise = None
        peer.handshake_ephemeral = b""

    # ------------------------------------------------------------------ keypair rotation

    def install_responder(self, peer: Peer, kp: Keypair) -> None:
        """A responder's keypair waits in ``next`` until confirmed; older unconfirmed and
        previous keypairs go."""
        self.clear_handshake(peer)
        self.keypairs[kp.local_index] = kp
        self._forget(peer.next)
        self._forget(peer.previous)
        peer.previous = None
        peer.next = kp

    def install_initiator(self, peer: Peer, kp: Keypair) -> None:
        """An initiator's keypair is confirmed by the response: it becomes current at once."""
        self.clear_handshake(peer)
        self.keypairs[kp.local_index] = kp
        if peer.next is not None:
            self._forget(peer.previous)
            self._forget(peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            self._forget(peer.previous)
            peer.previous = peer.current
        peer.current = kp

    def confirm_next(self, peer: Peer) -> None:
        """The initiator used our ``next`` keypair: it is confirmed and becomes current."""
        self._forget(peer.previous)
        peer.previous = peer.current
        peer.current = peer.next
        peer.next = None

    def clear(self, peer: Peer) -> None:
        """Forget every keypair and handshake of ``peer`` (keys zeroed, peer removed)."""
        self.clear_handshake(peer)
        for kp in peer.keypairs():
            self._forget(kp)
        peer.previous = peer.current = peer.next = None

    def _forget(self, kp: Keypair | None) -> None:
        if kp is not None and self.keypairs.get(kp.local_index) is kp:
            del self.keypairs[kp.local_index]
