"""The anti-replay sliding window (whitepaper 5.4.6, RFC 6479 semantics as wireguard-go).

A Python int is the bitmap: bit i set means counter ``newest - i`` was seen. Shifting a few-kilobit
int is cheaper from Python than walking a ring of 64-bit blocks, and the accepted window is the
same as wireguard-go's (REPLAY_WINDOW_SIZE counters behind the newest).
"""

from __future__ import annotations

from fzpoll.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE

_WINDOW_MASK = (1 << REPLAY_WINDOW_SIZE) - 1


class ReplayWindow:
    __slots__ = ("newest", "bitmap")

    def __init__(self) -> None:
        self.newest = -1
        self.bitmap = 0

    def may_accept(self, counter: int) -> bool:
        """Cheap check before decryption: False if ``counter`` is certainly a replay or too old."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        behind = self.newest - counter
        if behind < 0:
            return True
        if behind >= REPLAY_WINDOW_SIZE:
            return False
        return not (self.bitmap >> behind) & 1

    def accept(self, counter: int) -> bool:
        """Mark ``counter`` seen (call only after its tag verified); False if it was a replay."""
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        behind = self.newest - counter
        if behind < 0:
            self.bitmap = ((self.bitmap << -behind) | 1) & _WINDOW_MASK
            self.newest = counter
            return True
        if behind >= REPLAY_WINDOW_SIZE or (self.bitmap >> behind) & 1:
            return False
        self.bitmap |= 1 << behind
        return True
