"""What the engine tells its owner besides packets: rare, notable changes of a peer's state.

The IO shell takes them with :meth:`Engine.take_events` after a pass (to log them, or to act on
them); they carry the peer's public key, never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzpoll.wireguard.keys import PublicKey


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
