"""Firezone's in-tunnel control protocol ("p2p control" in connlib), sans-IO.

Control events travel inside the WireGuard tunnel as IP packets that no host would ever route:
an IPv6 header with source and destination ``::``, next header 0xFF (reserved) and hop limit 0,
then an 8-byte header whose first byte is the event type (the other seven are reserved, sent as
zero and ignored on receipt, as connlib does), then a JSON body. A whole packet is at most
1280 bytes (the IPv6 minimum MTU), so it always fits the tunnel. Events are unacknowledged and
idempotent: the sender repeats them until it sees their effect.

Events (connlib's ``dns_resource_nat`` namespace):

- 0 ``AssignedIps`` (client -> gateway): ``{"resource", "domain", "proxy_ips": [...]}``.
- 1 ``DomainStatus`` (gateway -> client): ``{"resource", "domain", "status"}``, status
  ``Active`` or ``Inactive`` (any unknown status reads as Inactive, for forwards compatibility).
- 2 ``Goodbye``: the sender forgets the receiver's state (empty body).

:func:`is_control_packet` is the cheap test the datapath uses to take these out of the decrypted
stream; :func:`decode` returns an event or the :class:`DropReason` of a malformed packet and never
raises; :func:`encode` builds the packet and raises :class:`LocalError` for an event that cannot
be sent (too big, a name that is not a DNS name).
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from fzpoll.errors import DropReason as D
from fzpoll.errors import LocalError
from fzpoll.ippacket import IPV6_HEADER_SIZE
from fzpoll.wireguard.constants import FZ_P2P_CONTROL_NEXT_HEADER

CONTROL_NEXT_HEADER = FZ_P2P_CONTROL_NEXT_HEADER  # IANA "reserved": never a real transport
CONTROL_HOP_LIMIT = 0
CONTROL_ADDRESS = bytes(16)  # "::" as source and destination
CONTROL_HEADER_SIZE = 8
MAX_CONTROL_PACKET = 1280  # IPv6 minimum MTU (RFC 8200 section 5)
MAX_CONTROL_BODY = MAX_CONTROL_PACKET - IPV6_HEADER_SIZE - CONTROL_HEADER_SIZE
MAX_PROXY_IPS = 16  # connlib sends 8 (4 + 4); fzpoll's stub hands out 1 + 1
MAX_DOMAIN_TEXT = 253  # RFC 1035 2.3.4, dotted text without the root
MAX_LABEL = 63

_IPV6_FIXED = struct.Struct("!IHBB16s16s")
_RESOURCE_NAMESPACE = uuid.UUID("6f7a706f-6c6c-4761-7465-776179000000")

IPAddress = IPv4Address | IPv6Address


class EventType(enum.IntEnum):
    ASSIGNED_IPS = 0
    DOMAIN_STATUS = 1
    GOODBYE = 2


class NatStatus(enum.StrEnum):
    ACTIVE = "Active"
    INACTIVE = "Inactive"


@dataclass(frozen=True, slots=True)
class AssignedIps:
    """Client -> gateway: the proxy addresses the client handed out for ``domain``."""

    resource: str
    domain: str
    proxy_ips: tuple[IPAddress, ...]


@dataclass(frozen=True, slots=True)
class DomainStatus:
    """Gateway -> client: whether the gateway translates the proxy addresses of ``domain``."""

    resource: str
    domain: str
    status: NatStatus


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either side: forget every state kept for the sender."""


ControlEvent = AssignedIps | DomainStatus | Goodbye


def resource_id(pattern: str) -> str:
    """A stable UUID for a resource pattern (connlib identifies resources by UUID; fzpoll's
    resources are named by their pattern, so both ends derive the same ID from it)."""
    return str(uuid.uuid5(_RESOURCE_NAMESPACE, pattern.lower()))


def is_control_packet(packet: bytes | bytearray | memoryview) -> bool:
    """Whether ``packet`` is addressed as a control packet (IPv6, :: -> ::, next header 0xFF).
    A few byte comparisons: the datapath calls it on every decrypted packet."""
    return (
        len(packet) >= IPV6_HEADER_SIZE
        and packet[0] >> 4 == 6
        and packet[6] == CONTROL_NEXT_HEADER
        and packet[8:40] == CONTROL_ADDRESS + CONTROL_ADDRESS
    )


def normalize_domain(text: object) -> str | None:
    """``text`` as a lower-case dotted DNS name without the root dot, or None if it is not one."""
    if not isinstance(text, str) or not text.isascii():
        return None
    name = text.rstrip(".").lower() if text != "." else ""
    if not name or len(name) > MAX_DOMAIN_TEXT:
        return None
    for label in name.split("."):
        if not label or len(label) > MAX_LABEL or not label.isprintable() or " " in label:
            return None
    return name


