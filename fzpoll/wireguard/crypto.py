"""The whitepaper's primitives (section 5.4): HASH, MAC, HMAC, KDF, AEAD, XAEAD, DH, TAI64N.

Thin, allocation-light wrappers over BLAKE2s and libsodium (pynacl's bindings, which skip the
argument-checking layer of nacl.secret). Pure functions: no clock, no randomness.

BLAKE2s comes from CPython's built-in ``_blake2`` (what hashlib itself re-exports) and HMAC is
RFC 2104 written out: ``hashlib`` and ``hmac`` load OpenSSL's libcrypto at import, 3.5 MiB of
resident memory the daemon would carry for nothing (hmac.new with a BLAKE2s constructor runs in
Python anyway).
"""

from __future__ import annotations

try:
    from _blake2 import blake2s as _blake2s
except ImportError:  # an interpreter without the built-in module
    from hashlib import blake2s as _blake2s
try:
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

import nacl.exceptions
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)

from fzpoll.wireguard.constants import TAI64_BASE, TAI64N_NANOSECOND_MASK

_BLOCK_SIZE = 64  # BLAKE2s block, the HMAC key length
_IPAD = bytes(x ^ 0x36 for x in range(256))  # translate tables, as the stdlib's hmac
_OPAD = bytes(x ^ 0x5C for x in range(256))
_ZERO_NONCE_PREFIX = b"\x00\x00\x00\x00"

CryptoError = nacl.exceptions.CryptoError
"""Raised by libsodium on a bad AEAD tag (and by DH on a low-order point, see :func:`dh`)."""


class InvalidPoint(Exception):
    """The peer's public value is a low-order point: the DH result would be all zeros."""


def hash_(data: bytes) -> bytes:
    """HASH(input): BLAKE2s, 32 bytes."""
    return _blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, input): keyed BLAKE2s, 16 bytes."""
    return _blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC(key, input): HMAC-BLAKE2s, 32 bytes (RFC 2104)."""
    if len(key) > _BLOCK_SIZE:
        key = _blake2s(key).digest()
    key = key.ljust(_BLOCK_SIZE, b"\0")
    return _blake2s(key.translate(_OPAD) + _blake2s(key.translate(_IPAD) + data).digest()).digest()


_hmac = hmac_


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = _hmac(key, data)
    return _hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    t2 = _hmac(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    t2 = _hmac(t0, t1 + b"\x02")
    t3 = _hmac(t0, t2 + b"\x03")
    return t1, t2, t3


def nonce(counter: int) -> bytes:
    """The 96-bit AEAD nonce: 32 zero bits then the 64-bit little-endian counter."""
    return _ZERO_NONCE_PREFIX + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, auth: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, auth, nonce(counter), key)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, auth: bytes) -> bytes:
    """Raises :data:`CryptoError` if the tag does not verify."""
    return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, auth, nonce(counter), key)


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, auth: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, auth, nonce24, key)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, auth: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, auth, nonce24, key)


def dh(private: bytes, public: bytes) -> bytes:
    """DH(private, public): X25519. Raises :class:`InvalidPoint` for a low-order public value."""
    try:
        return crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError:  # libsodium refuses an all-zero result
        raise InvalidPoint() from None


def dh_public(private: bytes) -> bytes:
    return crypto_scalarmult_base(private)


def tai64n(unix_time: float) -> bytes:
    """TAI64N timestamp of ``unix_time``, with nanoseconds masked as wireguard-go does."""
    seconds = int(unix_time)
    nanos = int((unix_time - seconds) * 1e9) & TAI64N_NANOSECOND_MASK
    return (TAI64_BASE + seconds).to_bytes(8, "big") + nanos.to_bytes(4, "big")
