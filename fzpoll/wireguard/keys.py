"""X25519 keys in the forms WireGuard users see them: base64 (wg genkey) and hex (the UAPI).

Key objects never print their secret: repr and str show only a fingerprint of the public part, so a
key that ends up in a log line or a traceback leaks nothing.
"""

from __future__ import annotations

import base64
import binascii
import re

from nacl.bindings import crypto_scalarmult_base

from fzpoll.wireguard.constants import KEY_SIZE
from fzpoll.wireguard.crypto import compare_digest
from fzpoll.errors import LocalError


def _decode(text: str) -> bytes:
    """Decode a 32-byte key from base64 (44 chars) or hex (64 chars)."""
    text = text.strip()
    try:
        if len(text) == 64:
            raw = bytes.fromhex(text)
        elif len(text) == 44:
            raw = base64.b64decode(text, validate=True)
        else:
            raise ValueError
    except (ValueError, binascii.Error):
        raise LocalError("key must be 32 bytes in base64 (44 chars) or hex (64 chars)") from None
    if len(raw) != KEY_SIZE:
        raise LocalError("key must be 32 bytes")
    return raw


# Any text that could be a key, whatever field it was pasted in: a run of 43 or more base64
# characters, standard or URL-safe alphabet (a 32-byte key is 43 plus "=", and 64 hex digits are
# such a run too; a file path mixes "/" with "-" or "_" and is left alone), or the repr of a bytes
# value of 32 or more bytes. One scan of the text, whatever the
# number of keys configured: no registry of secrets to keep, grow or forget.
_KEY_SHAPED = re.compile(r"[A-Za-z0-9+/]{43,}=*|[A-Za-z0-9_-]{43,}=*|b'(?:[^'\\]|\\.){32,}'|b\"(?:[^\"\\]|\\.){32,}\"")
REDACTED = "<redacted>"


def _mask(match: re.Match[str]) -> str:
    text = match.group()
    if not text.strip("A=") or not text.strip("0"):
        return text  # the all-zero key ("no preshared key") is no secret, and masking it is noise
    return REDACTED


def redact(text: str) -> str:
    """``text`` with everything that could be a key (see above) replaced by ``<redacted>``."""
    return _KEY_SHAPED.sub(_mask, text)


class _Key:
    __slots__ = ("raw",)
    secret = True

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_SIZE:
            raise LocalError("key must be 32 bytes")
        self.raw = bytes(raw)

    @classmethod
    def from_text(cls, text: str):
        return cls(_decode(text))

    @classmethod
    def from_base64(cls, text: str):
        return cls.from_text(text)

    @classmethod
    def from_hex(cls, text: str):
        if len(text.strip()) != 64:
            raise LocalError("hex key must be 64 characters")
        return cls(_decode(text))

    def hex(self) -> str:
        return self.raw.hex()

    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    def is_zero(self) -> bool:
        return not any(self.raw)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and compare_digest(self.raw, other.raw)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (hidden)>"

    __str__ = __repr__


class PublicKey(_Key):
    """A peer's static public key; public, so its base64 form may be shown."""

    __slots__ = ()
    secret = False

    def __repr__(self) -> str:
        return f"<PublicKey {self.short()}>"  # the short form: a full key never reaches a log

    __str__ = __repr__

    def short(self) -> str:
        """The first 8 base64 characters, the form used in log lines."""
        return self.base64()[:8]


class PrivateKey(_Key):
    """A static X25519 private key (clamped on generation, as wg genkey does)."""

    __slots__ = ("_public",)

    def __init__(self, raw: bytes) -> None:
        super().__init__(raw)
        self._public: PublicKey | None = None

    @classmethod
    def generate(cls, random_bytes) -> "PrivateKey":
        """A fresh key from ``random_bytes(n)`` (injected randomness, e.g. ``os.urandom``)."""
        raw = bytearray(random_bytes(KEY_SIZE))
        raw[0] &= 248
        raw[31] = (raw[31] & 127) | 64
        return cls(bytes(raw))

    @property
    def public_key(self) -> PublicKey:
        if self._public is None:
            self._public = PublicKey(crypto_scalarmult_base(self.raw))
        return self._public


class PresharedKey(_Key):
    """The optional symmetric key mixed into the handshake (zero when unset)."""

    __slots__ = ()

    @classmethod
    def zero(cls) -> "PresharedKey":
        return cls(bytes(KEY_SIZE))
