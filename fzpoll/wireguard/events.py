"""What the engine tells its owner besides packets: rare, notable changes of a peer's state.

The IO shell takes them with :meth:`Engine.take_events` after a pass (to log them, or to act on
them); they carry the peer's public key, never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass

from fzpoll.wireguard.keys import PublicKey


@dataclass(frozen=True, slots=True)
class HandshakeInitiated:
    """We sent a handshake initiation to the peer (a first one, a rekey or a retry)."""

    peer: PublicKey


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session with the peer is established (either side initiated)."""

    peer: PublicKey


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    """No answer after MAX_TIMER_HANDSHAKES retries: the staged packets were dropped."""

    peer: PublicKey


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    """Every session key of the peer was erased (whitepaper 6.3, 3 x REJECT_AFTER_TIME)."""

    peer: PublicKey


Event = HandshakeInitiated | HandshakeCompleted | HandshakeGaveUp | KeysZeroed
