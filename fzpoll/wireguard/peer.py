"""Per-peer state: its keypairs (previous/current/next), handshake progress, timers, staged packets.

Plain slotted objects the engine mutates; they hold no logic beyond what reads better next to the
data. Keys are never shown by repr.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fzpoll.errors import DropReason
from fzpoll.wireguard.constants import MAX_STAGED_PACKETS, MAX_STAGED_PACKETS_TOTAL
from fzpoll.wireguard.handshake import CookieGenerator, Endpoint, Local
from fzpoll.wireguard.keys import PresharedKey, PublicKey

if TYPE_CHECKING:
    from fzpoll.wireguard.session import Keypair

__all__ = [
    "Endpoint", "Event", "HandshakeCompleted", "HandshakeGaveUp", "HandshakeInitiated", "HandshakeState", "KeysZeroed",
    "Local", "Peer", "PeerEvent", "StagedBudget", "StagedQueue",
]


class StagedBudget:
    """Packets staged over every peer of an engine, against one global bound: 128 per peer alone
    let 1,000 silent peers hold 190 MiB."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int = MAX_STAGED_PACKETS_TOTAL) -> None:
        self.count = 0
        self.limit = limit


class StagedQueue(deque):
    """A peer's staged packets; keeps its :class:`StagedBudget` exact through every way the
    engine adds and takes them (append, popleft, clear)."""

    __slots__ = ("budget",)

    def __init__(self, budget: StagedBudget) -> None:
        super().__init__()
        self.budget = budget

    def append(self, packet: bytes) -> None:
        super().append(packet)
        self.budget.count += 1

    def popleft(self) -> bytes:
        packet = super().popleft()
        self.budget.count -= 1
        return packet

    def clear(self) -> None:
        self.budget.count -= len(self)
        super().clear()


class HandshakeState(enum.Enum):
    """Where our side of a handshake stands. The responder keeps no state: its keypair waits in
    ``Peer.next`` until the initiator's first transport packet confirms it."""

    NONE = enum.auto()
    INITIATION_SENT = enum.auto()


class Peer:
    """A configured peer. Timer fields are absolute deadlines (monotonic seconds) or None."""

    __slots__ = (
        "public_key", "raw_public", "preshared_key", "endpoint", "local", "persistent_keepalive_interval",
        "cookies", "removed",
        # handshake
        "handshake_state", "handshake_index", "handshake_state_noise", "handshake_ephemeral",
        "last_timestamp", "last_initiation_at", "last_sent_handshake_at", "handshake_attempts",
        "sent_last_minute_handshake",
        # sessions
        "previous", "current", "next",
        "staged",
        # timers
        "retransmit_at", "keepalive_at", "new_handshake_at", "zero_keys_at", "persistent_at",
        "need_another_keepalive", "timer_entries",
        # statistics
        "last_handshake_wall", "rx_bytes", "tx_bytes",
    )

    def __init__(self, public_key: PublicKey, budget: StagedBudget | None = None) -> None:
        self.public_key = public_key
        self.raw_public = public_key.raw
        self.preshared_key = PresharedKey.zero()
        self.endpoint: Endpoint | None = None
        self.local: Local = None  # the sticky source: see Engine.receive
        self.persistent_keepalive_interval = 0
        self.cookies = CookieGenerator(public_key.raw)
        self.removed = False
        self.handshake_state = HandshakeState.NONE
        self.handshake_index: int | None = None
        self.handshake_state_noise = None
        self.handshake_ephemeral = b""
        self.last_timestamp = bytes(12)
        self.last_initiation_at = float("-inf")
        self.last_sent_handshake_at = float("-inf")
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.staged = StagedQueue(budget if budget is not None else StagedBudget())
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_at: float | None = None
        self.need_another_keepalive = False
        self.timer_entries: dict[str, tuple[float, int]] = {}  # timer -> its one live heap entry (timers.py)
        self.last_handshake_wall = 0.0  # Unix time of the last completed handshake, 0 if none
        self.rx_bytes = 0
        self.tx_bytes = 0

    def __repr__(self) -> str:
        return f"<Peer {self.public_key.short()}>"

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.previous, self.current, self.next) if kp is not None]

    def stage(self, packet: bytes) -> DropReason | None:
        """Queue a packet until a session exists. Full for this peer: the oldest gives way
        (STAGED_QUEUE_FULL); full over all peers: this packet is dropped (STAGED_TOTAL_FULL)."""
        staged = self.staged
        if len(staged) >= MAX_STAGED_PACKETS:
            staged.popleft()
            staged.append(packet)
            return DropReason.STAGED_QUEUE_FULL
        budget = staged.budget
        if budget.count >= budget.limit:
            return DropReason.STAGED_TOTAL_FULL
        staged.append(packet)
        return None


# ---------------------------------------------------------------------------------------------
# Events: what the engine reports about a peer besides packets (taken with Engine.take_events after a
# pass, to log or act on). They carry the peer's public key, never a secret.


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """Something happened to the peer with this public key."""

    peer: PublicKey


class HandshakeInitiated(PeerEvent):
    """We sent a handshake initiation to the peer (a first one, a rekey or a retry)."""

    __slots__ = ()


class HandshakeCompleted(PeerEvent):
    """A new session with the peer is established (either side initiated)."""

    __slots__ = ()


class HandshakeGaveUp(PeerEvent):
    """No answer after MAX_TIMER_HANDSHAKES retries: the staged packets were dropped."""

    __slots__ = ()


class KeysZeroed(PeerEvent):
    """Every session key of the peer was erased (whitepaper 6.3, 3 x REJECT_AFTER_TIME)."""

    __slots__ = ()


Event = HandshakeInitiated | HandshakeCompleted | HandshakeGaveUp | KeysZeroed
