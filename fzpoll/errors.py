"""fzpoll's error model.

Remote input never raises: the engine drops it with a :class:`DropReason` and counts it. Local
misuse raises :class:`LocalError`. The poller gathers everything that went wrong in one pass into
one :class:`TunnelError`, logged after the pass, so a bad packet never aborts a batch.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Iterable


class DropReason(enum.StrEnum):
    """Why a datagram or packet was dropped; the value is the name used in counters and logs."""

    TOO_SHORT = "too_short"
    BAD_TYPE = "bad_type"
    BAD_LENGTH = "bad_length"
    BAD_MAC1 = "bad_mac1"
    BAD_MAC2 = "bad_mac2"  # under load, without a valid cookie: a cookie reply is sent instead
    RATE_LIMITED = "rate_limited"
    HANDSHAKE_SHED = "handshake_shed"  # under load, beyond the handshakes one pass may cost
    BAD_HANDSHAKE = "bad_handshake"  # AEAD failure, unknown static key, low-order point
    UNKNOWN_PEER = "unknown_peer"
    REPLAYED_HANDSHAKE = "replayed_handshake"  # TAI64N not newer than the last one
    HANDSHAKE_FLOOD = "handshake_flood"  # initiations from one peer within 20 ms
    UNEXPECTED_RESPONSE = "unexpected_response"
    BAD_COOKIE = "bad_cookie"
    UNKNOWN_INDEX = "unknown_index"
    BAD_TAG = "bad_tag"
    REPLAYED = "replayed"
    KEY_EXPIRED = "key_expired"
    NOT_ALLOWED_SOURCE = "not_allowed_source"  # inner source address not in the peer's allowed IPs
    BAD_INNER_PACKET = "bad_inner_packet"
    NO_ROUTE = "no_route"  # outgoing packet with no peer for its destination
    MULTICAST = "multicast"  # outgoing multicast with no peer (the kernel's own IPv6 chatter)
    NO_ENDPOINT = "no_endpoint"
    NO_PRIVATE_KEY = "no_private_key"
    STAGED_QUEUE_FULL = "staged_queue_full"
    HANDSHAKE_GAVE_UP = "handshake_gave_up"  # staged packets dropped after REKEY_ATTEMPT_TIME
    BUFFER_FULL = "buffer_full"  # a bounded write buffer was full
    WRITE_FAILED = "write_failed"
    DNS_MALFORMED = "dns_malformed"


# Drops that are normal operation, counted but not worth a warning in the logs.
QUIET_DROPS = frozenset({DropReason.MULTICAST})


class LocalError(Exception):
    """The caller used fzpoll wrongly (bad key, bad config value): not a network condition."""


class PacketDropped(Exception):
    """``count`` packets were dropped for ``reason`` in one pass (an entry of a TunnelError)."""

    def __init__(self, reason: str, count: int = 1) -> None:
        super().__init__(f"{count} dropped: {reason}")
        self.reason = reason
        self.count = count


class TunnelError(ExceptionGroup):
    """Everything that failed in one pass of the loop, reported together after the pass.

    Deliberately built only from a batch (:meth:`from_batch`), never from a single error, so no
    code path can use it to bail out of a batch early.
    """

    def __new__(cls, message: str, exceptions: Iterable[Exception]):  # type: ignore[override]
        return super().__new__(cls, message, list(exceptions))

    @classmethod
    def from_batch(
        cls, drops: Counter[str], failures: list[Exception]
    ) -> "TunnelError | None":
        """Build the pass's error from its drop counts and unexpected failures, or None if clean."""
        if not drops and not failures:
            return None
        entries: list[Exception] = [PacketDropped(str(r), n) for r, n in sorted(drops.items())]
        entries.extend(failures)
        total = sum(drops.values()) + len(failures)
        return cls(f"{total} packet(s) failed in one pass", entries)

    def counts(self) -> dict[str, int]:
        """Counts by kind: drop reasons and exception class names."""
        out: Counter[str] = Counter()
        for exc in self.exceptions:
            if isinstance(exc, PacketDropped):
                out[exc.reason] += exc.count
            else:
                out[type(exc).__name__] += 1
        return dict(out)
