"""Every peer timer of one engine on one heap (wireguard-go's timers.go, whitepaper section 6).

A peer holds each timer's deadline in an attribute named by :class:`PeerTimer` (``None`` when
unarmed); the heap only tells the engine when to look. Each (peer, timer) has at most one *live*
heap entry (``peer.timer_entries``): arming pushes a new entry only when the deadline moves
earlier than the live one. A deadline moved later is found when the live entry reaches the top
and is re-pushed once. So per-packet re-arming (every data packet moves the keepalive and
new-handshake timers) costs an attribute store, not a heap push, and the heap holds at most a few
entries per peer. What each timer does when it fires is :class:`TimerDriver`, a part of the engine.
"""

from __future__ import annotations

import enum
import heapq
from typing import TYPE_CHECKING, Callable

from fzpoll.errors import DropReason as D
from fzpoll.wireguard.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_TIMER_HANDSHAKES,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER_TIME,
)
from fzpoll.wireguard.peer import HandshakeGaveUp, KeysZeroed

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


_RETRANSMIT = PeerTimer.RETRANSMIT_HANDSHAKE
_KEEPALIVE = PeerTimer.SEND_KEEPALIVE
_NEW_HANDSHAKE = PeerTimer.NEW_HANDSHAKE
_ZERO_KEYS = PeerTimer.ZERO_KEY_MATERIAL
_PERSISTENT = PeerTimer.PERSISTENT_KEEPALIVE


class TimerDriver:
    """The timers' half of :class:`fzpoll.wireguard.engine.Engine` (a mixin, as
    :class:`~fzpoll.wireguard.handshaking.HandshakeDriver`): the deadline it exposes, and what
    each timer does when it fires (wireguard-go's timers.go, whitepaper section 6)."""

    def _jitter(self) -> float:
        """Up to REKEY_TIMEOUT_JITTER_MAX. From a PRNG seeded by the injected randomness: it is
        drawn for data packets too, where a getrandom() syscall each would be a waste."""
        return self._jitter_rng.random() * REKEY_TIMEOUT_JITTER_MAX

    def next_deadline(self) -> float | None:
        """The absolute time at which :meth:`handle_timer` must next run, or None if never."""
        return self._timers.next_deadline()

    def deadline_hint(self) -> float | None:
        """A lower bound of :meth:`next_deadline` in O(1), without pruning: the earliest heap entry,
        which may be a timer since cancelled or moved later (every live timer has an entry at or
        before its deadline). An IO loop may sleep until it: if it is stale, the wakeup's
        :meth:`next_deadline` prunes the heap, so each stale entry costs at most one early
        wakeup, and only one that the data path's own churn (each packet cancels and re-arms
        the keepalive and new-handshake timers) left at the top just before the loop went idle."""
        return self._timers.lower_bound()

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        pop_due = self._timers.pop_due
        while (due := pop_due(now)) is not None:
            peer, timer = due
            _ON_TIMER[timer](self, peer, now)

    def _expired_retransmit(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts >= MAX_TIMER_HANDSHAKES:
            dropped = len(peer.staged)
            peer.staged.clear()
            if dropped:
                self._drops[D.HANDSHAKE_GAVE_UP] += dropped
            self._sessions.clear_handshake(peer)
            self._events.append(HandshakeGaveUp(peer.public_key))
            if peer.zero_keys_at is None:
                self._timers.arm(peer, _ZERO_KEYS, now + ZERO_KEYS_AFTER_TIME)
            return
        peer.handshake_attempts += 1
        peer.local = None  # in case the sticky source is the trouble (as the kernel and wireguard-go)
        self._send_initiation(peer, now, is_retry=True)

    def _expired_keepalive(self, peer: Peer, now: float) -> None:
        self._send_keepalive(peer, now)
        if peer.need_another_keepalive:
            peer.need_another_keepalive = False
            self._timers.arm(peer, _KEEPALIVE, now + KEEPALIVE_TIMEOUT)

    def _expired_new_handshake(self, peer: Peer, now: float) -> None:
        peer.local = None  # we stopped hearing back: maybe the sticky source is the trouble
        self.initiate_handshake(peer, now)

    def _expired_zero_keys(self, peer: Peer, now: float) -> None:
        self._clear_sessions(peer)
        self._events.append(KeysZeroed(peer.public_key))

    def _expired_persistent_keepalive(self, peer: Peer, now: float) -> None:
        if peer.persistent_keepalive_interval:
            self._send_keepalive(peer, now)


# What each timer does when it fires. A table here, not on each engine: CPython 3.11's fast
# attribute lookups (shared-key inline values) stop at 30 attributes of an instance, and an engine
# with 30 cost 1,100 more instructions per packet round trip than with 29 (engine_instructions.py).
_ON_TIMER: dict[PeerTimer, Callable[[TimerDriver, Peer, float], None]] = {
    _RETRANSMIT: TimerDriver._expired_retransmit,
    _KEEPALIVE: TimerDriver._expired_keepalive,
    _NEW_HANDSHAKE: TimerDriver._expired_new_handshake,
    _ZERO_KEYS: TimerDriver._expired_zero_keys,
    _PERSISTENT: TimerDriver._expired_persistent_keepalive,
}