# ------------------------------------------------------------------------------------ encode


def _body(event: ControlEvent) -> tuple[EventType, dict]:
    if isinstance(event, AssignedIps):
        ips = [str(ip) for ip in event.proxy_ips]
        return EventType.ASSIGNED_IPS, {"resource": event.resource, "domain": event.domain, "proxy_ips": ips}
    if isinstance(event, DomainStatus):
        body = {"resource": event.resource, "domain": event.domain, "status": str(event.status)}
        return EventType.DOMAIN_STATUS, body
    if isinstance(event, Goodbye):
        return EventType.GOODBYE, {}
    raise LocalError(f"not a control event: {type(event).__name__}")


def encode(event: ControlEvent) -> bytes:
    """The control packet carrying ``event``."""
    kind, body = _body(event)
    if kind != EventType.GOODBYE and normalize_domain(body["domain"]) is None:
        raise LocalError(f"control event for an invalid domain name: {body['domain']!r}")
    if kind == EventType.ASSIGNED_IPS and len(body["proxy_ips"]) > MAX_PROXY_IPS:
        raise LocalError(f"AssignedIps with {len(body['proxy_ips'])} proxy addresses (max {MAX_PROXY_IPS})")
    payload = json.dumps(body, separators=(",", ":")).encode() if body else b""
    if len(payload) > MAX_CONTROL_BODY:
        raise LocalError(f"control event body of {len(payload)} bytes exceeds {MAX_CONTROL_BODY}")
    header = bytes((kind,)) + bytes(CONTROL_HEADER_SIZE - 1)
    ip = _IPV6_FIXED.pack(
        6 << 28, CONTROL_HEADER_SIZE + len(payload), CONTROL_NEXT_HEADER, CONTROL_HOP_LIMIT,
        CONTROL_ADDRESS, CONTROL_ADDRESS,
    )
    return ip + header + payload


# ------------------------------------------------------------------------------------ decode


def _text(body: dict, key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) and 0 < len(value) <= MAX_DOMAIN_TEXT else None


def _decode_assigned_ips(body: dict) -> AssignedIps | None:
    resource, domain, ips = _text(body, "resource"), normalize_domain(body.get("domain")), body.get("proxy_ips")
    if resource is None or domain is None or not isinstance(ips, list) or len(ips) > MAX_PROXY_IPS:
        return None
    try:
        proxy_ips = tuple(ip_address(ip) for ip in ips if isinstance(ip, str))
    except ValueError:
        return None
    if len(proxy_ips) != len(ips):
        return None
    return AssignedIps(resource, domain, proxy_ips)


def _decode_domain_status(body: dict) -> DomainStatus | None:
    resource, domain, status = _text(body, "resource"), normalize_domain(body.get("domain")), body.get("status")
    if resource is None or domain is None or not isinstance(status, str):
        return None
    nat = NatStatus.ACTIVE if status == NatStatus.ACTIVE else NatStatus.INACTIVE
    return DomainStatus(resource, domain, nat)


def _decode_goodbye(body: dict) -> Goodbye | None:
    return Goodbye()


_DECODERS = {
    EventType.ASSIGNED_IPS: _decode_assigned_ips,
    EventType.DOMAIN_STATUS: _decode_domain_status,
    EventType.GOODBYE: _decode_goodbye,
}


def decode(packet: bytes | bytearray | memoryview) -> ControlEvent | D:
    """The event carried by control packet ``packet``, or ``CONTROL_MALFORMED`` (not a control
    packet, lengths that disagree, hop limit not 0, too big, unknown event type, a body that is
    not the event's JSON). Never raises."""
    if not is_control_packet(packet) or len(packet) > MAX_CONTROL_PACKET:
        return D.CONTROL_MALFORMED
    payload_length = int.from_bytes(packet[4:6], "big")
    end = IPV6_HEADER_SIZE + payload_length
    if packet[7] != CONTROL_HOP_LIMIT or payload_length < CONTROL_HEADER_SIZE or end != len(packet):
        return D.CONTROL_MALFORMED
    try:
        kind = EventType(packet[IPV6_HEADER_SIZE])
    except ValueError:
        return D.CONTROL_MALFORMED
    raw = bytes(packet[IPV6_HEADER_SIZE + CONTROL_HEADER_SIZE : end])
    if kind == EventType.GOODBYE and not raw:
        return Goodbye()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return D.CONTROL_MALFORMED
    if not isinstance(body, dict):
        return D.CONTROL_MALFORMED
    event = _DECODERS[kind](body)
    return D.CONTROL_MALFORMED if event is None else event
