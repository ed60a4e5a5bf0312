"""The cross-platform WireGuard configuration protocol (UAPI), as ``wg`` and wireguard-go speak it.

``wg`` talks to a userspace implementation over the Unix socket ``/var/run/wireguard/IFACE.sock``
(see https://www.wireguard.com/xplatform/). This module is the protocol, **sans-IO** (no socket,
no clock): :class:`UapiConnection` frames the byte stream of one client into requests and answers
them against a :class:`UapiHost` (the engine plus the host's UDP port and fwmark). The IO half is
:mod:`fzpoll.uapi.server`; values are parsed in :mod:`fzpoll.uapi.values`, and a ``set`` is a
transaction (:mod:`fzpoll.uapi.transaction`).

Any size, no stalls: a connection does bounded work per call of :meth:`UapiConnection.process`
(``budget`` lines or operations, and at most ``output_budget`` bytes of answer), keeping only the
current line and the staged ``set`` (compact parsed values, never the request text). The server
calls it again on the next pass of the loop while :attr:`UapiConnection.has_pending` is True, so
a 3 MB ``set`` or a ``get`` of 10,000 peers is spread over many passes and packets flow between
them. A ``set`` answers once, after all of it is applied, or after it was rejected: then nothing
of it is applied (stricter than wireguard-go, which keeps the lines before the bad one).

Behaviour follows wireguard-go v0.0.20220316 (``device/uapi.go``), checked against Debian's binary:

- ``get=1\\n\\n``: ``private_key`` (unless unset), ``listen_port`` (unless 0), ``fwmark`` (unless
  0), then per peer ``public_key``, ``preshared_key`` (zeros when unset), ``protocol_version=1``,
  ``endpoint`` (when known), ``last_handshake_time_sec``/``_nsec`` (Unix epoch, 0 if never),
  ``tx_bytes``, ``rx_bytes``, ``persistent_keepalive_interval``, ``allowed_ip`` lines; then
  ``errno=0`` and a blank line. Keys in lowercase hex; a private key shows clamped.
- ``set=1``: replies ``errno=0`` or a *negative* errno: -22 EINVAL for a bad value or an unknown
  key, -71 EPROTO for a line without ``=``, -98 EADDRINUSE when the port cannot be bound (or the
  fwmark set). ``wg`` reads the reply with ``fscanf("errno=%d")`` and negates it.
- At EOF inside a ``set`` (the client half-closed), the body is applied including a last line
  that has no newline, as Go's ``bufio.Scanner`` hands it over, and answered.

One request is fzpoll's own and read-only: ``get=fzpoll\\n\\n`` is answered with one line
``fzpoll_stats=<JSON object on one line>`` (counters ``wg`` cannot show, see ``fzpoll show``) and
``errno=0``. A connection built without a ``stats`` provider treats it as an unknown operation.

Where wireguard-go is sloppy we are stricter, never looser for ``wg``: requests pipelined on one
connection are all answered, and an unknown operation gets ``errno=-71`` before the close.
"""

from __future__ import annotations

import errno
import json
import logging
import math
from typing import Any, Callable, Iterable, Iterator, Protocol

from fzpoll.uapi.transaction import SetTransaction, UapiHost
from fzpoll.uapi.values import (
    UapiError, clamp, format_endpoint, format_prefix_key, parse_endpoint, parse_prefix,
)
from fzpoll.wireguard.peer import Peer

log = logging.getLogger("fzpoll.uapi.protocol")

__all__ = [
    "CommitLock", "SOCKET_DIR", "STATS_KEY", "STATS_REQUEST", "StatsProvider", "UapiConnection",
    "UapiError", "UapiHost", "UapiLoop", "format_endpoint", "handle_get", "handle_get_stats",
    "handle_set", "iter_get", "parse_endpoint", "parse_prefix",
]

