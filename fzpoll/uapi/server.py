"""The UAPI server: ``/var/run/wireguard/IFACE.sock``, served from inside the loop.

The protocol itself (framing, ``get``, ``set``) is sans-IO in :mod:`fzpoll.uapi.protocol`; this module owns
the listening socket and the client sockets, non-blocking, plugged into the loop through
``add_reader`` / ``add_writer`` (callbacks receive ``now``).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from fzpoll.errors import LocalError
from fzpoll.uapi.protocol import (
    IDLE_TIMEOUT, LISTEN_BACKLOG, MAX_ACCEPTS_PER_WAKEUP, MAX_CLIENTS, RECV_SIZE, SOCKET_DIR,
    StatsProvider, UapiConnection, UapiHost, UapiLoop,
)

log = logging.getLogger("fzpoll.uapi.protocol")

class _Client:
    __slots__ = ("sock", "fd", "conn", "out", "last_active", "reading", "writing")

    def __init__(self, sock: socket.socket, conn: UapiConnection, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = bytearray()
        self.last_active = now
        self.reading = False
        self.writing = False


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

    At most ``max_clients`` clients at once (more are accepted and closed at once); a client
    silent (or not reading) for ``idle_timeout`` seconds is dropped by :meth:`expire_idle`, which
    the owner calls at :meth:`next_deadline`. Pipelined answers wait in a per-client buffer bounded
    by the connection's output budget, and a client is not read while its answer waits. A failing
    client is logged and closed; no exception leaves a callback. ``stats``, when given, answers
    fzpoll's read-only ``get=fzpoll`` request (see :func:`handle_get_stats`).
    """

    def __init__(self, interface: str, host: UapiHost, loop: UapiLoop, *,
                 socket_dir: str = SOCKET_DIR, max_clients: int = MAX_CLIENTS,
                 idle_timeout: float = IDLE_TIMEOUT, stats: StatsProvider | None = None) -> None:
        if not interface or "/" in interface or "\0" in interface or interface in (".", ".."):
            raise LocalError(f"invalid interface name {interface!r}")
        self.interface = interface
        self.host = host
        self.loop = loop
        self.stats = stats  # answers get=fzpoll (None: an unknown operation, as before)
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.path = os.path.join(socket_dir, f"{interface}.sock")
        if len(os.fsencode(self.path)) >= 108:
            raise LocalError(f"UAPI socket path too long: {self.path}")
        self._clients: dict[int, _Client] = {}
        self._closed = False
        self._sock = self._listen(socket_dir)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._fd = self._sock.fileno()
        try:
            loop.add_reader(self._fd, self._on_accept)
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
    def client_count(self) -> int:
        return len(self._clients)

    def next_deadline(self) -> float | None:
        """When :meth:`expire_idle` must next run (None if no client is connected)."""
        if not self._clients:
            return None
        return min(c.last_active for c in self._clients.values()) + self.idle_timeout

    def expire_idle(self, now: float) -> None:
        """Drop the clients that neither sent nor took anything for ``idle_timeout`` seconds."""
        for client in list(self._clients.values()):
            if now - client.last_active >= self.idle_timeout:
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
                    log.warning("uapi accept failed", extra={"fields": {"error": str(exc)}})
                    return
                if len(self._clients) >= self.max_clients:
                    log.warning("uapi: too many clients, refusing one",
                                extra={"fields": {"max_clients": self.max_clients}})
                    sock.close()
                    continue
                sock.setblocking(False)
                client = _Client(sock, UapiConnection(self.host, stats=self.stats), now)
                self._clients[client.fd] = client
                try:
                    self._set_reading(client, True)
                except Exception:
                    log.exception("uapi: cannot register a client")
                    self._drop(client)
        except Exception:
            log.exception("uapi accept failed")

    def _on_readable(self, client: _Client, now: float) -> None:
        try:
            try:
                data = client.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError:
                data = b""
            client.last_active = now
            self._send(client, client.conn.receive_data(data, now), now)
        except Exception:
            log.exception("uapi client failed")
            self._drop(client)

    def _on_writable(self, client: _Client, now: float) -> None:
        try:
            self._send(client, b"", now)
        except Exception:
            log.exception("uapi client failed")
            self._drop(client)

    # -- helpers

    def _send(self, client: _Client, data: bytes, now: float) -> None:
        """Queue ``data``, write as much as the socket takes, and pick what to wait for next."""
        if data:
            client.out += data
        while True:
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
                if client.out:
                    # Backpressure: read nothing more until this answer is taken.
                    self._set_reading(client, False)
                    self._set_writing(client, True)
                    return
            if client.conn.closing:
                self._drop(client)
                return
            if not client.conn.has_pending:
                break
            client.out += client.conn.process(now)
        self._set_writing(client, False)
        self._set_reading(client, True)

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
        for off in (self._set_reading, self._set_writing):
            try:
                off(client, False)
            except Exception:
                log.exception("uapi: unregistering a client failed")
        client.sock.close()
