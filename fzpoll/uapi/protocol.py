"""The cross-platform WireGuard configuration protocol (UAPI), as ``wg`` and wireguard-go speak it.

``wg`` talks to a userspace implementation over the Unix socket ``/var/run/wireguard/IFACE.sock``
(see https://www.wireguard.com/xplatform/). This module is the protocol:

- **Sans-IO**: :func:`handle_get` and :func:`handle_set` turn one request into an answer against
  a :class:`UapiHost` (the engine plus the host's UDP port and fwmark), and :class:`UapiConnection`
  frames the byte stream of one client into requests. They touch no socket and no clock.
- **IO** lives in :mod:`fzpoll.uapi.server`: the listening socket and the client sockets,
  non-blocking, plugged into the loop.

Behaviour follows wireguard-go v0.0.20220316 (``device/uapi.go``), checked against Debian's binary:

- ``get=1\\n\\n``: ``private_key`` (unless unset), ``listen_port`` (unless 0), ``fwmark`` (unless
  0), then per peer ``public_key``, ``preshared_key`` (zeros when unset), ``protocol_version=1``,
  ``endpoint`` (when known), ``last_handshake_time_sec``/``_nsec`` (Unix epoch, 0 if never),
  ``tx_bytes``, ``rx_bytes``, ``persistent_keepalive_interval``, ``allowed_ip`` lines; then
  ``errno=0`` and a blank line. Keys in lowercase hex; a private key shows clamped.
- ``set=1``: lines applied in order; the first bad line stops the request and what came before
  stays applied. Replies ``errno=0`` or a *negative* errno: -22 EINVAL for a bad value or an
  unknown key, -71 EPROTO for a line without ``=``, -98 EADDRINUSE when the port cannot be bound
  (or the fwmark set). ``wg`` reads the reply with ``fscanf("errno=%d")`` and negates it.
- Values are parsed exactly as Go does (``strconv.ParseUint``, ``netip.ParseAddrPort``,
  ``netip.ParsePrefix``): leading zeros and upper-case hex are fine, signs and spaces are not.

One request is fzpoll's own and read-only: ``get=fzpoll\n\n`` is answered with one line
``fzpoll_stats=<JSON object on one line>`` (counters ``wg`` cannot show: drops by reason, loop
statistics, buffer depths, daemon settings; see ``fzpoll show``) and ``errno=0``. ``wg`` never
sends it; a server built without a ``stats`` provider treats it as any unknown operation, and
wireguard-go answers it by closing the connection (after logging "invalid UAPI operation").

Where wireguard-go is sloppy we are stricter, never looser for ``wg``: requests pipelined on one
connection are all answered (wireguard-go loses those after a ``set``), an unknown operation gets
``errno=-71`` before the close (wireguard-go just closes), and at EOF inside a ``set`` the complete
lines are applied but a trailing partial line is dropped.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import re
from typing import Any, Callable, Iterable, Protocol

from fzpoll.wireguard.engine import Engine
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from fzpoll.wireguard.peer import Endpoint, Peer

log = logging.getLogger("fzpoll.uapi.protocol")

__all__ = [
    "SOCKET_DIR", "STATS_KEY", "STATS_REQUEST", "StatsProvider", "UapiConnection", "UapiError",
    "UapiHost", "UapiLoop", "format_endpoint", "handle_get", "handle_get_stats",
    "handle_set", "parse_endpoint", "parse_prefix",
]

SOCKET_DIR = "/var/run/wireguard"
MAX_REQUEST_SIZE = 1 << 20  # bytes of one set request (a config of ~10,000 peers)
MAX_LINE_LENGTH = 4096  # the longest legitimate line is ~80 bytes
OUTPUT_BUDGET = 1 << 16  # stop answering pipelined requests once this much is waiting to be sent
MAX_CLIENTS = 16
IDLE_TIMEOUT = 10.0  # seconds a client may stay silent (or not read) before it is dropped
LISTEN_BACKLOG = 16
RECV_SIZE = 1 << 16
MAX_ACCEPTS_PER_WAKEUP = 64

STATS_REQUEST = b"get=fzpoll\n\n"  # fzpoll's read-only statistics request (not wireguard-go's)
STATS_KEY = "fzpoll_stats"
StatsProvider = Callable[[], dict[str, Any]]

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
_SIGNED_DIGITS = re.compile(r"[+-]?[0-9]+")  # Go's strconv.Atoi (netip.ParsePrefix bits)


class UapiError(Exception):
    """A set request failed with ``errno`` (positive, as in :mod:`errno`); the wire shows -errno.

    A :class:`UapiHost` raises it from ``set_listen_port`` / ``set_fwmark`` (e.g. EADDRINUSE).
    """

    def __init__(self, code: int, message: str = "") -> None:
        self.errno = abs(int(code))
        super().__init__(message or errno.errorcode.get(self.errno, f"errno {self.errno}"))


class UapiHost(Protocol):
    """What the UAPI configures: the engine, and the UDP port and fwmark the IO shell owns."""

    engine: Engine
    listen_port: int
    fwmark: int

    def set_listen_port(self, port: int) -> None:
        """Rebind to ``port`` (0 = any); raise UapiError(EADDRINUSE) if it cannot be bound."""

    def set_fwmark(self, mark: int) -> None:
        """Mark our UDP packets with ``mark`` (0 = none)."""

    # Optional: ``register_secret(raw: bytes)``, told every private and preshared key a request
    # carries (the daemon's log redaction). The protocol itself never formats a key.


class UapiLoop(Protocol):
    """The four loop methods :class:`UapiServer` uses; callbacks receive ``now``."""

    def add_reader(self, fd: int, callback: Callable[[float], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[float], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...


# ---------------------------------------------------------------------------------------------
# Values, parsed as wireguard-go (Go's strconv and net/netip) parses them.


def _uint(value: str, bits: int) -> int:
    """``strconv.ParseUint(value, 10, bits)``: decimal digits only, leading zeros allowed."""
    if not _DIGITS.fullmatch(value):
        raise UapiError(errno.EINVAL)
    digits = value.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) >> bits:
        raise UapiError(errno.EINVAL)
    return int(digits)


def _hex_key(value: str) -> bytes:
    """A 32-byte key in hex, either case (Go's hex.DecodeString of exactly 64 characters)."""
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(errno.EINVAL)
    return bytes.fromhex(value)


def _clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as wireguard-go applies to every non-zero private key it is given."""
    if not any(raw):
        return raw
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``netip.ParseAddr``: an IPv4 or IPv6 literal (an IPv6 zone is allowed here)."""
    try:
        if ":" in text:
            return ipaddress.IPv6Address(text)
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise UapiError(errno.EINVAL) from None


def parse_endpoint(value: str) -> Endpoint:
    """``netip.ParseAddrPort``: ``a.b.c.d:port`` or ``[v6]:port``, stored as recvfrom reports it.

    IPv4 gives ``(host, port)``, IPv6 ``(host, port, 0, 0)`` with the host as ``inet_ntop`` writes
    it (what ``recvfrom`` returns on an AF_INET6 socket, so roaming compares equal). An IPv6 zone
    is accepted and dropped, as wireguard-go does. Raises UapiError(EINVAL).
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text:
        raise UapiError(errno.EINVAL)
    bracketed = host.startswith("[")
    if bracketed:
        if len(host) < 2 or not host.endswith("]"):
            raise UapiError(errno.EINVAL)
        host = host[1:-1]
    addr = _parse_addr(host)
    port = _uint(port_text, 16)
    if bracketed != (addr.version == 6):
        raise UapiError(errno.EINVAL)  # brackets only and always around IPv6
    if addr.version == 4:
        return (str(addr), port)
    return (_ntop6(addr), port, 0, 0)


def _ntop6(addr: ipaddress.IPv6Address) -> str:
    """The text ``inet_ntop(AF_INET6)`` (glibc) writes: RFC 5952, with the last 32 bits dotted
    for IPv4-mapped (``::ffff:a.b.c.d``) and IPv4-compatible (``::a.b.c.d``) addresses. It is
    what recvfrom reports, so an endpoint set here compares equal to the source of a datagram."""
    packed = addr.packed
    if packed[:10] == bytes(10):
        word5, word6 = packed[10:12], packed[12:14]
        if word5 == b"\xff\xff" or (word5 == b"\0\0" and word6 != b"\0\0"):
            prefix = "::ffff:" if word5 == b"\xff\xff" else "::"
            return prefix + ".".join(str(b) for b in packed[12:])
    return ipaddress.IPv6Address(packed).compressed  # without a zone, as inet_ntop


def parse_prefix(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``netip.ParsePrefix``: ``addr/bits``, host bits masked off. Raises UapiError(EINVAL)."""
    addr_text, sep, bits_text = value.rpartition("/")
    if not sep or "%" in addr_text or not _SIGNED_DIGITS.fullmatch(bits_text) or len(bits_text) > 20:
        raise UapiError(errno.EINVAL)
    addr = _parse_addr(addr_text)
    bits = int(bits_text)
    if not 0 <= bits <= addr.max_prefixlen:
        raise UapiError(errno.EINVAL)
    return ipaddress.ip_network((addr, bits), strict=False)


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


def _format_prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    return f"{_format_addr(net.network_address)}/{net.prefixlen}"


# ---------------------------------------------------------------------------------------------
# get=1


def _handshake_time(wall: float) -> tuple[int, int]:
    """Unix seconds and nanoseconds of a wall-clock float (0, 0 when never)."""
    if not wall or not math.isfinite(wall) or wall < 0:
        return 0, 0
    sec = int(wall)
    return sec, min(int((wall - sec) * 1e9), 999_999_999)


def _prefixes_by_peer(engine: Engine) -> dict[Peer, list[str]]:
    """Each peer's allowed IPs in the table's insertion order (wireguard-go's order)."""
    out: dict[Peer, list[str]] = {}
    for net, peer in engine.allowed_ips():
        out.setdefault(peer, []).append(_format_prefix(net))
    return out


def handle_get(host: UapiHost) -> str:
    """The complete answer to ``get=1``, ending with ``errno=0`` and the blank line."""
    engine = host.engine
    lines: list[str] = []
    private = engine.private_key
    if private is not None:
        lines.append(f"private_key={_clamp(private.raw).hex()}")
    if host.listen_port:
        lines.append(f"listen_port={int(host.listen_port)}")
    if host.fwmark:
        lines.append(f"fwmark={int(host.fwmark)}")
    prefixes = _prefixes_by_peer(engine)
    for peer in engine.peers.values():
        sec, nsec = _handshake_time(peer.last_handshake_wall)
        lines += (
            f"public_key={peer.public_key.hex()}",
            f"preshared_key={peer.preshared_key.hex()}",
            "protocol_version=1",
        )
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        lines += (
            f"last_handshake_time_sec={sec}",
            f"last_handshake_time_nsec={nsec}",
            f"tx_bytes={peer.tx_bytes}",
            f"rx_bytes={peer.rx_bytes}",
            f"persistent_keepalive_interval={peer.persistent_keepalive_interval}",
        )
        lines += (f"allowed_ip={p}" for p in prefixes.get(peer, ()))
    lines.append("errno=0")
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------------------------
# set=1


def _ignore(secret: bytes) -> None:
    pass


class _SetOperation:
    """One ``set=1`` request: device keys first, then one section per ``public_key`` line.

    The peer being configured is ``self.peer``; None stands for wireguard-go's "dummy" peer (our
    own key, a removed peer, ``update_only`` on a new one): its lines are still validated but
    change nothing. Turning persistent keepalive on sends a keepalive when the section ends, as
    wireguard-go's handlePostConfig does, so the order of ``endpoint`` and the interval is free.
    """

    def __init__(self, host: UapiHost, now: float) -> None:
        self.host = host
        self.engine = host.engine
        self.now = now
        self.in_device = True
        self.peer: Peer | None = None
        self.created = False
        self.keepalive: int | None = None  # interval to apply when the section ends
        self.register_secret: Callable[[bytes], None] = getattr(host, "register_secret", _ignore)

    def run(self, lines: Iterable[str]) -> int:
        key = ""
        try:
            for line in lines:
                if line == "":
                    break  # a blank line ends the request
                key, sep, value = line.partition("=")
                if not sep:
                    raise UapiError(errno.EPROTO, "line without '='")
                if key == "public_key":
                    self._end_section()
                    self.in_device = False
                    self._select_peer(value)
                    continue
                table = _DEVICE_KEYS if self.in_device else _PEER_KEYS
                handler = table.get(key)
                if handler is None:
                    raise UapiError(errno.EINVAL, "unknown key")
                handler(self, value)
            return 0
        except UapiError as exc:
            # Never the value, and the key only if it is one we know: a malformed line's "key"
            # may be a private key sent without its "private_key=" prefix.
            known = key if key == "public_key" or key in _DEVICE_KEYS or key in _PEER_KEYS else "(unknown)"
            log.warning("uapi set failed", extra={"fields": {"key": known, "errno": exc.errno}})
            return exc.errno
        finally:
            self._end_section()

    def _end_section(self) -> None:
        peer, interval = self.peer, self.keepalive
        self.keepalive = None
        if peer is not None and interval is not None and not peer.removed:
            self.engine.set_persistent_keepalive(peer, interval, self.now)

    def _select_peer(self, value: str) -> None:
        raw = _hex_key(value)
        own = self.engine.public_key
        # With no private key ever set, wireguard-go's own public key is all zeros.
        own_raw = own.raw if own is not None else bytes(32)
        self.created = False
        if raw == own_raw:
            self.peer = None  # a peer with our own key is ignored
            return
        key = PublicKey(raw)
        peer = self.engine.get_peer(key)
        if peer is None:
            try:
                peer = self.engine.add_peer(key)
            except LocalError:
                raise UapiError(errno.EINVAL, "cannot create peer") from None
            self.created = True
        self.peer = peer

    # -- device keys

    def _private_key(self, value: str) -> None:
        given = _hex_key(value)
        raw = _clamp(given)
        for secret in (given, raw):
            self.register_secret(secret)  # defence in depth: never in a log line, whatever logs it
        self.engine.set_private_key(PrivateKey(raw) if any(raw) else None)

    def _listen_port(self, value: str) -> None:
        port = _uint(value, 16)
        try:
            self.host.set_listen_port(port)
        except UapiError:
            raise
        except OSError as exc:
            raise UapiError(errno.EADDRINUSE, str(exc)) from None

    def _fwmark(self, value: str) -> None:
        mark = _uint(value, 32)
        try:
            self.host.set_fwmark(mark)
        except UapiError:
            raise
        except OSError as exc:  # wireguard-go reports a failed BindSetMark as EADDRINUSE too
            raise UapiError(errno.EADDRINUSE, str(exc)) from None

    def _replace_peers(self, value: str) -> None:
        _true(value)
        self.engine.remove_all_peers()

    # -- peer keys

    def _update_only(self, value: str) -> None:
        _true(value)
        if self.created and self.peer is not None:
            self.engine.remove_peer(self.peer.public_key)
            self.peer = None
            self.keepalive = None

    def _remove(self, value: str) -> None:
        _true(value)
        if self.peer is not None:
            self.engine.remove_peer(self.peer.public_key)
        self.peer = None
        self.keepalive = None

    def _preshared_key(self, value: str) -> None:
        raw = _hex_key(value)
        self.register_secret(raw)
        if self.peer is not None:
            self.engine.set_preshared_key(self.peer, PresharedKey(raw))

    def _endpoint(self, value: str) -> None:
        endpoint = parse_endpoint(value)
        if self.peer is not None:
            self.engine.set_endpoint(self.peer, endpoint)

    def _persistent_keepalive_interval(self, value: str) -> None:
        interval = _uint(value, 16)
        if self.peer is not None:
            self.keepalive = interval

    def _replace_allowed_ips(self, value: str) -> None:
        _true(value)
        if self.peer is not None:
            self.engine.clear_allowed_ips(self.peer)

    def _allowed_ip(self, value: str) -> None:
        net = parse_prefix(value)
        if self.peer is not None:
            self.engine.add_allowed_ip(self.peer, net)

    def _protocol_version(self, value: str) -> None:
        if value != "1":
            raise UapiError(errno.EINVAL, "unsupported protocol version")


def _true(value: str) -> None:
    if value != "true":
        raise UapiError(errno.EINVAL, "value must be true")


_Handler = Callable[[_SetOperation, str], None]
_DEVICE_KEYS: dict[str, _Handler] = {
    "private_key": _SetOperation._private_key,
    "listen_port": _SetOperation._listen_port,
    "fwmark": _SetOperation._fwmark,
    "replace_peers": _SetOperation._replace_peers,
}
_PEER_KEYS: dict[str, _Handler] = {
    "update_only": _SetOperation._update_only,
    "remove": _SetOperation._remove,
    "preshared_key": _SetOperation._preshared_key,
    "endpoint": _SetOperation._endpoint,
    "persistent_keepalive_interval": _SetOperation._persistent_keepalive_interval,
    "replace_allowed_ips": _SetOperation._replace_allowed_ips,
    "allowed_ip": _SetOperation._allowed_ip,
    "protocol_version": _SetOperation._protocol_version,
}


def handle_set(host: UapiHost, lines: Iterable[str], now: float) -> int:
    """Apply the lines of a ``set=1`` body (without the ``set=1`` line) in order.

    Returns 0, or the positive errno that stopped it (the reply line is ``errno=-N``): EINVAL for
    a bad value or unknown key, EPROTO for a line without ``=``, EADDRINUSE (or the host's own
    UapiError) when the port cannot be bound. A blank line ends the body. Lines applied before
    the failing one stay applied, as in wireguard-go. Never raises for any input.
    """
    return _SetOperation(host, now).run(lines)


def handle_get_stats(stats: StatsProvider) -> str:
    """The answer to ``get=fzpoll``: ``fzpoll_stats=`` and the provider's dict as one-line JSON.

    Values JSON cannot hold are written as their ``str()``; ``json.dumps`` escapes newlines, so
    the object is always a single line.
    """
    body = json.dumps(stats(), separators=(",", ":"), sort_keys=True, default=str)
    return f"{STATS_KEY}={body}\nerrno=0\n\n"


def _status(code: int) -> bytes:
    return b"errno=0\n\n" if not code else f"errno=-{abs(code)}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# One client's byte stream.

_OP, _GET, _SET, _GET_STATS = 0, 1, 2, 3


class UapiConnection:
    """Frames one client's bytes into ``get=1\\n\\n`` / ``set=1\\n...\\n\\n`` requests.

    Feed bytes with :meth:`receive_data` (``b""`` means EOF) and write back what it returns. After
    :attr:`closing` turns True, write what was returned and close. If :attr:`has_pending` is True
    the output budget stopped it early: once the output is written, call :meth:`process`.
    Never raises: a request over 1 MiB, a line over 4 KiB, or an unknown operation is answered
    with ``errno=-71`` (EPROTO) and ends the connection. ``get=fzpoll\n\n`` is answered from
    ``stats`` when one is given (framed as ``get=1``), and is an unknown operation otherwise.
    """

    def __init__(self, host: UapiHost, *, max_request: int = MAX_REQUEST_SIZE,
                 max_line: int = MAX_LINE_LENGTH, output_budget: int = OUTPUT_BUDGET,
                 stats: StatsProvider | None = None) -> None:
        self.host = host
        self.stats = stats
        self.max_request = max_request
        self.max_line = max_line
        self.output_budget = output_budget
        self.closing = False
        self.has_pending = False
        self.requests = 0  # requests answered
        self._buf = bytearray()
        self._pos = 0
        self._state = _OP
        self._lines: list[str] = []
        self._size = 0
        self._eof = False

    def receive_data(self, data: bytes, now: float) -> bytes:
        """Take bytes from the client (``b""`` = EOF); return the bytes to send back."""
        if self.closing:
            return b""
        if data:
            self._buf += data
        else:
            self._eof = True
        return self.process(now)

    def process(self, now: float) -> bytes:
        """Answer the complete requests buffered so far, up to the output budget."""
        out = bytearray()
        if self.closing:
            return b""
        try:
            while len(out) < self.output_budget and not self.closing:
                if not self._step(out, now):
                    break
            self.has_pending = not self.closing and len(out) >= self.output_budget
            if self._eof and not self.has_pending and not self.closing:
                self._at_eof(out, now)
        except Exception:  # a bug in a host or the engine: answer EIO and drop this client only
            log.exception("uapi request failed")
            out += _status(errno.EIO)
            self._close()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return bytes(out)

    def _close(self) -> None:
        self.closing = True
        self.has_pending = False
        self._buf.clear()
        self._pos = 0
        self._lines = []

    def _fail(self, out: bytearray, code: int, why: str) -> None:
        log.warning("uapi client dropped", extra={"fields": {"reason": why}})
        out += _status(code)
        self._close()

    def _next_line(self, out: bytearray) -> bytes | None:
        """The next complete line (without its newline), or None when more input is needed."""
        buf, pos = self._buf, self._pos
        nl = buf.find(b"\n", pos, pos + self.max_line + 1)
        if nl < 0:
            if len(buf) - pos > self.max_line:
                self._fail(out, errno.EPROTO, "line too long")
            return None
        self._pos = nl + 1
        return bytes(buf[pos:nl])

    def _step(self, out: bytearray, now: float) -> bool:
        """Consume one line (or byte); False when more input is needed."""
        if self._state in (_GET, _GET_STATS):
            if self._pos >= len(self._buf):
                return False
            byte = self._buf[self._pos]
            self._pos += 1
            state, self._state = self._state, _OP
            self.requests += 1
            # wireguard-go: "get=1\n" must be followed by "\n"; anything else is EINVAL
            if byte != 0x0A:
                out += _status(errno.EINVAL)
            elif state == _GET_STATS and self.stats is not None:
                out += handle_get_stats(self.stats).encode()
            else:
                out += handle_get(self.host).encode()
            return True
        line = self._next_line(out)
        if line is None:
            return False
        if self._state == _OP:
            if line == b"get=1":
                self._state = _GET
            elif line == b"set=1":
                self._state, self._lines, self._size = _SET, [], len(line) + 1
            elif line == STATS_REQUEST[:-2] and self.stats is not None:
                self._state = _GET_STATS
            else:
                self._fail(out, errno.EPROTO, "unknown operation")
            return True
        self._size += len(line) + 1
        if self._size > self.max_request:
            self._fail(out, errno.EPROTO, "request too large")
            return True
        if line.endswith(b"\r"):
            line = line[:-1]  # Go's bufio.ScanLines drops a trailing CR
        if line:
            self._lines.append(line.decode("latin-1"))
            return True
        self._state = _OP
        self.requests += 1
        out += _status(handle_set(self.host, self._lines, now))
        self._lines = []
        return True

    def _at_eof(self, out: bytearray, now: float) -> None:
        """The client closed its side: finish a set body as wireguard-go does, then close."""
        if self._state == _SET:
            if len(self._buf) > self._pos:
                log.warning("uapi client sent a partial line before EOF: ignored")
            self.requests += 1
            out += _status(handle_set(self.host, self._lines, now))
        self._close()
