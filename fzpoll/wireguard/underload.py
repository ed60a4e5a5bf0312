"""Denial-of-service mitigation for handshakes (whitepaper 5.3, wireguard-go's ratelimiter).

Every handshake message must carry a valid MAC1. When more handshake messages arrive than one
core should spend DH on, the responder is *under load* for UNDER_LOAD_AFTER_TIME: then a message
must also carry a MAC2 proving a recent cookie (else it is answered with a cookie reply and
dropped), and each source IP gets a token bucket of HANDSHAKE_RATE_PER_SOURCE per second.
"""

from __future__ import annotations

import ipaddress

from fzpoll.errors import DropReason as D
from fzpoll.wireguard.constants import (
    HANDSHAKE_BURST_PER_SOURCE,
    HANDSHAKE_RATE_PER_SOURCE,
    MAX_RATE_LIMITER_SOURCES,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES_PER_WINDOW,
    UNDER_LOAD_WINDOW,
)
from fzpoll.wireguard.handshake import CookieChecker
from fzpoll.wireguard.peer import Endpoint


def source_bytes(addr: Endpoint) -> bytes:
    """Packed IP and port of a socket address: what a cookie is bound to."""
    try:
        ip = ipaddress.ip_address(addr[0]).packed
    except ValueError:
        ip = str(addr[0]).encode()
    return ip + int(addr[1]).to_bytes(2, "big")


class LoadGuard:
    """Decides, per handshake message, whether the engine may spend a DH on it."""

    __slots__ = ("under_load_until", "_window_start", "_window_count", "_buckets")

    def __init__(self) -> None:
        self.under_load_until = float("-inf")
        self._window_start = float("-inf")
        self._window_count = 0
        self._buckets: dict[bytes, list[float]] = {}

    def is_under_load(self, now: float) -> bool:
        return now < self.under_load_until

    def check(self, cookies: CookieChecker, data: bytes, addr: Endpoint, now: float,
              replies: list[tuple[bytes, Endpoint]]) -> D | None:
        """MAC1 always; under load MAC2 (else a cookie reply is added to ``replies``) and the
        per-source rate limit. None means: go ahead."""
        if not cookies.check_mac1(data):
            return D.BAD_MAC1
        if now - self._window_start >= UNDER_LOAD_WINDOW:
            self._window_start = now
            self._window_count = 0
        self._window_count += 1
        if self._window_count > UNDER_LOAD_HANDSHAKES_PER_WINDOW:
            self.under_load_until = now + UNDER_LOAD_AFTER_TIME
        if now >= self.under_load_until:
            return None
        source = source_bytes(addr)
        if not cookies.check_mac2(data, source, now):
            replies.append((cookies.make_reply(data, source, now), addr))
            return D.BAD_MAC2
        return None if self._allow_source(source[:-2], now) else D.RATE_LIMITED

    def _allow_source(self, ip: bytes, now: float) -> bool:
        """Token bucket per source IP: HANDSHAKE_RATE_PER_SOURCE per second, small burst."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_LIMITER_SOURCES:
                self._buckets.clear()  # bounded memory; a flood resets to a fresh table
            bucket = self._buckets[ip] = [float(HANDSHAKE_BURST_PER_SOURCE), now]
        tokens = min(HANDSHAKE_BURST_PER_SOURCE, bucket[0] + (now - bucket[1]) * HANDSHAKE_RATE_PER_SOURCE)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True
