"""The anti-replay sliding window (whitepaper 5.4.6, RFC 6479 as wireguard-go's replay.go).

A ring of REPLAY_RING_BLOCKS blocks of REPLAY_BLOCK_BITS bits; bit ``c % 64`` of block ``c // 64 %
128`` says counter ``c`` was seen. An in-order packet sets one bit in one small int; a new block is
cleared only when the newest counter crosses into it (once per 64 packets in order). The accepted
window is wireguard-go's: REPLAY_WINDOW_SIZE counters behind the newest.
"""

from __future__ import annotations

from fzpoll.wireguard.constants import REJECT_AFTER_MESSAGES, REPLAY_BLOCK_BITS, REPLAY_RING_BLOCKS, REPLAY_WINDOW_SIZE

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
