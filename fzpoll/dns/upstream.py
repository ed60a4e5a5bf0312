"""Checks of an upstream resolver's answer, shared by the stub and the gateway's lookups, sans-IO.

An answer is taken only if it comes from the address *and port* the query went to, carries the
query's ID (the caller's table lookup) and repeats its question (name, type, class). Together with
a fresh random source port per query (the IO shell's pool of sockets), an off-path attacker must
guess 16 bits of ID and ~15 bits of port at once instead of 16 bits.
"""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address

from dnslib import RCODE, DNSLabel, DNSQuestion, DNSRecord

Server = tuple[str, int]
Labels = tuple[bytes, ...]


def labels_of(name: DNSLabel) -> Labels:
    """A name as lower-case labels, for case-insensitive comparison (RFC 4343)."""
    return tuple(label.lower() for label in name.label)


def same_address(source: object, server: Server) -> bool:
    """Whether a socket address (host, port, ...) is ``server`` (IPv4-mapped IPv6 unmapped)."""
    try:
        host, port = source[0], source[1]  # type: ignore[index]
        ip = ip_address(host)
    except (TypeError, ValueError, IndexError, KeyError):
        return False
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return port == server[1] and str(ip) == server[0]


def parse_message(data: bytes) -> DNSRecord | None:
    try:
        return DNSRecord.parse(data)
    except Exception:  # dnslib raises assorted exceptions on garbage; all mean "unparsable"
        return None


def check_reply(reply: DNSRecord | None, question: DNSQuestion) -> str:
    """"ok", "garbage" (not an answer) or "mismatch" (another question: ignore, keep waiting)."""
    if reply is None or not reply.header.qr:
        return "garbage"
    if not reply.questions:
        # Some servers omit the question in error answers; a NOERROR without one is junk.
        return "ok" if reply.header.rcode != RCODE.NOERROR else "garbage"
    theirs = reply.questions[0]
    if (
        labels_of(question.qname) != labels_of(theirs.qname)
        or question.qtype != theirs.qtype
        or question.qclass != theirs.qclass
    ):
        return "mismatch"
    return "ok"
