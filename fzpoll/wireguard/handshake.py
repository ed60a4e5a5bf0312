"""WireGuard's handshake messages (whitepaper 5.4.2 - 5.4.7) on top of the Noise core.

Builds and parses initiation (type 1), response (type 2) and cookie reply (type 3), and the MAC1 /
MAC2 / cookie machinery of 5.4.4 and 5.4.7, and the under-load guard that decides when a MAC2 is
required. Pure functions and small objects; the engine decides what to do with them.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from fzpoll.errors import DropReason as D
from fzpoll.wireguard import noise
from fzpoll.wireguard.constants import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    HANDSHAKE_BURST_PER_SOURCE,
    HANDSHAKE_RATE_PER_SOURCE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MESSAGE_HANDSHAKE_COOKIE,
    MESSAGE_HANDSHAKE_INITIATION,
    MESSAGE_HANDSHAKE_RESPONSE,
    MAX_RATE_LIMITER_SOURCES,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES_PER_WINDOW,
    UNDER_LOAD_WINDOW,
)
from fzpoll.wireguard.crypto import compare_digest, hash_, mac, tai64n, xaead_decrypt, xaead_encrypt

Endpoint = tuple[Any, ...]  # a socket address as recvfrom returns it: (host, port) or (host, port, flow, scope)
# Which of our addresses a peer's datagram arrived on, as the IO shell describes it (opaque to the
# engine, compared with ==; None: let the kernel pick the source).
Local = Any

_INITIATION_HEADER = struct.Struct("<I I")  # type (with 3 reserved zero bytes), sender index
_RESPONSE_HEADER = struct.Struct("<I I I")  # type, sender index, receiver index
_ZERO_MAC = bytes(16)
_compare = compare_digest


class Initiation:
    """A parsed and authenticated initiation (what the responder learns from message 1)."""

    __slots__ = ("sender_index", "remote_static", "remote_ephemeral", "timestamp", "state")

    def __init__(self, sender_index: int, remote_static: bytes, remote_ephemeral: bytes, timestamp: bytes, state):
        self.sender_index = sender_index
        self.remote_static = remote_static
        self.remote_ephemeral = remote_ephemeral
        self.timestamp = timestamp
        self.state = state

    def __repr__(self) -> str:
        return f"<Initiation sender={self.sender_index}>"


def build_initiation(
    static_private: bytes,
    remote_static: bytes,
    ephemeral_private: bytes,
    sender_index: int,
    wall_time: float,
) -> tuple[bytes, noise.SymmetricState]:
    """Message 1 without its MACs (116 bytes) and the handshake state to read message 2 with."""
    state = noise.SymmetricState()
    e, s, ts = noise.write_message1(state, static_private, remote_static, ephemeral_private, tai64n(wall_time))
    return _INITIATION_HEADER.pack(MESSAGE_HANDSHAKE_INITIATION, sender_index) + e + s + ts, state


def parse_initiation(static_private: bytes, static_public: bytes, message: bytes) -> Initiation:
    """Authenticate message 1 (length and MACs already checked). Raises CryptoError/InvalidPoint."""
    state = noise.SymmetricState()
    sender_index = int.from_bytes(message[4:8], "little")
    ephemeral = message[8:40]
    remote_static, timestamp = noise.read_message1(
        state, static_private, static_public, ephemeral, message[40:88], message[88:116]
    )
    return Initiation(sender_index, remote_static, ephemeral, timestamp, state)


def build_response(
    initiation: Initiation, ephemeral_private: bytes, psk: bytes, sender_index: int
) -> tuple[bytes, noise.SymmetricState]:
    """Message 2 without its MACs (60 bytes), and the final state (its split gives the keys)."""
    state = initiation.state
    e, empty = noise.write_message2(
        state, initiation.remote_ephemeral, initiation.remote_static, ephemeral_private, psk, b""
    )
    header = _RESPONSE_HEADER.pack(MESSAGE_HANDSHAKE_RESPONSE, sender_index, initiation.sender_index)
    return header + e + empty, state


def parse_response(
    state: noise.SymmetricState, static_private: bytes, ephemeral_private: bytes, psk: bytes, message: bytes
) -> noise.SymmetricState:
    """Authenticate message 2 on a copy of ``state`` (the original is untouched if it fails)."""
    trial = noise.SymmetricState.__new__(noise.SymmetricState)
    trial.ck, trial.h, trial.k = state.ck, state.h, state.k
    noise.read_message2(trial, static_private, ephemeral_private, message[12:44], psk, message[44:60])
    return trial


def response_indices(message: bytes) -> tuple[int, int]:
    """(sender index, receiver index) of a response."""
    _, sender, receiver = _RESPONSE_HEADER.unpack_from(message)
    return sender, receiver


class CookieChecker:
    """Our side of 5.4.7 as a responder: checks MAC1/MAC2 and makes cookie replies."""

    __slots__ = ("mac1_key", "cookie_key", "_secret", "_secret_at", "_random_bytes")

    def __init__(self, static_public: bytes, random_bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1 + static_public)
        self.cookie_key = hash_(LABEL_COOKIE + static_public)
        self._random_bytes = random_bytes
        self._secret = b""
        self._secret_at = float("-inf")

    def __repr__(self) -> str:
        return "<CookieChecker>"

    def check_mac1(self, message: bytes) -> bool:
        n = len(message)
        return _compare(mac(self.mac1_key, message[: n - 32]), message[n - 32 : n - 16])

    def _cookie(self, source: bytes, now: float) -> bytes:
        if now - self._secret_at > COOKIE_REFRESH_TIME:
            self._secret = self._random_bytes(32)
            self._secret_at = now
        return mac(self._secret, source)

    def check_mac2(self, message: bytes, source: bytes, now: float) -> bool:
        """``source`` is the packed source IP and port of the datagram."""
        n = len(message)
        return _compare(mac(self._cookie(source, now), message[: n - 16]), message[n - 16 :])

    def make_reply(self, message: bytes, source: bytes, now: float) -> bytes:
        """A cookie reply (type 3) to ``message``, for its sender to put MAC2 on its next try."""
        n = len(message)
        nonce = self._random_bytes(24)
        encrypted = xaead_encrypt(self.cookie_key, nonce, self._cookie(source, now), message[n - 32 : n - 16])
        receiver = message[4:8]  # the sender index of the message we answer
        return bytes([MESSAGE_HANDSHAKE_COOKIE, 0, 0, 0]) + receiver + nonce + encrypted


class CookieGenerator:
    """Our side of 5.4.7 as an initiator, one per peer: puts MAC1 (and MAC2 once we hold a cookie)."""

    __slots__ = ("mac1_key", "cookie_key", "_cookie", "_cookie_at", "_last_mac1")

    def __init__(self, remote_static: bytes) -> None:
        self.mac1_key = hash_(LABEL_MAC1 + remote_static)
        self.cookie_key = hash_(LABEL_COOKIE + remote_static)
        self._cookie = b""
        self._cookie_at = float("-inf")
        self._last_mac1 = b""

    def __repr__(self) -> str:
        return "<CookieGenerator>"

    def add_macs(self, body: bytes, now: float) -> bytes:
        mac1 = mac(self.mac1_key, body)
        self._last_mac1 = mac1
        with_mac1 = body + mac1
        if self._cookie and now - self._cookie_at < COOKIE_REFRESH_TIME:
            return with_mac1 + mac(self._cookie, with_mac1)
        return with_mac1 + _ZERO_MAC

    def consume_reply(self, message: bytes, now: float) -> bool:
        """Take the cookie from a reply to our last message; False if it does not decrypt."""
        if len(message) != COOKIE_REPLY_SIZE or not self._last_mac1:
            return False
        try:
            cookie = xaead_decrypt(self.cookie_key, message[8:32], message[32:64], self._last_mac1)
        except Exception:  # CryptoError: not for us, or forged
            return False
        self._cookie = cookie
        self._cookie_at = now
        return True


# ---------------------------------------------------------------------------------------------
# Under load
#
# Denial-of-service mitigation for handshakes (whitepaper 5.3, wireguard-go's ratelimiter).
# 
# Every handshake message must carry a valid MAC1. When more handshake messages arrive than one
# core should spend DH on, the responder is *under load* for UNDER_LOAD_AFTER_TIME: then a message
# must also carry a MAC2 proving a recent cookie (else it is answered with a cookie reply and
# dropped), and each source IP gets a token bucket of HANDSHAKE_RATE_PER_SOURCE per second.


def source_bytes(addr: Endpoint) -> bytes:
    """Packed IP and port of a socket address: what a cookie is bound to."""
    try:
        ip = ipaddress.ip_address(addr[0]).packed
    except ValueError:
        ip = str(addr[0]).encode()
    return ip + int(addr[1]).to_bytes(2, "big")


class LoadGuard:
    """Decides, per handshake message, whether the engine may spend a DH on it."""

    __slots__ = ("under_load_until", "_window_start", "_window_count", "_buckets", "_resets")

    def __init__(self) -> None:
        self.under_load_until = float("-inf")  # under load while now is before it (Engine.is_under_load)
        self._window_start = float("-inf")
        self._window_count = 0
        self._buckets: dict[bytes, list[float]] = {}
        self._resets = 0  # times the table was full and started afresh

    def bounds(self) -> dict[str, dict[str, int]]:
        """The per-source table: in use, limit, and how often it was full (``fzpoll show``)."""
        return {"rate_limiter_sources": {"used": len(self._buckets), "limit": MAX_RATE_LIMITER_SOURCES,
                                         "resets": self._resets}}

    def check(self, cookies: CookieChecker, data: bytes, addr: Endpoint, now: float,
              replies: list[tuple[bytes, Endpoint, Local]], local: Local = None) -> D | None:
        """MAC1 always; under load MAC2 (else a cookie reply from ``local`` is added to
        ``replies``) and the per-source rate limit. None means: go ahead."""
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
            replies.append((cookies.make_reply(data, source, now), addr, local))
            return D.BAD_MAC2
        return None if self._allow_source(source[:-2], now) else D.RATE_LIMITED

    def _allow_source(self, ip: bytes, now: float) -> bool:
        """Token bucket per source IP: HANDSHAKE_RATE_PER_SOURCE per second, small burst."""
        bucket = self._buckets.get(ip)
        if bucket is None:
            if len(self._buckets) >= MAX_RATE_LIMITER_SOURCES:
                self._buckets.clear()  # bounded memory; a flood resets to a fresh table
                self._resets += 1
            bucket = self._buckets[ip] = [float(HANDSHAKE_BURST_PER_SOURCE), now]
        tokens = min(HANDSHAKE_BURST_PER_SOURCE, bucket[0] + (now - bucket[1]) * HANDSHAKE_RATE_PER_SOURCE)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True
