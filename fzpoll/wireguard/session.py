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

from fzpoll.wireguard.constants import (
    MESSAGE_TRANSPORT_DATA,
    REJECT_AFTER_MESSAGES,
    REPLAY_BLOCK_BITS,
    REPLAY_RING_BLOCKS,
    REPLAY_WINDOW_SIZE,
)
from fzpoll.wireguard.peer import HandshakeState, Peer


# The anti-replay sliding window (5.4.6, RFC 6479 as wireguard-go's replay.go): a ring of
# REPLAY_RING_BLOCKS blocks of REPLAY_BLOCK_BITS bits; bit ``c % 64`` of block ``c // 64 % 128``
# says counter ``c`` was seen. An in-order packet sets one bit in one small int; a new block is
# cleared only when the newest counter crosses into it (once per 64 packets in order). The
# accepted window is wireguard-go's: REPLAY_WINDOW_SIZE counters behind the newest.
_SHIFT = REPLAY_BLOCK_BITS.bit_length() - 1  # counter >> _SHIFT is its block number
_BIT = REPLAY_BLOCK_BITS - 1  # counter & _BIT is its bit in the block
_RING = REPLAY_RING_BLOCKS - 1  # block number & _RING is its place in the ring


class ReplayWindow:
    __slots__ = ("newest", "blocks")

    def __init__(self) -> None:
        self.newest = -1
        self.blocks = [0] * REPLAY_RING_BLOCKS

    def may_accept(self, counter: int) -> bool:
        """Cheap check before decryption: False if ``counter`` is certainly a replay or too old."""
        if counter > self.newest:
            return counter < REJECT_AFTER_MESSAGES
        if self.newest - counter >= REPLAY_WINDOW_SIZE:
            return False
        return not (self.blocks[(counter >> _SHIFT) & _RING] >> (counter & _BIT)) & 1

    def accept(self, counter: int) -> bool:
        """Mark ``counter`` seen (call only after its tag verified); False if it was a replay."""
        newest = self.newest
        blocks = self.blocks
        if counter > newest:  # the common case: newer than any so far, so never a replay
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            self.newest = counter
            block = counter >> _SHIFT
            top = newest >> _SHIFT  # -1 >> 6 == -1: a fresh window clears from block 0
            if block != top:  # entering new blocks: forget what they held a lap ago
                if block - top > _RING:
                    blocks[:] = [0] * REPLAY_RING_BLOCKS
                else:
                    for i in range(top + 1, block + 1):
                        blocks[i & _RING] = 0
            blocks[block & _RING] |= 1 << (counter & _BIT)
            return True
        if newest - counter >= REPLAY_WINDOW_SIZE:
            return False
        i = (counter >> _SHIFT) & _RING
        bit = 1 << (counter & _BIT)
        old = blocks[i]
        if old & bit:
            return False
        blocks[i] = old | bit
        return True


class Keypair:
    """One session's transport keys, counters and replay window (whitepaper 5.4.6)."""

    __slots__ = (
        "peer", "send_key", "recv_key", "local_index", "remote_index", "send_counter",
        "replay", "created_at", "is_initiator", "header",
    )

    def __init__(self, peer: "Peer", send_key: bytes, recv_key: bytes, local_index: int,
                 remote_index: int, created_at: float, is_initiator: bool) -> None:
        self.peer = peer
        self.send_key = send_key
        self.recv_key = recv_key
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created_at = created_at
        self.is_initiator = is_initiator
        # The first 8 bytes of every transport message we send with this keypair.
        self.header = bytes([MESSAGE_TRANSPORT_DATA, 0, 0, 0]) + remote_index.to_bytes(4, "little")

    def __repr__(self) -> str:
        return f"<Keypair local={self.local_index} sent={self.send_counter} initiator={self.is_initiator}>"


class Sessions:
    """Every receiver index of one engine, and the keypair rotation rules."""

    __slots__ = ("keypairs", "handshakes", "generation", "_random_bytes")

    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self.keypairs: dict[int, Keypair] = {}  # our index in a session -> its keypair
        self.handshakes: dict[int, Peer] = {}  # our index in an initiation in flight -> its peer
        self.generation = 0  # moves whenever the set of live indices may have changed
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

    def newest_counters(self) -> dict[int, int]:
        return {index: kp.replay.newest for index, kp in self.keypairs.items()}

    # ------------------------------------------------------------------ handshakes

    def begin_initiation(self, peer: Peer, index: int, noise_state: object, ephemeral: bytes) -> None:
        """We sent an initiation under ``index``: a response naming it completes it."""
        self.generation += 1
        self.clear_handshake(peer)
        self.handshakes[index] = peer
        peer.handshake_state = HandshakeState.INITIATION_SENT
        peer.handshake_index = index
        peer.handshake_state_noise = noise_state
        peer.handshake_ephemeral = ephemeral

    def clear_handshake(self, peer: Peer) -> None:
        self.generation += 1
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
        self.generation += 1
        self.clear_handshake(peer)
        self.keypairs[kp.local_index] = kp
        self._forget(peer.next)
        self._forget(peer.previous)
        peer.previous = None
        peer.next = kp

    def install_initiator(self, peer: Peer, kp: Keypair) -> None:
        """An initiator's keypair is confirmed by the response: it becomes current at once."""
        self.generation += 1
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
        self.generation += 1
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
        self.generation += 1
        if kp is not None and self.keypairs.get(kp.local_index) is kp:
            del self.keypairs[kp.local_index]
