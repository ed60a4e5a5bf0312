"""Which libsodium seals and opens transport data, checked against known answers before use.

The transport path calls libsodium's ``crypto_aead_chacha20poly1305_ietf_encrypt/decrypt``
straight through cffi (no wrapper: see the engine). Two libraries may be at hand: the one PyNaCl's
compiled module carries (PyPI's wheel bundles a copy; Debian's python3-nacl links the shared system
library), and the shared system libsodium, which we can load ourselves with ``dlopen`` (cffi's ABI
mode through ``_cffi_backend``, the runtime PyNaCl itself needs: Debian's python3-cffi-backend has
it; neither the ``cffi`` package nor pycparser is needed).

Measured on our machines (Python 3.11, 1420-byte packet, one call): PyNaCl 1.6.2's bundled copy
1.70 us, the system's 1.0.18 through dlopen 2.00 us; on 64 KiB both 45 us (1.7 cycles/byte): the
same vectorised ChaCha20, and cffi's API mode costs 0.3 us less per call than its ABI mode. Both
pick their vectorised code in ``sodium_init()``: before it libsodium runs its portable reference
code, 3.5 us per packet (5.4 cycles/byte), so this module makes sure it has run on the library it
hands out. Hence ``auto`` is PyNaCl's module, whatever it links; ``system`` (the shared library
through dlopen, or PyNaCl's module if that is what it links) and ``bundled`` (PyNaCl's module) are
there to compare them (``FZPOLL_SODIUM``, read by the IO side: :mod:`fzpoll.device`).

A library loaded with dlopen must reproduce the AEAD known answers (RFC 8439 section 2.8.2, and a
1419-byte packet sealed as PyNaCl's library seals it, opened, a forged tag refused) before it is
used: on any mismatch we fall back to PyNaCl's and warn once.

Loading a library is all this module does to the process: no fd, no clock, no environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import _cffi_backend
import nacl
from nacl._sodium import ffi, lib

# Without sodium_init() libsodium runs its portable code, 2x slower per packet: make sure.
if lib.sodium_init() < 0:
    raise ImportError("libsodium cannot initialise (sodium_init failed)")

log = logging.getLogger("fzpoll.wireguard.sodium")

AUTO, BUNDLED, SYSTEM = "auto", "bundled", "system"
CHOICES = (AUTO, BUNDLED, SYSTEM)
# sonames of the shared libsodium: 1.0.19 and later, then 1.0.12-1.0.18 (Debian 12's 1.0.18)
SYSTEM_SONAMES = ("libsodium.so.26", "libsodium.so.23")
_RTLD_NOW = 2
_RTLD_NOLOAD = 4
_NULL = ffi.NULL

Seal = Callable[..., int]  # (c, clen_p, m, mlen, ad, adlen, nsec, npub, k) -> 0
Open = Callable[..., int]  # (m, mlen_p, nsec, c, clen, ad, adlen, npub, k) -> 0, or -1 on a bad tag


@dataclass(frozen=True)
class Backend:
    """One libsodium's transport AEAD: ``kind`` is ``system`` or ``bundled`` (whose code runs),
    ``via`` how we call it (``pynacl``: PyNaCl's compiled module; ``dlopen``: cffi ABI mode)."""

    kind: str
    via: str
    library: str  # the soname, or "PyNaCl x.y.z"
    version: str  # libsodium's version where it says, else ""
    seal: Seal = field(repr=False, compare=False)
    open: Open = field(repr=False, compare=False)
    handle: Any = field(default=None, repr=False, compare=False)  # the dlopen handle: closed when collected

    def describe(self) -> str:
        """One short line for ``fzpoll show`` and the logs."""
        version = f" {self.version}" if self.version else ""
        return f"{self.kind} ({self.library}{version}, via {self.via})"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "via": self.via, "library": self.library, "version": self.version}


