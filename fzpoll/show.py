"""``fzpoll show [IFACE] [--json]``: interface status without wireguard-tools, plus fzpoll's counters.

For each UAPI socket (``/var/run/wireguard/*.sock``, or the named interface's) two requests go to
the daemon, each on its own connection:

- ``get=1`` (the standard UAPI, what ``wg show`` sends): keys, port, peers, endpoints, handshakes,
  transfer counters and allowed IPs;
- ``get=fzpoll`` (fzpoll's own, see :mod:`fzpoll.uapi.protocol`): one line ``fzpoll_stats=<JSON>`` with
  what ``wg`` cannot show - drops by reason, loop statistics, pending writes, daemon settings.

A daemon that does not know ``get=fzpoll`` (wireguard-go closes the connection; an fzpoll daemon
without a stats provider answers ``errno=-71``) is shown with the standard part only. When the
socket's owner is recognisably wireguard-go (its ``/proc/PID/comm``, PID from ``SO_PEERCRED``) the
request is not even sent, since wireguard-go logs each unknown operation as an ERROR.

Parsing and rendering are pure functions of the answers and ``now`` (wall-clock seconds); only
:func:`query` and :func:`show` touch sockets, files and the clock. Private and preshared keys are
never printed, in text or JSON.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fzpoll.wireguard.keys import PrivateKey, PublicKey
from fzpoll.uapi.protocol import SOCKET_DIR, STATS_KEY, STATS_REQUEST

__all__ = [
    "InterfaceStatus", "PeerStatus", "QueryError", "format_text", "parse_get", "parse_stats",
    "query", "show", "status_json",
]

GET_REQUEST = b"get=1\n\n"
QUERY_TIMEOUT = 3.0  # seconds for one request: a stuck daemon must not hang `fzpoll show`
MAX_ANSWER = 16 << 20  # bytes; ~100 bytes per allowed IP, so far more than any real answer


class QueryError(Exception):
    """A socket could not be queried (no daemon, refused, timed out, bad answer)."""


@dataclass(frozen=True)
class PeerStatus:
    public_key: str  # base64
    has_preshared_key: bool
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # Unix seconds, 0 if never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int  # seconds, 0 = off


@dataclass(frozen=True)
class InterfaceStatus:
    name: str
    public_key: str | None  # base64, None without a private key
    listen_port: int
    fwmark: int
    peers: tuple[PeerStatus, ...] = ()
    stats: dict[str, Any] | None = field(default=None)  # the fzpoll_stats object, None if unknown


# ---------------------------------------------------------------------------------------------
# Parsing (pure)


def _errno_of(lines: list[str]) -> int:
    for line in reversed(lines):
        if line.startswith("errno="):
            try:
                return int(line[len("errno="):])
            except ValueError:
                break
    raise QueryError("answer without a valid errno line")


def _b64(hex_text: str) -> str:
    return PublicKey.from_hex(hex_text).base64()


def parse_get(name: str, text: str) -> InterfaceStatus:
    """Parse a ``get=1`` answer (up to and including ``errno=0``). Raises QueryError."""
    lines = [line for line in text.split("\n") if line]
    code = _errno_of(lines)
    if code:
        raise QueryError(f"the daemon answered get=1 with errno={code} ({os.strerror(abs(code))})")
    device: dict[str, Any] = {"public_key": None, "listen_port": 0, "fwmark": 0}
    peers: list[dict[str, Any]] = []
    try:
        for line in lines:
            key, _, value = line.partition("=")
            if key == "public_key":
                peers.append({"public_key": _b64(value), "has_preshared_key": False, "endpoint": None,
                              "allowed_ips": [], "latest_handshake": 0, "rx_bytes": 0, "tx_bytes": 0,
                              "persistent_keepalive": 0})
            elif not peers:
                if key == "private_key":
                    raw = bytes.fromhex(value)
                    device["public_key"] = PrivateKey(raw).public_key.base64() if any(raw) else None
                elif key in ("listen_port", "fwmark"):
                    device[key] = int(value)
            else:
                _peer_line(peers[-1], key, value)
    except ValueError as exc:
        raise QueryError(f"malformed get=1 answer: {exc}") from None
    return InterfaceStatus(name=name, **device, peers=tuple(
        PeerStatus(**{**p, "allowed_ips": tuple(p["allowed_ips"])}) for p in peers))


def _peer_line(peer: dict[str, Any], key: str, value: str) -> None:
    if key == "preshared_key":
        peer["has_preshared_key"] = any(bytes.fromhex(value))
    elif key == "endpoint":
        peer["endpoint"] = value
    elif key == "allowed_ip":
        peer["allowed_ips"].append(value)
    elif key == "last_handshake_time_sec":
        peer["latest_handshake"] = int(value)
    elif key in ("rx_bytes", "tx_bytes"):
        peer[key] = int(value)
    elif key == "persistent_keepalive_interval":
        peer["persistent_keepalive"] = int(value)
    # protocol_version, last_handshake_time_nsec and keys added by later versions: not shown


def parse_stats(text: str) -> dict[str, Any] | None:
    """The object of a ``get=fzpoll`` answer, or None if the daemon does not provide one."""
    lines = [line for line in text.split("\n") if line]
    try:
        if _errno_of(lines):
            return None
    except QueryError:
        return None  # closed without an answer: wireguard-go, or an older fzpoll
    prefix = STATS_KEY + "="
    for line in lines:
        if line.startswith(prefix):
            try:
                value = json.loads(line[len(prefix):])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


# ---------------------------------------------------------------------------------------------
# Rendering (pure)


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def ago(timestamp: int, now: float) -> str:
    """``wg show``'s "1 minute, 5 seconds ago" for a Unix timestamp."""
    if not timestamp:
        return "never"
    left = int(now) - timestamp
    if left < 0:
        return "in the future (system clock wound backward?)"
    if left == 0:
        return "Now"  # as wg prints it
    parts = []
    for unit, size in (("year", 365 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(_plural(count, unit))
    return ", ".join(parts) + " ago"


def _bytes(n: int) -> str:
    """``wg show``'s transfer units."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _counts(counts: Any) -> str:
    if not isinstance(counts, dict) or not counts:
        return "none"
    items = sorted(counts.items(), key=lambda kv: (-kv[1] if isinstance(kv[1], int) else 0, str(kv[0])))
    return ", ".join(f"{k} {v}" for k, v in items)  # the largest first


def _format_interface(status: InterfaceStatus, now: float) -> list[str]:
    out = [f"interface: {status.name}"]
    if status.public_key:
        out += [f"  public key: {status.public_key}", "  private key: (hidden)"]
    if status.listen_port:
        out.append(f"  listening port: {status.listen_port}")
    if status.fwmark:
        out.append(f"  fwmark: {status.fwmark:#x}")
    # wg show's order: the most recent handshake first, never-connected peers last
    for peer in sorted(status.peers, key=lambda p: -p.latest_handshake):
        out += ["", f"peer: {peer.public_key}"]
        if peer.has_preshared_key:
            out.append("  preshared key: (hidden)")
        if peer.endpoint:
            out.append(f"  endpoint: {peer.endpoint}")
        out.append(f"  allowed ips: {', '.join(peer.allowed_ips) or '(none)'}")
        if peer.latest_handshake:
            out.append(f"  latest handshake: {ago(peer.latest_handshake, now)}")
        if peer.rx_bytes or peer.tx_bytes:
            out.append(f"  transfer: {_bytes(peer.rx_bytes)} received, {_bytes(peer.tx_bytes)} sent")
        if peer.persistent_keepalive:
            out.append(f"  persistent keepalive: every {_plural(peer.persistent_keepalive, 'second')}")
    return out


def _format_stats(stats: dict[str, Any] | None) -> list[str]:
    if stats is None:
        return ["fzpoll: (no fzpoll counters: the daemon does not answer get=fzpoll)"]
    daemon = stats.get("daemon") or {}
    poller = stats.get("poller") or {}
    head = ", ".join(f"{label} {daemon[key]}" for key, label in (
        ("pid", "pid"), ("schedule", "schedule"), ("batch_size", "batch size"),
        ("listen_port", "listen port"), ("mtu", "mtu")) if key in daemon)
    out = [f"fzpoll: {head}" if head else "fzpoll:"]
    if "udp_offloads" in daemon or "tun_offloads" in daemon:
        udp = daemon.get("udp_offloads") or {}
        on = [name for name, enabled in udp.items() if enabled] if isinstance(udp, dict) else list(udp)
        out.append(f"  offloads: udp {','.join(on) or 'off'}; tun {','.join(daemon.get('tun_offloads') or []) or 'off'}")
    sodium = daemon.get("sodium")
    if isinstance(sodium, dict) and sodium.get("kind"):
        version = f" {sodium['version']}" if sodium.get("version") else ""
        out.append(f"  libsodium: {sodium['kind']} ({sodium.get('library', '?')}{version}, via {sodium.get('via', '?')})")
    if poller:
        out.append(f"  loop: {poller.get('passes', 0)} passes, packets in: "
                   f"{poller.get('udp_packets_in', 0)} udp, {poller.get('tun_packets_in', 0)} tun; "
                   f"max batch: {poller.get('max_udp_batch', 0)} udp, {poller.get('max_tun_batch', 0)} tun")
        out.append(f"  errors: {_counts(poller.get('errors'))}")
    out.append(f"  drops: {_counts(stats.get('drops'))}")
    kernel = stats.get("kernel")
    if isinstance(kernel, dict):
        out.append(f"  kernel drops: {kernel.get('drops', 0)} (prefilter {kernel.get('filter', 'off')}; "
                   "junk it rejected and receive-buffer overflows)")
        if kernel.get("replay_floods"):
            out.append(f"  replay floods: {kernel['replay_floods']} (counter floors in the prefilter: "
                       f"{'on' if kernel.get('replay_floors') else 'off'})")
    pending = stats.get("pending_writes")
    if isinstance(pending, dict):
        out.append("  pending writes: " + (", ".join(f"{k} {v}" for k, v in pending.items()) or "none"))
    bounds = stats.get("bounds")
    if isinstance(bounds, dict):
        out.append("  bounds: " + (", ".join(_bound(k, v) for k, v in bounds.items()) or "none"))
    dns = stats.get("dns")
    if isinstance(dns, dict):
        out += _dns_lines(dns)
    shown = {"daemon", "poller", "drops", "kernel", "pending_writes", "bounds", "dns"}
    for key in sorted(k for k in stats if k not in shown):  # whatever later daemons add
        value = stats[key]
        out.append(f"  {key.replace('_', ' ')}: {_counts(value) if isinstance(value, dict) else value}")
    return out


def _dns_lines(dns: dict[str, Any]) -> list[str]:
    """The DNS stub: queries in flight, its drops, and the kernel's rate limit on the sentinels."""
    out = [f"  dns: {dns.get('in_flight', 0)} in flight, {dns.get('tcp_connections', 0)} tcp connections; "
           f"drops: {_counts(dns.get('drops'))}; stats: {_counts(dns.get('stats'))}"]
    limit = dns.get("kernel")
    if isinstance(limit, dict):
        if limit.get("rate"):
            out.append(f"  dns kernel limit: {limit['rate']} queries/s to the sentinels; passed "
                       f"{limit.get('passed', 0)}, dropped {limit.get('dropped', 0)}, queued {limit.get('queued', 0)}")
        else:
            out.append(f"  dns kernel limit: off ({limit.get('off', 'not installed')})")
    return out


def _bound(name: str, bound: Any) -> str:
    """``staged packets 12/4096`` (plus any count of times it was full, e.g. ``resets 2``)."""
    if not isinstance(bound, dict):
        return f"{name.replace('_', ' ')} {bound}"
    extra = "".join(f", {k} {v}" for k, v in bound.items() if k not in ("used", "limit"))
    return f"{name.replace('_', ' ')} {bound.get('used', '?')}/{bound.get('limit', '?')}{extra}"


def format_text(statuses: list[InterfaceStatus], now: float) -> str:
    """The human-readable report: ``wg show``'s block per interface, then fzpoll's counters."""
    blocks = ["\n".join(_format_interface(s, now) + [""] + _format_stats(s.stats)) for s in statuses]
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def status_json(statuses: list[InterfaceStatus], now: float) -> dict[str, Any]:
    """The ``--json`` document: ``{"time": ..., "interfaces": [...]}``; no secrets in it."""
    interfaces = []
    for s in statuses:
        d = asdict(s)
        for peer in d["peers"]:
            peer["allowed_ips"] = list(peer["allowed_ips"])
            hs = peer["latest_handshake"]
            peer["latest_handshake_seconds_ago"] = max(0, int(now) - hs) if hs else None
        interfaces.append(d)
    return {"time": int(now), "interfaces": interfaces}


# ---------------------------------------------------------------------------------------------
# IO


def _complete(buf: bytes) -> bool:
    """An answer ends with an ``errno=N`` line and the blank line."""
    if not buf.endswith(b"\n\n"):
        return False
    last = buf[:-2].rsplit(b"\n", 1)[-1]
    return last.startswith(b"errno=")


def _peer_program(sock: socket.socket) -> str | None:
    """The command name of the process serving ``sock`` (None if unknown, e.g. another pid ns)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
        if pid <= 0:
            return None
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def query(path: str, request: bytes, timeout: float = QUERY_TIMEOUT) -> tuple[str, str | None]:
    """Send one request on a new connection to ``path``; return the answer (empty if the daemon
    closed without one) and the serving program's name (see :func:`_peer_program`).
    Raises QueryError when there is nobody to ask or no answer in ``timeout`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise QueryError(f"no socket {path}: no daemon serves this interface") from None
        except ConnectionRefusedError:
            raise QueryError(f"nobody listens on {path}: its daemon is gone (stale socket)") from None
        except PermissionError:
            raise QueryError(f"permission denied on {path} (run as root)") from None
        except OSError as exc:
            raise QueryError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        program = _peer_program(sock)
        buf = bytearray()
        try:
            sock.sendall(request)
            while not _complete(buf):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise QueryError(f"answer from {path} too large")
        except socket.timeout:
            raise QueryError(f"{path}: no answer within {timeout:g} s (daemon stuck?)") from None
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise QueryError(f"{path}: {exc.strerror or exc}") from None
            # the daemon closed on us (wireguard-go does, for requests it does not know)
    return buf.decode("utf-8", "replace"), program


def interface_status(name: str, socket_dir: str = SOCKET_DIR) -> InterfaceStatus:
    """Both requests for one interface. Raises QueryError if the standard one fails."""
    path = os.path.join(socket_dir, f"{name}.sock")
    answer, program = query(path, GET_REQUEST)
    status = parse_get(name, answer)
    stats = None
    if program is None or not program.startswith("wireguard-go"):
        try:
            stats = parse_stats(query(path, STATS_REQUEST)[0])
        except QueryError:
            pass
    return InterfaceStatus(status.name, status.public_key, status.listen_port, status.fwmark,
                           status.peers, stats)


def _interfaces(socket_dir: str) -> list[str]:
    try:
        return sorted(p.name[: -len(".sock")] for p in Path(socket_dir).glob("*.sock") if p.is_socket())
    except OSError:
        return []


def show(interface: str | None = None, *, as_json: bool = False, socket_dir: str = SOCKET_DIR,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the status of ``interface`` (default: every socket in ``socket_dir``).

    Returns 0, or 1 when no daemon could be asked or one of the interfaces failed (each failure
    is reported on ``err``; the others are still shown).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if interface is not None and (not interface or "/" in interface or interface in (".", "..")):
        print(f"fzpoll: invalid interface name {interface!r}", file=err)
        return 1
    names = [interface] if interface else _interfaces(socket_dir)
    if not names:
        print(f"fzpoll: no interfaces: no daemon is running (no sockets in {socket_dir})", file=err)
        return 1
    statuses: list[InterfaceStatus] = []
    failed = 0
    for name in names:
        try:
            statuses.append(interface_status(name, socket_dir))
        except QueryError as exc:
            failed += 1
            print(f"fzpoll: interface {name}: {exc}", file=err)
    now = time.time()
    if as_json:
        json.dump(status_json(statuses, now), out, indent=2)
        out.write("\n")
    elif statuses:
        out.write(format_text(statuses, now))
    return 1 if failed else 0
