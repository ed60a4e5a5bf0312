"""The UAPI server: ``/var/run/wireguard/IFACE.sock``, served from inside the loop.

The protocol (framing, ``get``, ``set``) is sans-IO in :mod:`fzpoll.uapi.protocol`; this module is
its IO half: the listening socket and the client sockets, non-blocking, plugged into the loop
with ``add_reader`` / ``add_writer`` and one timer source that runs the clients' work.

Fair service without stalls:

- A readable client is only *read* in its callback (at most RECV_SIZE bytes, and only while its
  connection wants input: unparsed input is bounded per client, the rest waits in the kernel).
  Parsing, committing and answering happen in :meth:`UapiServer.run_work`, the timer source's
  handler, which serves the clients with work in turn (round robin, one slice of WORK_SLICE
  units each) and stops after PASS_BUDGET seconds: a big ``set`` or ``get`` is spread over many
  passes of the loop and packets are handled between them. While work is left the timer source
  is due at once, so the next pass comes without sleeping.
- No small client cap: up to MAX_CLIENTS (1024) at once; when full, the longest-idle client is
  dropped to make room, so idle connections cannot lock the operator's ``wg`` out. A client
  silent (or not reading) for IDLE_TIMEOUT seconds is dropped. Warnings about clients are
  rate-limited (one a second, with the number suppressed).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections import deque
from typing import Callable

from fzpoll.errors import LocalError
from fzpoll.uapi.protocol import (
    SOCKET_DIR, CommitLock, StatsProvider, UapiConnection, UapiHost, UapiLoop,
)

log = logging.getLogger("fzpoll.uapi.server")

MAX_CLIENTS = 1024  # a bound on fds, not a service limit: the longest-idle client makes room
IDLE_TIMEOUT = 10.0  # seconds a client may stay silent (or not read) before it is dropped
LISTEN_BACKLOG = 128
RECV_SIZE = 1 << 16
MAX_ACCEPTS_PER_WAKEUP = 64
PASS_BUDGET = 0.002  # seconds of UAPI work per pass of the loop
WORK_SLICE = 256  # units of work (lines, operations, peers) per client per turn
WARNINGS_PER_SECOND = 1.0


class _Client:
    __slots__ = ("sock", "fd", "conn", "out", "last_active", "reading", "writing", "queued")

    def __init__(self, sock: socket.socket, conn: UapiConnection, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = bytearray()
        self.last_active = now
        self.reading = False
        self.writing = False
        self.queued = False  # in the server's work queue


class _RateLimitedWarning:
    """At most WARNINGS_PER_SECOND lines per message; the rest are counted into the next."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, message: str, now: float, **fields: object) -> None:
        if now - self._last.get(message, float("-inf")) < 1.0 / WARNINGS_PER_SECOND:
            self._suppressed[message] = self._suppressed.get(message, 0) + 1
            return
        self._last[message] = now
        suppressed = self._suppressed.pop(message, 0)
        if suppressed:
            fields["suppressed_since_last"] = suppressed
        log.warning(message, extra={"fields": fields})