# RFC 8439 section 2.8.2: the AEAD_CHACHA20_POLY1305 test vector (ciphertext then tag).
_KAT_KEY = bytes(range(0x80, 0xA0))
_KAT_NONCE = bytes.fromhex("070000004041424344454647")
_KAT_AD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_KAT_PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
              b" sunscreen would be it.")
_KAT_SEALED = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
    "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b61161ae10b594f09e26a7e902ecbd0600691")
# A packet as the transport path sees them: long enough for the vectorised (AVX2, 512-byte) code,
# odd-sized so that a partial block and the length encoding are exercised too.
_PACKET_PLAIN = bytes((i * 7 + 3) & 0xFF for i in range(1419))
_PACKET_NONCE = bytes(4) + (0x0123456789).to_bytes(8, "little")


def _seal_with(backend: Backend, plain: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
    out = ffi.new("unsigned char[]", len(plain) + 16)
    if backend.seal(out, _NULL, plain, len(plain), ad, len(ad), _NULL, nonce, key):
        return b""
    return ffi.buffer(out)[:]


def _opens(backend: Backend, sealed: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes | None:
    out = ffi.new("unsigned char[]", max(len(sealed) - 16, 1))
    if backend.open(out, _NULL, _NULL, sealed, len(sealed), ad, len(ad), nonce, key):
        return None
    return ffi.buffer(out)[:len(sealed) - 16]


def agrees(backend: Backend, reference: Backend) -> bool:
    """Does ``backend`` give the RFC 8439 answer, and seal a packet as ``reference`` does (and
    open both, and refuse a forged tag)?"""
    try:
        if _seal_with(backend, _KAT_PLAIN, _KAT_AD, _KAT_NONCE, _KAT_KEY) != _KAT_SEALED:
            return False
        if _opens(backend, _KAT_SEALED, _KAT_AD, _KAT_NONCE, _KAT_KEY) != _KAT_PLAIN:
            return False
        key = bytes(range(32))
        sealed = _seal_with(backend, _PACKET_PLAIN, b"", _PACKET_NONCE, key)
        if sealed != _seal_with(reference, _PACKET_PLAIN, b"", _PACKET_NONCE, key):
            return False
        forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
        return _opens(backend, sealed, b"", _PACKET_NONCE, key) == _PACKET_PLAIN \
            and _opens(backend, forged, b"", _PACKET_NONCE, key) is None
    except Exception:  # a library that cannot even be called is as wrong as one that miscomputes
        return False


def _function_types() -> tuple[Any, Any, Any, Any]:
    """The C types of sodium_init, sodium_version_string, and the IETF AEAD's encrypt and
    decrypt, built with ``_cffi_backend`` (what ``cffi.FFI.cdef`` would make, without pycparser)."""
    b = _cffi_backend
    int_, uchar_p = b.new_primitive_type("int"), b.new_pointer_type(b.new_primitive_type("unsigned char"))
    ull = b.new_primitive_type("unsigned long long")
    ull_p = b.new_pointer_type(ull)
    char_p = b.new_pointer_type(b.new_primitive_type("char"))
    seal = b.new_function_type((uchar_p, ull_p, uchar_p, ull, uchar_p, ull, uchar_p, uchar_p, uchar_p), int_, False)
    open_ = b.new_function_type((uchar_p, ull_p, uchar_p, uchar_p, ull, uchar_p, ull, uchar_p, uchar_p), int_, False)
    return b.new_function_type((), int_, False), b.new_function_type((), char_p, False), seal, open_


def _already_loaded() -> str | None:
    """The soname of a shared libsodium this process has loaded already: PyNaCl's module links it
    (Debian's python3-nacl), as nothing else in fzpoll loads one before :func:`choose`. Asked
    with libc's ``dlopen(RTLD_NOLOAD)``, which loads nothing (``_cffi_backend.load_library`` with
    that flag segfaulted here, cffi 2.0.0, for a library that exists but is not loaded)."""
    b = _cffi_backend
    void_p = b.new_pointer_type(b.new_void_type())
    dlopen_t = b.new_function_type((b.new_pointer_type(b.new_primitive_type("char")), b.new_primitive_type("int")),
                                   void_p, False)
    dlclose_t = b.new_function_type((void_p,), b.new_primitive_type("int"), False)
    try:
        libc = b.load_library(None, _RTLD_NOW)
        dlopen, dlclose = libc.load_function(dlopen_t, "dlopen"), libc.load_function(dlclose_t, "dlclose")
    except (OSError, AttributeError, KeyError):
        return None
    for soname in SYSTEM_SONAMES:
        handle = dlopen(soname.encode(), _RTLD_NOW | _RTLD_NOLOAD)
        if handle != _NULL:
            dlclose(handle)
            return soname
    return None


def _load_system(sonames: tuple[str, ...] = SYSTEM_SONAMES) -> Backend | None:
    """dlopen the first shared libsodium of ``sonames`` there is, initialised."""
    init_t, version_t, seal_t, open_t = _function_types()
    for soname in sonames:
        try:
            handle = _cffi_backend.load_library(soname, _RTLD_NOW)
            if handle.load_function(init_t, "sodium_init")() < 0:
                continue
            version = _cffi_backend.string(handle.load_function(version_t, "sodium_version_string")())
            return Backend(SYSTEM, "dlopen", soname, version.decode("ascii", "replace"),
                           handle.load_function(seal_t, "crypto_aead_chacha20poly1305_ietf_encrypt"),
                           handle.load_function(open_t, "crypto_aead_chacha20poly1305_ietf_decrypt"), handle)
        except (OSError, AttributeError, KeyError, TypeError):
            continue
    return None


PYNACL = Backend(BUNDLED, "pynacl", f"PyNaCl {nacl.__version__}", "",
                 lib.crypto_aead_chacha20poly1305_ietf_encrypt, lib.crypto_aead_chacha20poly1305_ietf_decrypt)
_linked: list[str | None] = []  # what _already_loaded() said at the first choose(), before we load any
_chosen: dict[str, Backend] = {}


def pick(preference: str, pynacl: Backend, system: Backend | None, pynacl_is_system: bool) -> Backend:
    """The backend for ``preference`` among those found (``system``: None unless it was asked
    for or PyNaCl's module links it): PyNaCl's module unless ``system`` asks for a shared library
    it does not link, and that library gives the known answers."""
    if pynacl_is_system and system is not None:
        # one library in the process: call it through PyNaCl's module (API mode, the cheaper call)
        return Backend(SYSTEM, "pynacl", system.library, system.version, pynacl.seal, pynacl.open, system.handle)
    if preference != SYSTEM:
        return pynacl
    if system is None:
        log.warning("FZPOLL_SODIUM=system: no shared libsodium found: using PyNaCl's",
                    extra={"fields": {"sonames": ",".join(SYSTEM_SONAMES)}})
        return pynacl
    if not agrees(system, pynacl):
        log.warning("the system libsodium fails the AEAD known answers: using PyNaCl's",
                    extra={"fields": {"library": system.library, "version": system.version}})
        return pynacl
    return system


def choose(preference: str | None = AUTO) -> Backend:
    """The transport AEAD to use for ``preference`` (``auto``, ``bundled``, ``system``; None is
    ``auto``, anything else too, warned), decided once per preference per process. The shared
    library is loaded only when asked for, or when PyNaCl's module has loaded it already."""
    if preference not in CHOICES:
        if preference is not None:
            log.warning("FZPOLL_SODIUM: unknown choice, using auto", extra={"fields": {"given": preference[:40], "choices": ",".join(CHOICES)}})
        preference = AUTO
    backend = _chosen.get(preference)
    if backend is None:
        if not _linked:
            _linked.append(_already_loaded())
        linked = _linked[0]
        if linked is not None:
            system = _load_system((linked,))
        else:
            system = _load_system() if preference == SYSTEM else None
        backend = _chosen[preference] = pick(preference, PYNACL, system, linked is not None)
    return backend