SOCKET_DIR = "/var/run/wireguard"
MAX_LINE_LENGTH = 4096  # the longest legitimate line is ~80 bytes
MAX_BUFFERED_INPUT = 1 << 16  # unparsed bytes a connection holds before its reader pauses
OUTPUT_BUDGET = 1 << 16  # bytes of answer produced per process() call
WORK_BUDGET = 1024  # lines parsed, operations applied or peers listed per process() call
GET_CHUNK = 128  # allowed_ip lines of one peer per piece of a get answer

STATS_REQUEST = b"get=fzpoll\n\n"  # fzpoll's read-only statistics request (not wireguard-go's)
STATS_KEY = "fzpoll_stats"
StatsProvider = Callable[[], dict[str, Any]]


class UapiLoop(Protocol):
    """The loop methods :class:`~fzpoll.uapi.server.UapiServer` uses; callbacks receive ``now``."""

    def add_reader(self, fd: int, callback: Callable[[float], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[float], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...

    def add_timer_source(self, next_deadline: Callable[[], float | None],
                         handle: Callable[[float], None]) -> None: ...


class CommitLock:
    """Serializes the commits of ``set`` requests of all clients (wireguard-go's ipcMutex): a
    commit spread over several passes is never interleaved with another client's."""

    __slots__ = ("owner",)

    def __init__(self) -> None:
        self.owner: object | None = None


# ---------------------------------------------------------------------------------------------
# get=1


def _handshake_time(wall: float) -> tuple[int, int]:
    """Unix seconds and nanoseconds of a wall-clock float (0, 0 when never)."""
    if not wall or not math.isfinite(wall) or wall < 0:
        return 0, 0
    sec = int(wall)
    return sec, min(int((wall - sec) * 1e9), 999_999_999)


def _device_lines(host: UapiHost) -> list[str]:
    lines: list[str] = []
    private = host.engine.private_key
    if private is not None:
        lines.append(f"private_key={clamp(private.raw).hex()}")
    if host.listen_port:
        lines.append(f"listen_port={int(host.listen_port)}")
    if host.fwmark:
        lines.append(f"fwmark={int(host.fwmark)}")
    return lines


def _peer_lines(peer: Peer) -> list[str]:
    sec, nsec = _handshake_time(peer.last_handshake_wall)
    lines = [
        f"public_key={peer.public_key.hex()}",
        f"preshared_key={peer.preshared_key.hex()}",
        "protocol_version=1",
    ]
    if peer.endpoint is not None:
        lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
    lines += (
        f"last_handshake_time_sec={sec}",
        f"last_handshake_time_nsec={nsec}",
        f"tx_bytes={peer.tx_bytes}",
        f"rx_bytes={peer.rx_bytes}",
        f"persistent_keepalive_interval={peer.persistent_keepalive_interval}",
    )
    return lines


def iter_get(host: UapiHost) -> Iterator[str]:
    """The answer to ``get=1`` in slices (about one peer, or GET_CHUNK allowed IPs, each).

    The peers are those present when it starts; one removed meanwhile is left out, so a
    ``set`` committed while a long answer is streamed never breaks it.
    """
    engine = host.engine
    head = _device_lines(host)
    if head:
        yield "\n".join(head) + "\n"
    for peer in list(engine.peers.values()):
        if peer.removed:
            continue
        text = "\n".join(_peer_lines(peer)) + "\n"
        prefixes = engine.allowed_prefixes_of(peer)
        for start in range(0, len(prefixes), GET_CHUNK):
            text += "".join(f"allowed_ip={format_prefix_key(p)}\n" for p in prefixes[start:start + GET_CHUNK])
            yield text
            text = ""
        if text:
            yield text
    yield "errno=0\n\n"


def handle_get(host: UapiHost) -> str:
    """The complete answer to ``get=1``, ending with ``errno=0`` and the blank line."""
    return "".join(iter_get(host))


def handle_set(host: UapiHost, lines: Iterable[str], now: float) -> int:
    """Apply the lines of a ``set=1`` body (without the ``set=1`` line) all or nothing.

    Returns 0, or the positive errno that rejected it (the reply line is ``errno=-N``): EINVAL
    for a bad value or unknown key, EPROTO for a line without ``=``, EADDRINUSE (or the host's
    own UapiError) when the port cannot be bound. A blank line ends the body. On failure nothing
    is applied. Never raises for any input.
    """
    txn = SetTransaction(getattr(host, "zone_exists", None))
    for line in lines:
        if line == "":
            break
        txn.add_line(line)
    return txn.apply(host, now)


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
_Job = Iterator["int | bytes"]  # yields work units done (int) or answer bytes


class UapiConnection:
    """Frames one client's bytes into ``get=1\\n\\n`` / ``set=1\\n...\\n\\n`` requests.

    Feed bytes with :meth:`receive_data` (``b""`` means EOF) and write back what it returns;
    while :attr:`has_pending` is True, call :meth:`process` again (on a later pass) for more.
    After :attr:`closing` turns True, write what was returned and close. :attr:`wants_input` says
    whether to read more from the client: False while a request is being worked on or enough
    input waits (input is then left in the kernel: memory stays bounded per connection).
    Never raises: a line over ``max_line`` bytes or an unknown operation is answered with
    ``errno=-71`` (EPROTO) and ends the connection.
    """

    def __init__(self, host: UapiHost, *, max_line: int = MAX_LINE_LENGTH,
                 output_budget: int = OUTPUT_BUDGET, stats: StatsProvider | None = None,
                 lock: CommitLock | None = None) -> None:
        self.host = host
        self.stats = stats
        self.max_line = max_line
        self.output_budget = output_budget
        self.lock = lock if lock is not None else CommitLock()
        self.closing = False
        self.has_pending = False
        self.requests = 0  # requests answered
        self._buf = bytearray()
        self._pos = 0
        self._state = _OP
        self._txn: SetTransaction | None = None
        self._job: _Job | None = None
        self._job_locks = False  # the job is a commit: it holds self.lock
        self._eof = False

    @property
    def wants_input(self) -> bool:
        return not self.closing and not self._eof and self._job is None \
            and len(self._buf) - self._pos < MAX_BUFFERED_INPUT

    @property
    def committing(self) -> bool:
        """A ``set`` is being applied: it must run to its end even if the client goes away."""
        return self._job is not None and self._job_locks

    def feed(self, data: bytes) -> None:
        """Take bytes from the client (``b""`` = EOF) without working on them yet."""
        if self.closing:
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def receive_data(self, data: bytes, now: float) -> bytes:
        """:meth:`feed`, then :meth:`process`: the bytes to send back."""
        self.feed(data)
        return self.process(now)

    def process(self, now: float, budget: int = WORK_BUDGET) -> bytes:
        """Do up to ``budget`` units of work and return up to about ``output_budget`` bytes."""
        out = bytearray()
        if self.closing:
            return b""
        spent = 0
        try:
            while spent < budget and len(out) < self.output_budget and not self.closing:
                if self._job is not None:
                    if self._job_locks:
                        if self.lock.owner not in (None, self):
                            break  # another client's commit runs: ours waits its turn
                        self.lock.owner = self
                    item = next(self._job, None)
                    if item is None:
                        self._end_job()
                    elif isinstance(item, int):
                        spent += item
                    else:
                        out += item
                        spent += 1 + len(item) // 64  # about one unit per line of answer
                    continue
                if self._state == _SET:
                    taken = self._set_lines(out, now, budget - spent)
                    if taken:
                        spent += taken
                        continue
                if not self._step(out, now):
                    break
                spent += 1
            self.has_pending = not self.closing and (self._job is not None or spent >= budget
                                                     or len(out) >= self.output_budget)
        except Exception:  # a bug in a host or the engine: answer EIO and drop this client only
            log.exception("uapi request failed")
            out += _status(errno.EIO)
            self._close()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        return bytes(out)

    def _end_job(self) -> None:
        self._job = None
        if self._job_locks and self.lock.owner is self:
            self.lock.owner = None
        self._job_locks = False

    def _close(self) -> None:
        if self.lock.owner is self:
            self.lock.owner = None
        self.closing = True
        self.has_pending = False
        self._buf.clear()
        self._pos = 0
        self._txn = None
        self._job = None

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
            return self._get_terminator(out)
        line = self._next_line(out)
        if line is None:
            return self._eof and not self.closing and self._at_eof(now)
        if self._state == _OP:
            if line == b"get=1":
                self._state = _GET
            elif line == b"set=1":
                self._state, self._txn = _SET, SetTransaction(getattr(self.host, "zone_exists", None))
            elif line == STATS_REQUEST[:-2] and self.stats is not None:
                self._state = _GET_STATS
            else:
                self._fail(out, errno.EPROTO, "unknown operation")
            return True
        if line.endswith(b"\r"):
            line = line[:-1]  # Go's bufio.ScanLines drops a trailing CR
        if line:
            self._txn.add_line(line.decode("latin-1"))  # type: ignore[union-attr]
        else:
            self._start_commit(now)
        return True

    def _set_lines(self, out: bytearray, now: float, limit: int) -> int:
        """In a set body: take up to ``limit`` complete lines at once (the fast path of big
        requests); returns how many, 0 when none is complete (or the one waiting is too long)."""
        buf, pos = self._buf, self._pos
        end = buf.rfind(b"\n", pos, pos + limit * 48)
        if end < 0:
            return 0
        lines = bytes(buf[pos:end]).split(b"\n")[:limit]
        taken = 0
        for i, line in enumerate(lines):
            if not line or line == b"\r":
                lines = lines[:i]
                break
        for line in lines:
            taken += len(line) + 1
            if len(line) > self.max_line:
                self._fail(out, errno.EPROTO, "line too long")
                return 1
        if not lines:
            return 0
        if b"\r" in buf[pos:pos + taken]:
            lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        self._pos = pos + taken
        self._txn.add_lines(lines)  # type: ignore[union-attr]
        return len(lines)

    def _get_terminator(self, out: bytearray) -> bool:
        """``get=1\\n`` must be followed by ``\\n`` (wireguard-go: anything else is EINVAL)."""
        if self._pos >= len(self._buf):
            if self._eof:
                self._close()
            return False
        byte = self._buf[self._pos]
        self._pos += 1
        state, self._state = self._state, _OP
        if byte != 0x0A:
            self.requests += 1
            out += _status(errno.EINVAL)
        elif state == _GET_STATS and self.stats is not None:
            self.requests += 1
            out += handle_get_stats(self.stats).encode()
        else:
            self._job = self._get_job()
        return True

    def _get_job(self) -> _Job:
        for text in iter_get(self.host):
            yield text.encode()
        self.requests += 1

    def _start_commit(self, now: float) -> None:
        txn, self._txn, self._state = self._txn, None, _OP
        self._job, self._job_locks = self._commit_job(txn, now), True  # type: ignore[arg-type]

    def _commit_job(self, txn: SetTransaction, now: float) -> _Job:
        yield from txn.commit(self.host, now)
        self.requests += 1
        yield _status(txn.result or 0)

    def _at_eof(self, now: float) -> bool:
        """The client closed its side: a set body is applied with its last, unterminated line
        (as Go's bufio.Scanner returns it), answered, then the connection closes."""
        if self._state == _SET:
            rest = bytes(self._buf[self._pos:])
            self._pos = len(self._buf)
            if rest.endswith(b"\r"):
                rest = rest[:-1]
            if rest:
                self._txn.add_line(rest.decode("latin-1"))  # type: ignore[union-attr]
            self._start_commit(now)
            return True
        self._close()
        return False