def _probe(path: str) -> str:
    """Whether a UAPI socket file is served: "alive", "stale" (nobody listens) or "absent"."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    if not stat.S_ISSOCK(st.st_mode):
        raise LocalError(f"{path} exists and is not a socket: refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            return "stale"
        except FileNotFoundError:
            return "absent"
        except BlockingIOError:
            return "alive"  # its backlog is full: somebody is listening
    return "alive"


class UapiServer:
    """Serves the UAPI on ``SOCKET_DIR/IFACE.sock`` from inside the loop; never blocks.

    See the module docstring for how work is sliced and clients are served in turn. ``stats``,
    when given, answers fzpoll's read-only ``get=fzpoll`` request. ``clock`` measures the work
    budget of a pass (the loop's ``now`` is the time the pass started).
    """

    def __init__(self, interface: str, host: UapiHost, loop: UapiLoop, *,
                 socket_dir: str = SOCKET_DIR, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT, stats: StatsProvider | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not interface or "/" in interface or "\0" in interface or interface in (".", ".."):
            raise LocalError(f"invalid interface name {interface!r}")
        if max_clients < 1 or not idle_timeout > 0:
            raise LocalError("max_clients must be >= 1 and idle_timeout > 0")
        self.interface = interface
        self.host = host
        self.loop = loop
        self.stats = stats  # answers get=fzpoll (None: an unknown operation, as before)
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.path = os.path.join(socket_dir, f"{interface}.sock")
        if len(os.fsencode(self.path)) >= 108:
            raise LocalError(f"UAPI socket path too long: {self.path}")
        self.counters = {"accepted": 0, "answered": 0, "evicted": 0, "timed_out": 0, "slices": 0}
        self._clients: dict[int, _Client] = {}
        self._work: deque[_Client] = deque()
        self._orphans: list[UapiConnection] = []  # commits whose client went away
        self._lock = CommitLock()
        self._warn = _RateLimitedWarning()
        self._closed = False
        self._sock = self._listen(socket_dir)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._fd = self._sock.fileno()
        try:
            loop.add_reader(self._fd, self._on_accept)
            loop.add_timer_source(self.next_deadline, self.run_work)
        except BaseException:
            self._sock.close()
            os.unlink(self.path)
            raise
        log.info("uapi listening", extra={"fields": {"path": self.path}})

    def _listen(self, socket_dir: str) -> socket.socket:
        if not os.path.isdir(socket_dir):
            os.makedirs(socket_dir, mode=0o755, exist_ok=True)
            os.chmod(socket_dir, 0o755)
        state = _probe(self.path)
        if state == "alive":
            raise LocalError(f"interface {self.interface} is already served (socket {self.path})")
        if state == "stale":
            log.warning("removing stale uapi socket: no process listens on it",
                        extra={"fields": {"path": self.path}})
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise LocalError(f"interface {self.interface} is already served (socket {self.path})") from None
            raise LocalError(f"cannot listen on {self.path}: {exc.strerror}") from None
        return sock

    @property
    def commit_lock(self) -> CommitLock:
        """Held while a ``set`` commits; a reload takes it too, so they never interleave."""
        return self._lock

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def next_deadline(self) -> float | None:
        """0.0 (due now) while a client has work, else when the next idle client expires."""
        if self._work or self._orphans:
            return 0.0
        if not self._clients:
            return None
        return min(c.last_active for c in self._clients.values()) + self.idle_timeout

    def run_work(self, now: float) -> None:
        """The timer source's handler: serve queued clients in turn for up to PASS_BUDGET
        seconds, then expire idle clients."""
        work = self._work
        started = self.clock()
        for conn in list(self._orphans):
            conn.process(now, WORK_SLICE)
            if not conn.committing:
                self._orphans.remove(conn)
        for _ in range(len(work)):
            client = work.popleft()
            client.queued = False
            if self._clients.get(client.fd) is not client:
                continue
            self.counters["slices"] += 1
            self._serve(client, now)
            if self.clock() - started >= PASS_BUDGET:
                break
        if not work:
            self.expire_idle(now)

    def expire_idle(self, now: float) -> None:
        """Drop the clients that neither sent nor took anything for ``idle_timeout`` seconds."""
        for client in list(self._clients.values()):
            if now - client.last_active >= self.idle_timeout and not client.queued:
                self.counters["timed_out"] += 1
                log.info("uapi client timed out", extra={"fields": {"fd": client.fd}})
                self._drop(client)

    def close(self) -> None:
        """Close every client and the listening socket, and remove the socket file (if ours)."""
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            self._drop(client)
        try:
            self.loop.remove_reader(self._fd)
        except Exception:
            log.exception("uapi: removing the listening socket from the loop failed")
        self._sock.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove uapi socket", extra={"fields": {"path": self.path, "error": str(exc)}})

    # -- callbacks

    def _on_accept(self, now: float) -> None:
        try:
            for _ in range(MAX_ACCEPTS_PER_WAKEUP):
                try:
                    sock, _addr = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:  # EMFILE and friends: try again on the next wakeup
                    self._warn("uapi accept failed", now, error=exc.strerror)
                    return
                if len(self._clients) >= self.max_clients:
                    self._evict_one(now)
                sock.setblocking(False)
                conn = UapiConnection(self.host, stats=self.stats, lock=self._lock)
                client = _Client(sock, conn, now)
                self._clients[client.fd] = client
                self.counters["accepted"] += 1
                try:
                    self._set_reading(client, True)
                except Exception:
                    log.exception("uapi: cannot register a client")
                    self._drop(client)
        except Exception:
            log.exception("uapi accept failed")

    def _evict_one(self, now: float) -> None:
        """Make room: drop the client that was active least recently."""
        oldest = min(self._clients.values(), key=lambda c: c.last_active)
        self.counters["evicted"] += 1
        self._warn("uapi: too many clients, dropping the longest idle", now,
                   max_clients=self.max_clients)
        self._drop(oldest)

    def _on_readable(self, client: _Client, now: float) -> None:
        """Read only: the work is done in turn by :meth:`run_work`."""
        try:
            try:
                data = client.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError:
                data = b""
            client.last_active = now
            client.conn.feed(data)
            self._queue(client)
            if not client.conn.wants_input:
                self._set_reading(client, False)
        except Exception:
            log.exception("uapi client failed")
            self._drop(client)

    def _on_writable(self, client: _Client, now: float) -> None:
        try:
            self._flush(client, now)
        except Exception:
            log.exception("uapi client failed")
            self._drop(client)

    # -- helpers

    def _queue(self, client: _Client) -> None:
        if not client.queued:
            client.queued = True
            self._work.append(client)

    def _serve(self, client: _Client, now: float) -> None:
        """One turn: a slice of the client's work, then write what it produced."""
        try:
            before = client.conn.requests
            client.out += client.conn.process(now, WORK_SLICE)
            self.counters["answered"] += client.conn.requests - before
            self._flush(client, now)
        except Exception:
            log.exception("uapi client failed")
            self._drop(client)

    def _flush(self, client: _Client, now: float) -> None:
        """Write as much as the socket takes, then pick what to wait for next."""
        if client.out:
            try:
                sent = client.sock.send(client.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (BrokenPipeError, ConnectionError):
                self._drop(client)
                return
            if sent:
                client.last_active = now
                del client.out[:sent]
        conn = client.conn
        if client.out:
            # Backpressure: no more work nor reading until this answer is taken.
            self._set_reading(client, False)
            self._set_writing(client, True)
            return
        self._set_writing(client, False)
        if conn.closing:
            self._drop(client)
            return
        if conn.has_pending:
            self._queue(client)
        self._set_reading(client, conn.wants_input)

    def _set_reading(self, client: _Client, on: bool) -> None:
        if on and not client.reading:
            self.loop.add_reader(client.fd, lambda now, c=client: self._on_readable(c, now))
        elif not on and client.reading:
            self.loop.remove_reader(client.fd)
        client.reading = on

    def _set_writing(self, client: _Client, on: bool) -> None:
        if on and not client.writing:
            self.loop.add_writer(client.fd, lambda now, c=client: self._on_writable(c, now))
        elif not on and client.writing:
            self.loop.remove_writer(client.fd)
        client.writing = on

    def _drop(self, client: _Client) -> None:
        """Unregister and close one client (idempotent); errors are logged, never raised."""
        if self._clients.get(client.fd) is not client:
            return
        del self._clients[client.fd]
        if client.conn.committing:
            self._orphans.append(client.conn)  # a set half applied is finished, not abandoned
        for off in (self._set_reading, self._set_writing):
            try:
                off(client, False)
            except Exception:
                log.exception("uapi: unregistering a client failed")
        client.sock.close()
