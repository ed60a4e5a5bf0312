"""A fresh UDP socket per upstream DNS query, so that every query leaves from a random port.

With one socket for the life of the daemon an off-path attacker who can reach the upstream path
needs only the 16-bit query ID to forge an answer; with a socket per query, bound to port 0 (the
kernel picks a random free ephemeral port, ``ip_local_port_range``), it needs the port too. The
socket is not connected: answers from another address or port still reach us, so the sans-IO
side can check the source and *count* the mismatch (a connected socket would hide it).

:class:`QuerySockets` is served by the loop: each socket is a reader; after each answer (or a
timer) sockets whose query is no longer pending are closed. At most ``max_sockets`` are open;
beyond it a query fails at once (counted by its owner). The process's open-file soft limit is
raised toward its hard limit so that the pool fits.
"""

from __future__ import annotations

import logging
import resource
import socket
from typing import Callable

from fzpoll.io.loop import Loop

log = logging.getLogger("fzpoll.dns.sockets")

MAX_REPLIES_PER_PASS = 16  # datagrams read from one query's socket per wakeup
DEFAULT_MAX_SOCKETS = 1100  # the stub's 1000 recursive queries in flight, and some spare
FILE_LIMIT_SPARE = 512  # descriptors kept for everything else (UAPI clients, TCP fallbacks)


def _raise_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit", extra={"fields": {"error": str(exc)}})


class QuerySockets:
    """One non-blocking UDP socket per query ID in flight."""

    def __init__(
        self,
        loop: Loop,
        *,
        on_reply: Callable[[bytes, tuple, float], None],
        is_pending: Callable[[int], bool],
        max_sockets: int = DEFAULT_MAX_SOCKETS,
    ) -> None:
        self.loop = loop
        self.on_reply = on_reply
        self.is_pending = is_pending
        self.max_sockets = max_sockets
        self._sockets: dict[int, socket.socket] = {}  # query ID -> its socket
        self.ports_used = 0  # sockets opened (for stats)
        _raise_file_limit(max_sockets + FILE_LIMIT_SPARE)

    def __len__(self) -> int:
        return len(self._sockets)

    def send(self, query_id: int, data: bytes, server: tuple[str, int]) -> bool:
        """Send ``data`` to ``server`` from a new socket; False if it could not be sent."""
        if len(self._sockets) >= self.max_sockets or query_id in self._sockets:
            return False
        host, port = server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE, ENFILE
            log.debug("query socket not opened", extra={"fields": {"error": exc.strerror}})
            return False
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.sendto(data, (host, port))
        except OSError as exc:
            log.debug("query not sent", extra={"fields": {"server": host, "error": exc.strerror}})
            sock.close()
            return False
        self._sockets[query_id] = sock
        self.ports_used += 1
        self.loop.add_reader(sock.fileno(), lambda now, q=query_id: self._readable(q, now))
        return True

    def _readable(self, query_id: int, now: float) -> None:
        sock = self._sockets.get(query_id)
        if sock is None:
            return
        for _ in range(MAX_REPLIES_PER_PASS):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:  # ECONNREFUSED from an ICMP error: the timeout will end the query
                continue
            self.on_reply(data, addr, now)
            if not self.is_pending(query_id):
                break
        self.sweep()

    def sweep(self) -> None:
        """Close the sockets of queries that are no longer pending."""
        for query_id in [q for q in self._sockets if not self.is_pending(q)]:
            self._close(query_id)

    def _close(self, query_id: int) -> None:
        sock = self._sockets.pop(query_id)
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        for query_id in list(self._sockets):
            self._close(query_id)
