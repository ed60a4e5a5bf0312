"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, the handshake pattern under WireGuard (whitepaper 5.4).

The pattern is written once here with prologue, payloads, static, ephemeral and psk as parameters,
so it can be checked byte for byte against the Cacophony known-answer vector; ``handshake.py`` wraps
it into WireGuard's messages (identifier as prologue, TAI64N as payload, MACs, indices).

    <- s
    ...
    -> e, es, s, ss      (message 1: initiator)
    <- e, ee, se, psk    (message 2: responder)
"""

from __future__ import annotations

from fzpoll.wireguard.constants import CONSTRUCTION, IDENTIFIER
from fzpoll.wireguard.crypto import aead_decrypt, aead_encrypt, dh, dh_public, hash_, kdf1, kdf2, kdf3

_ZERO_KEY = bytes(32)


class SymmetricState:
    """The chaining key ``ck``, handshake hash ``h`` and current cipher key ``k`` of a handshake."""

    __slots__ = ("ck", "h", "k")

    def __init__(self, prologue: bytes = IDENTIFIER, construction: bytes = CONSTRUCTION) -> None:
        self.ck = hash_(construction)
        self.h = hash_(self.ck + prologue)
        self.k = _ZERO_KEY

    def __repr__(self) -> str:
        return "<SymmetricState (hidden)>"

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = kdf2(self.ck, ikm)

    def mix_ephemeral(self, public: bytes) -> None:
        """The ``e`` token of a psk pattern: MixHash and MixKey of the ephemeral public key."""
        self.ck = kdf1(self.ck, public)
        self.h = hash_(self.h + public)

    def mix_key_and_hash(self, psk: bytes) -> None:
        self.ck, temp_h, self.k = kdf3(self.ck, psk)
        self.mix_hash(temp_h)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = aead_encrypt(self.k, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Raises crypto.CryptoError when the tag does not verify."""
        plaintext = aead_decrypt(self.k, 0, ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder key, responder-to-initiator key)."""
        return kdf2(self.ck, b"")


def write_message1(
    state: SymmetricState, static_private: bytes, remote_static: bytes, ephemeral_private: bytes, payload: bytes
) -> tuple[bytes, bytes, bytes]:
    """Initiator: -> e, es, s, ss. Returns (ephemeral public, encrypted static, encrypted payload)."""
    state.mix_hash(remote_static)  # pre-message <- s
    ephemeral_public = dh_public(ephemeral_private)
    state.mix_ephemeral(ephemeral_public)
    state.mix_key(dh(ephemeral_private, remote_static))
    encrypted_static = state.encrypt_and_hash(dh_public(static_private))
    state.mix_key(dh(static_private, remote_static))
    return ephemeral_public, encrypted_static, state.encrypt_and_hash(payload)


def read_message1(
    state: SymmetricState,
    static_private: bytes,
    static_public: bytes,
    ephemeral_public: bytes,
    encrypted_static: bytes,
    encrypted_payload: bytes,
    psk_lookup=None,
) -> tuple[bytes, bytes]:
    """Responder: reads message 1. Returns (initiator static public, payload).

    Raises crypto.CryptoError (bad tag) or crypto.InvalidPoint (low-order point).
    """
    state.mix_hash(static_public)
    state.mix_ephemeral(ephemeral_public)
    state.mix_key(dh(static_private, ephemeral_public))
    remote_static = state.decrypt_and_hash(encrypted_static)
    state.mix_key(dh(static_private, remote_static))
    return remote_static, state.decrypt_and_hash(encrypted_payload)


def write_message2(
    state: SymmetricState,
    remote_ephemeral: bytes,
    remote_static: bytes,
    ephemeral_private: bytes,
    psk: bytes,
    payload: bytes,
) -> tuple[bytes, bytes]:
    """Responder: <- e, ee, se, psk. Returns (ephemeral public, encrypted payload)."""
    ephemeral_public = dh_public(ephemeral_private)
    state.mix_ephemeral(ephemeral_public)
    state.ck = kdf1(state.ck, dh(ephemeral_private, remote_ephemeral))
    state.ck = kdf1(state.ck, dh(ephemeral_private, remote_static))
    state.mix_key_and_hash(psk)
    return ephemeral_public, state.encrypt_and_hash(payload)


def read_message2(
    state: SymmetricState,
    static_private: bytes,
    ephemeral_private: bytes,
    remote_ephemeral: bytes,
    psk: bytes,
    encrypted_payload: bytes,
) -> bytes:
    """Initiator: reads message 2. Returns the payload; raises like :func:`read_message1`."""
    state.mix_ephemeral(remote_ephemeral)
    state.ck = kdf1(state.ck, dh(ephemeral_private, remote_ephemeral))
    state.ck = kdf1(state.ck, dh(static_private, remote_ephemeral))
    state.mix_key_and_hash(psk)
    return state.decrypt_and_hash(encrypted_payload)
