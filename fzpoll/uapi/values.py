"""UAPI values, parsed and printed as wireguard-go does (Go's strconv and net/netip). Sans-IO.

Parsing is strict in Go's way: leading zeros and upper-case hex are fine in numbers and keys,
signs and spaces are not; IPv4 octets with a leading zero are refused (netip). Every parser
raises :class:`UapiError` (EINVAL) and never echoes the value it refused: a value may be a key
pasted into the wrong line.

``allowed_ip`` lines are the bulk of a big configuration (130,560 of them in wireguard-go's own
test): :func:`parse_prefix_key` parses the common forms by hand into the routing table's
``(version, address, length)`` tuple, without building ipaddress objects.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from typing import Callable

from fzpoll.wireguard.allowedips import Prefix, make_prefix, split_prefix
from fzpoll.wireguard.peer import Endpoint

__all__ = [
    "UapiError", "clamp", "format_endpoint", "format_prefix_key", "parse_endpoint",
    "parse_hex_key", "parse_prefix", "parse_prefix_key", "parse_uint",
]

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
_SIGNED_DIGITS = re.compile(r"[+-]?[0-9]+")  # Go's strconv.Atoi (netip.ParsePrefix bits)
_V6_CHARS = re.compile(r"[0-9a-fA-F:]+")  # the fast IPv6 path: no dotted tail, no zone


class UapiError(Exception):
    """A set request failed with ``errno`` (positive, as in :mod:`errno`); the wire shows -errno.

    A ``UapiHost`` raises it from ``set_listen_port`` / ``set_fwmark`` (e.g. EADDRINUSE).
    """

    def __init__(self, code: int, message: str = "") -> None:
        self.errno = abs(int(code))
        super().__init__(message or errno.errorcode.get(self.errno, f"errno {self.errno}"))


def parse_uint(value: str, bits: int) -> int:
    """``strconv.ParseUint(value, 10, bits)``: decimal digits only, leading zeros allowed."""
    if not _DIGITS.fullmatch(value):
        raise UapiError(errno.EINVAL)
    digits = value.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) >> bits:
        raise UapiError(errno.EINVAL)
    return int(digits)


def parse_hex_key(value: str) -> bytes:
    """A 32-byte key in hex, either case (Go's hex.DecodeString of exactly 64 characters)."""
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(errno.EINVAL)
    return bytes.fromhex(value)


def clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as wireguard-go applies to every non-zero private key it is given."""
    if not any(raw):
        return raw
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``netip.ParseAddr`` without a zone: an IPv4 or IPv6 literal."""
    if "%" in text:
        raise UapiError(errno.EINVAL)
    try:
        if ":" in text:
            return ipaddress.IPv6Address(text)
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise UapiError(errno.EINVAL) from None


def _ntop6(addr: ipaddress.IPv6Address) -> str:
    """An IPv6 address as glibc's inet_ntop writes it (what ``recvfrom`` reports): RFC 5952,
    with a dotted tail for IPv4-mapped (``::ffff:a.b.c.d``) and IPv4-compatible addresses."""
    value = int(addr)
    if value >> 32 == 0xFFFF or (value >> 32 == 0 and value >> 16 != 0):
        return ("::ffff:" if value >> 32 else "::") + str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return addr.compressed


def parse_endpoint(value: str, zone_exists: Callable[[str], bool] | None = None) -> Endpoint:
    """``a.b.c.d:port`` or ``[v6]:port``, stored as recvfrom reports it; EINVAL otherwise.

    IPv4 gives ``(host, port)``, IPv6 ``(host, port, 0, 0)`` with the host as ``inet_ntop``
    writes it, so that roaming compares equal. An IPv6 zone is dropped if it is a number or an
    interface ``zone_exists`` knows, and refused otherwise (``[fe80::1%eth0]:5`` without an
    eth0 is EINVAL), as wireguard-go's ResolveUDPAddr does.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text:
        raise UapiError(errno.EINVAL)
    bracketed = host.startswith("[")
    if bracketed:
        if len(host) < 2 or not host.endswith("]"):
            raise UapiError(errno.EINVAL)
        host = host[1:-1]
        if "%" in host:
            host, _, zone = host.partition("%")
            if not zone or ":" not in host or not (
                    (zone.isdigit() and zone.isascii()) or (zone_exists is not None and zone_exists(zone))):
                raise UapiError(errno.EINVAL)
    addr = _parse_addr(host)
    port = parse_uint(port_text, 16)
    if bracketed != (addr.version == 6):
        raise UapiError(errno.EINVAL)  # brackets only and always around IPv6
    if addr.version == 4:
        return (str(addr), port)
    return (_ntop6(addr), port, 0, 0)  # type: ignore[arg-type]


def _v4_int(text: str) -> int:
    parts = text.split(".")
    if len(parts) != 4:
        raise UapiError(errno.EINVAL)
    value = 0
    for part in parts:
        if not (0 < len(part) <= 3 and part.isdigit() and part.isascii()) or (part[0] == "0" and len(part) > 1):
            raise UapiError(errno.EINVAL)
        octet = int(part)
        if octet > 255:
            raise UapiError(errno.EINVAL)
        value = value << 8 | octet
    return value


def _v6_int(text: str) -> int:
    if not _V6_CHARS.fullmatch(text):
        return int(_parse_addr(text))  # a dotted tail (::ffff:1.2.3.4) or an error
    head, sep, tail = text.partition("::")
    if sep:
        left = head.split(":") if head else []
        right = tail.split(":") if tail else []
        if "::" in tail or len(left) + len(right) > 7:
            raise UapiError(errno.EINVAL)
        groups = left + ["0"] * (8 - len(left) - len(right)) + right
    else:
        groups = text.split(":")
        if len(groups) != 8:
            raise UapiError(errno.EINVAL)
    value = 0
    for group in groups:
        if not 0 < len(group) <= 4:
            raise UapiError(errno.EINVAL)
        value = value << 16 | int(group, 16)
    return value


def parse_prefix_key(value: str) -> Prefix:
    """``netip.ParsePrefix`` into the routing table's key (:func:`make_prefix`); EINVAL otherwise."""
    addr_text, sep, bits_text = value.rpartition("/")
    if not sep or len(bits_text) > 20:
        raise UapiError(errno.EINVAL)
    if not (bits_text.isdigit() and bits_text.isascii()) and not _SIGNED_DIGITS.fullmatch(bits_text):
        raise UapiError(errno.EINVAL)
    bits = int(bits_text)
    if ":" in addr_text:
        version, width, addr = 6, 128, _v6_int(addr_text)
    else:
        version, width, addr = 4, 32, _v4_int(addr_text)
    if not 0 <= bits <= width:
        raise UapiError(errno.EINVAL)
    shift = width - bits
    return make_prefix(version, addr >> shift << shift, bits)


# The fast path: canonical octets and lengths by table lookup (anything else takes the exact path).
_OCTETS = {str(i).encode(): i for i in range(256)}
_LENGTHS = {str(i).encode(): i for i in range(129)}
_V6_BYTES = re.compile(rb"[0-9a-fA-F:]+")


def fast_prefix_key(text: bytes) -> Prefix | None:
    """The key of a prefix in its common forms (``a.b.c.d/n``, ``x:y::z/n``), or None when the
    text needs :func:`parse_prefix_key` (unusual forms and every invalid one)."""
    addr, sep, bits_text = text.rpartition(b"/")
    bits = _LENGTHS.get(bits_text)
    if bits is None or not sep:
        return None
    if b":" not in addr:
        parts = addr.split(b".")
        if len(parts) != 4 or bits > 32:
            return None
        octets = _OCTETS
        try:
            value = octets[parts[0]] << 24 | octets[parts[1]] << 16 | octets[parts[2]] << 8 | octets[parts[3]]
        except KeyError:
            return None
        shift = 32 - bits
        return (value >> shift << shift) << 9 | bits << 1
    if not _V6_BYTES.fullmatch(addr):
        return None
    head, sep, tail = addr.partition(b"::")
    left = head.split(b":") if head else []
    right = tail.split(b":") if tail else []
    missing = 8 - len(left) - len(right)
    if (missing < 1 if sep else missing != 0) or b"::" in tail:
        return None
    value = 0
    for group in left:
        if not 0 < len(group) <= 4:
            return None
        value = value << 16 | int(group, 16)
    value <<= 16 * missing
    for group in right:
        if not 0 < len(group) <= 4:
            return None
        value = value << 16 | int(group, 16)
    shift = 128 - bits
    return (value >> shift << shift) << 9 | bits << 1 | 1


def parse_prefix(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``netip.ParsePrefix`` as an ipaddress network, host bits masked. Raises UapiError."""
    version, addr, bits = split_prefix(parse_prefix_key(value))
    if version == 4:
        return ipaddress.IPv4Network((addr, bits))
    return ipaddress.IPv6Network((addr, bits))


def _format_addr(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as Go's netip prints it: RFC 5952, dotted only for IPv4-mapped IPv6."""
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is not None:
            scope = addr.scope_id
            return f"::ffff:{mapped}" + (f"%{scope}" if scope else "")
    return str(addr)


def format_endpoint(endpoint: Endpoint) -> str:
    """An endpoint as wireguard-go prints it: ``a.b.c.d:port`` or ``[v6]:port``."""
    host, port = str(endpoint[0]), int(endpoint[1])
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = _format_addr(addr)
    return f"[{text}]:{port}" if addr.version == 6 else f"{text}:{port}"


def format_prefix_key(prefix: Prefix) -> str:
    """A routing-table prefix as Go's netip prints it (``get=1``'s ``allowed_ip`` value)."""
    version, addr, bits = split_prefix(prefix)
    if version == 4:
        return f"{addr >> 24}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}/{bits}"
    return f"{_format_addr(ipaddress.IPv6Address(addr))}/{bits}"
