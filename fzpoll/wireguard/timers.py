"""Every peer timer of one engine on one heap (wireguard-go's timers.go, whitepaper section 6).

A peer holds each timer's deadline in an attribute named by :class:`PeerTimer` (``None`` when
unarmed); the heap only tells the engine when to look. Each (peer, timer) has at most one *live*
heap entry (``peer.timer_entries``): arming pushes a new entry only when the deadline moves
earlier than the live one. A deadline moved later is found when the live entry reaches the top
and is re-pushed once. So per-packet re-arming (every data packet moves the keepalive and
new-handshake timers) costs an attribute store, not a heap push, and the heap holds at most a few
entries per peer.
"""

from __future__ import annotations

import enum
import heapq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fzpoll.wireguard.peer import Peer


class PeerTimer(enum.StrEnum):
    """A peer's timers; each value is the name of the peer attribute holding its deadline."""

    RETRANSMIT_HANDSHAKE = "retransmit_at"
    SEND_KEEPALIVE = "keepalive_at"
    NEW_HANDSHAKE = "new_handshake_at"
    ZERO_KEY_MATERIAL = "zero_keys_at"
    PERSISTENT_KEEPALIVE = "persistent_at"


class TimerHeap:
    """The deadlines of every armed peer timer, earliest first."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Peer, PeerTimer]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, peer: Peer, timer: PeerTimer, at: float) -> None:
        """Set ``timer`` of ``peer`` to fire at ``at``."""
        setattr(peer, timer, at)
        live = peer.timer_entries.get(timer)
        if live is None or at < live[0]:
            self._seq += 1
            peer.timer_entries[timer] = (at, self._seq)
            heapq.heappush(self._heap, (at, self._seq, peer, timer))

    def _prune(self) -> None:
        """Drop stale entries and cancelled timers; re-push ones whose deadline moved later."""
        heap = self._heap
        while heap:
            at, seq, peer, timer = heap[0]
            live = peer.timer_entries.get(timer)
            if peer.removed or live is None or live[1] != seq:
                heapq.heappop(heap)  # superseded by an earlier entry
                continue
            current = getattr(peer, timer)
            if current is None:
                heapq.heappop(heap)  # cancelled
                del peer.timer_entries[timer]
            elif current > at:
                self._seq += 1
                peer.timer_entries[timer] = (current, self._seq)
                heapq.heapreplace(heap, (current, self._seq, peer, timer))
            else:
                return

    def next_deadline(self) -> float | None:
        """The exact earliest deadline of a live timer, or None."""
        heap = self._heap
        if not heap:
            return None
        at, seq, peer, timer = heap[0]
        live = peer.timer_entries.get(timer)
        if live is not None and live[1] == seq and not peer.removed:
            current = getattr(peer, timer)
            if current is not None and current <= at:
                return at  # the top entry is live and current: nothing to prune (the common case)
        self._prune()
        return heap[0][0] if heap else None

    def lower_bound(self) -> float | None:
        """A lower bound of :meth:`next_deadline` in O(1): the earliest entry, possibly stale."""
        heap = self._heap
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> tuple[Peer, PeerTimer] | None:
        """Disarm and return the earliest timer due at ``now``, or None if none is."""
        self._prune()
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        _, _, peer, timer = heapq.heappop(heap)
        del peer.timer_entries[timer]
        setattr(peer, timer, None)
        return peer, timer
