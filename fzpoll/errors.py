"""fzpoll's error model.

Remote input never raises: the engine drops it with a :class:`DropReason` and counts it. Local
misuse raises :class:`LocalError`. The loop gathers everything that went wrong in one pass into
one :class:`TunnelError`, logged after the pass, so a bad packet never aborts a batch.
"""

from __future__ import annotations

import enum
from collections import Counter
from typing import Mapping


class DropKind(enum.Enum):
    """Where a drop happened: the four places a packet can be refused."""

    INBOUND = "inbound"  # a datagram from the network (the WireGuard engine's receive path)
    OUTBOUND = "outbound"  # an IP packet from the TUN device (the engine's send path)
    IO = "io"  # the loop could not write or keep a packet
    DNS = "dns"  # the DNS stub (queries from the tunnel, answers from upstream)


class DropReason(enum.StrEnum):
    """Why a datagram or packet was dropped: a closed set; the value is the name used in counters
    and logs, :attr:`kind` says which path dropped it."""

    # inbound
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
    NO_PRIVATE_KEY = "no_private_key"
    CONTROL_MALFORMED = "control_malformed"  # in-tunnel control packet that does not parse
    CONTROL_UNEXPECTED = "control_unexpected"  # a control event this side does not take
    NAT_TABLE_FULL = "nat_table_full"  # gateway: a packet from a client needing a new session
    NAT_UNSUPPORTED = "nat_unsupported"  # gateway: not TCP, UDP or ICMP echo, or too short
    NAT_NO_MAPPING = "nat_no_mapping"  # gateway: to a proxy address with no (same-family) real one
    # outbound
    NO_ROUTE = "no_route"  # outgoing packet with no peer for its destination
    MULTICAST = "multicast"  # outgoing multicast with no peer (the kernel's own IPv6 chatter)
    NO_ENDPOINT = "no_endpoint"
    STAGED_QUEUE_FULL = "staged_queue_full"  # the peer's own bound: its oldest staged packet gave way
    STAGED_TOTAL_FULL = "staged_total_full"  # the bound over all peers: the new packet is dropped
    HANDSHAKE_GAVE_UP = "handshake_gave_up"  # staged packets dropped after REKEY_ATTEMPT_TIME
    RESOURCE_BUFFER_FULL = "resource_buffer_full"  # client: packets waiting for DomainStatus Active
    BAD_TUN_FRAME = "bad_tun_frame"  # a TUN read whose virtio-net header or super-packet is malformed
    # io
    BUFFER_FULL = "buffer_full"  # a bounded write buffer was full
    WRITE_FAILED = "write_failed"
    # dns
    DNS_MALFORMED = "dns_malformed"
    DNS_REPLY_TOO_SHORT = "dns_reply_too_short"
    DNS_REPLY_UNKNOWN_ID = "dns_reply_unknown_id"
    DNS_REPLY_WRONG_TRANSPORT = "dns_reply_wrong_transport"
    DNS_REPLY_WRONG_SOURCE = "dns_reply_wrong_source"
    DNS_REPLY_QUESTION_MISMATCH = "dns_reply_question_mismatch"
    DNS_UNENCODABLE_REPLY = "dns_unencodable_reply"
    DNS_UPSTREAM_MISMATCH = "dns_upstream_mismatch"  # gateway lookup: wrong address/port, ID or question
    DNS_SHED = "dns_shed"  # beyond the DNS queries one pass may parse (a local query flood)

    @property
    def kind(self) -> DropKind:
        return _KINDS[self]


def _kinds() -> dict[DropReason, DropKind]:
    """Each reason's kind, from where it stands in the class body (checked complete by the tests)."""
    kinds = {}
    boundaries = [(DropReason.TOO_SHORT, DropKind.INBOUND), (DropReason.NO_ROUTE, DropKind.OUTBOUND),
                  (DropReason.BUFFER_FULL, DropKind.IO), (DropReason.DNS_MALFORMED, DropKind.DNS)]
    kind = DropKind.INBOUND
    for reason in DropReason:
        for first, section in boundaries:
            if reason is first:
                kind = section
        kinds[reason] = kind
    return kinds


_KINDS = _kinds()

# Drops that are normal operation, counted but not worth a warning in the logs.
QUIET_DROPS = frozenset({DropReason.MULTICAST})


class LocalError(Exception):
    """The caller used fzpoll wrongly (bad key, bad config value): not a network condition."""


class TunnelError(Exception):
    """Everything that failed in one pass of the loop, reported together after the pass.

    Drops are counted by reason (no object per drop: a flood costs a dict increment per packet);
    ``exceptions`` holds the unexpected failures (a bug on one packet, an OSError of one read).
    Deliberately built only from a whole batch (:meth:`from_batch`), never from a single error, so
    no code path can use it to bail out of a batch early.
    """

    def __init__(self, drops: Mapping[str, int], exceptions: list[Exception]) -> None:
        self.drops = dict(drops)
        self.exceptions = exceptions
        self.total = sum(self.drops.values()) + len(exceptions)
        self.message = f"{self.total} packet(s) failed in one pass"
        super().__init__(self.message)

    @classmethod
    def from_batch(cls, drops: Mapping[str, int], failures: list[Exception]) -> "TunnelError | None":
        """The pass's error from its drop counts and unexpected failures, or None if clean."""
        if not drops and not failures:
            return None
        return cls(drops, failures)

    def counts(self) -> dict[str, int]:
        """Counts by kind: drop reasons and exception class names."""
        out: Counter[str] = Counter({str(reason): n for reason, n in self.drops.items() if n})
        for exc in self.exceptions:
            out[type(exc).__name__] += 1
        return dict(out)
