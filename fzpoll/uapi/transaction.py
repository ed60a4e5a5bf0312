"""One ``set=1`` request as a transaction: staged line by line, committed all or nothing. Sans-IO.

Why staged: a request can be megabytes (one peer with 130,560 allowed IPs, 10,000 peers with
keys). Each line is parsed and validated as it arrives (:meth:`SetTransaction.add_line`) into a
compact list of operations; nothing in the engine changes until the terminating blank line. If a
line is invalid, the rest of the request is read and discarded and *nothing* is applied (this is
stricter than wireguard-go, which leaves the lines before the bad one applied).

The commit (:meth:`SetTransaction.commit`) is a generator that applies the operations in order
and yields every :data:`COMMIT_CHUNK` operations, so the IO shell can spread a big commit over
several passes of its loop. The only steps that can fail at commit time are the host's
``listen_port`` and ``fwmark``: they run first, before anything else changes, and a failure
undoes the one that succeeded, so a failed request still leaves everything as it was.

Semantics otherwise follow wireguard-go's ``device/uapi.go``: device keys first, then one section
per ``public_key``; a peer with our own key, a removed peer and ``update_only`` on a new peer
become a "dummy" whose lines are validated but change nothing; turning persistent keepalive on
sends a keepalive when the section ends.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, Iterator, Protocol

from fzpoll.errors import LocalError
from fzpoll.uapi.values import (
    UapiError, clamp, fast_prefix_key, parse_endpoint, parse_hex_key, parse_prefix_key, parse_uint,
)
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey
from fzpoll.wireguard.peer import Peer

log = logging.getLogger("fzpoll.uapi.protocol")

COMMIT_CHUNK = 512  # operations (or allowed IPs) applied between two yields of a commit


class UapiHost(Protocol):
    """What the UAPI configures: the engine, and the UDP port and fwmark the IO shell owns."""

    engine: Engine
    listen_port: int
    fwmark: int

    def set_listen_port(self, port: int) -> None:
        """Rebind to ``port`` (0 = any); raise UapiError(EADDRINUSE) if it cannot be bound."""

    def set_fwmark(self, mark: int) -> None:
        """Mark our UDP packets with ``mark`` (0 = none)."""

    # Optional: ``zone_exists(name) -> bool``, whether an interface of that name exists (the
    # zone of an IPv6 endpoint); without it only numeric zones are accepted.


class _Apply:
    """The state of a commit in progress: the peer being configured and its pending keepalive."""

    def __init__(self, host: UapiHost, now: float) -> None:
        self.host = host
        self.engine = host.engine
        self.now = now
        self.peer: Peer | None = None
        self.created = False
        self.keepalive: int | None = None

    def end_section(self) -> None:
        peer, interval = self.peer, self.keepalive
        self.keepalive = None
        if peer is not None and interval is not None and not peer.removed:
            self.engine.set_persistent_keepalive(peer, interval, self.now)

    def select_peer(self, raw: bytes) -> None:
        self.end_section()
        own = self.engine.public_key
        # With no private key ever set, wireguard-go's own public key is all zeros.
        own_raw = own.raw if own is not None else bytes(32)
        self.created = False
        self.peer = None
        if raw == own_raw:
            return  # a peer with our own key is ignored
        key = PublicKey(raw)
        peer = self.engine.get_peer(key)
        if peer is None:
            try:
                peer = self.engine.add_peer(key)
            except LocalError:
                return  # cannot happen after the own-key check; a dummy rather than a half-commit
            self.created = True
        self.peer = peer

    def private_key(self, raw: bytes) -> None:
        self.engine.set_private_key(PrivateKey(raw) if any(raw) else None)

    def replace_peers(self, _value: object) -> None:
        self.engine.remove_all_peers()

    def update_only(self, _value: object) -> None:
        if self.created and self.peer is not None:
            self.engine.remove_peer(self.peer.public_key)
            self.peer = None
            self.keepalive = None

    def remove(self, _value: object) -> None:
        if self.peer is not None:
            self.engine.remove_peer(self.peer.public_key)
        self.peer = None
        self.keepalive = None

    def preshared_key(self, raw: bytes) -> None:
        if self.peer is not None:
            self.engine.set_preshared_key(self.peer, PresharedKey(raw))

    def endpoint(self, value: object) -> None:
        if self.peer is not None:
            self.engine.set_endpoint(self.peer, value)  # type: ignore[arg-type]

    def keepalive_interval(self, interval: int) -> None:
        if self.peer is not None:
            self.keepalive = interval

    def replace_allowed_ips(self, _value: object) -> None:
        if self.peer is not None:
            self.engine.clear_allowed_ips(self.peer)

    def allowed_ips(self, prefixes: list) -> None:
        if self.peer is not None:
            self.engine.add_allowed_prefixes(self.peer, prefixes)

    def nothing(self, _value: object) -> None:
        pass


def _true(value: str) -> bool:
    if value != "true":
        raise UapiError(errno.EINVAL, "value must be true")
    return True


def _protocol_version(value: str) -> str:
    if value != "1":
        raise UapiError(errno.EINVAL, "unsupported protocol version")
    return value


_Parse = Callable[[str], object]
_Step = Callable[[_Apply, object], None]
# key -> (parser of the value, step that applies it). listen_port and fwmark are host steps,
# run first by the commit (see _HOST_STEPS); their entry here only validates.
_DEVICE_KEYS: dict[str, tuple[_Parse, _Step]] = {
    "private_key": (lambda v: clamp(parse_hex_key(v)), _Apply.private_key),
    "listen_port": (lambda v: parse_uint(v, 16), _Apply.nothing),
    "fwmark": (lambda v: parse_uint(v, 32), _Apply.nothing),
    "replace_peers": (_true, _Apply.replace_peers),
}
_PEER_KEYS: dict[str, tuple[_Parse, _Step]] = {
    "update_only": (_true, _Apply.update_only),
    "remove": (_true, _Apply.remove),
    "preshared_key": (parse_hex_key, _Apply.preshared_key),
    "endpoint": (parse_endpoint, _Apply.endpoint),
    "persistent_keepalive_interval": (lambda v: parse_uint(v, 16), _Apply.keepalive_interval),
    "replace_allowed_ips": (_true, _Apply.replace_allowed_ips),
    "protocol_version": (_protocol_version, _Apply.nothing),
}
_KNOWN = frozenset(_DEVICE_KEYS) | frozenset(_PEER_KEYS) | {"public_key", "allowed_ip"}


class SetTransaction:
    """A ``set=1`` body: :meth:`add_line` for each line, then run :meth:`commit` to the end.

    ``error`` is the first failure's positive errno (0 while every line was valid); after it,
    further lines are only counted. ``result`` is the request's errno once the commit ended.
    """

    def __init__(self, zone_exists: Callable[[str], bool] | None = None) -> None:
        self.zone_exists = zone_exists  # the host's interface names, for IPv6 endpoint zones
        self.ops: list[tuple[_Step, object]] = []
        self.host_ops: list[tuple[str, int]] = []  # ("listen_port" | "fwmark", value)
        self.error = 0
        self.error_key = ""
        self.in_device = True
        self.lines = 0
        self.result: int | None = None

    def add_line(self, line: str) -> None:
        """Validate and stage one non-empty line (without its newline)."""
        self.lines += 1
        if self.error:
            return
        key, sep, value = line.partition("=")
        try:
            if not sep:
                raise UapiError(errno.EPROTO, "line without '='")
            if key == "allowed_ip" and not self.in_device:
                self._stage_prefix(parse_prefix_key(value))
            elif key == "public_key":
                self.in_device = False
                self.ops.append((_Apply.select_peer, parse_hex_key(value)))
            else:
                entry = (_DEVICE_KEYS if self.in_device else _PEER_KEYS).get(key)
                if entry is None:
                    raise UapiError(errno.EINVAL, "unknown key")
                parsed = parse_endpoint(value, self.zone_exists) if key == "endpoint" else entry[0](value)
                if key in ("listen_port", "fwmark"):
                    self.host_ops.append((key, parsed))  # type: ignore[arg-type]
                else:
                    self.ops.append((entry[1], parsed))
        except UapiError as exc:
            self.error = exc.errno
            # Never the value, and the key only if it is one we know: a malformed line's "key"
            # may be a private key sent without its "private_key=" prefix.
            self.error_key = key if key in _KNOWN else "(unknown)"

    def add_lines(self, lines: list[bytes]) -> None:
        """:meth:`add_line` for many non-empty lines at once, with a fast path for the bulk of a
        big request, ``allowed_ip`` lines in their common forms."""
        ops = self.ops
        staged = ops[-1][1] if ops and ops[-1][0] is _Apply.allowed_ips else None
        for i, line in enumerate(lines):
            if self.error:
                self.lines += len(lines) - i
                return
            if staged is not None and line[:11] == b"allowed_ip=":
                prefix = fast_prefix_key(line[11:])
                if prefix is not None:
                    staged.append(prefix)  # type: ignore[attr-defined]
                    self.lines += 1
                    continue
            self.add_line(line.decode("latin-1"))
            staged = ops[-1][1] if ops and ops[-1][0] is _Apply.allowed_ips and not self.in_device else None

    def _stage_prefix(self, prefix: int) -> None:
        ops = self.ops
        if ops and ops[-1][0] is _Apply.allowed_ips:
            ops[-1][1].append(prefix)  # type: ignore[attr-defined]
        else:
            ops.append((_Apply.allowed_ips, [prefix]))

    def commit(self, host: UapiHost, now: float) -> Iterator[int]:
        """Apply the staged request; yields the work done since the last yield (operations).

        Sets :attr:`result`. Nothing changes if a line was invalid or a host step fails.
        """
        if self.error:
            self._fail(self.error)
            return
        code = self._host_steps(host)
        if code:
            self._fail(code)
            return
        state = _Apply(host, now)
        done = 0
        try:
            for step, value in self.ops:
                if step is _Apply.allowed_ips:
                    prefixes: list = value  # type: ignore[assignment]
                    for start in range(0, len(prefixes), COMMIT_CHUNK):
                        part = prefixes[start:start + COMMIT_CHUNK]
                        state.allowed_ips(part)
                        done += len(part)
                        if done >= COMMIT_CHUNK:
                            yield done
                            done = 0
                    continue
                step(state, value)
                done += 1
                if done >= COMMIT_CHUNK:
                    yield done
                    done = 0
        finally:
            state.end_section()
            self.ops = []
        self.result = 0

    def _host_steps(self, host: UapiHost) -> int:
        """Run listen_port/fwmark; on failure undo what succeeded and return the errno."""
        undo: list[tuple[str, int]] = []
        for key, value in self.host_ops:
            old = host.listen_port if key == "listen_port" else host.fwmark
            try:
                (host.set_listen_port if key == "listen_port" else host.set_fwmark)(value)
            except (UapiError, OSError) as exc:
                # wireguard-go reports a failed bind and a failed BindSetMark as EADDRINUSE
                code = exc.errno if isinstance(exc, UapiError) else errno.EADDRINUSE
                self.error_key = key
                for done_key, done_old in reversed(undo):
                    try:
                        (host.set_listen_port if done_key == "listen_port" else host.set_fwmark)(done_old)
                    except (UapiError, OSError):
                        log.error("uapi set: could not restore", extra={"fields": {"key": done_key}})
                return code
            undo.append((key, old))
        return 0

    def _fail(self, code: int) -> None:
        log.warning("uapi set failed, nothing applied",
                    extra={"fields": {"key": self.error_key, "errno": code}})
        self.ops = []
        self.result = code

    def apply(self, host: UapiHost, now: float) -> int:
        """Commit in one go (start-up, tests); returns the errno (0 on success)."""
        for _ in self.commit(host, now):
            pass
        assert self.result is not None
        return self.result
