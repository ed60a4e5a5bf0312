"""The systemd notification protocol (sd_notify(3)) with the standard library only.

systemd passes ``NOTIFY_SOCKET``: an AF_UNIX datagram socket given as a filesystem path or, when
it starts with ``@``, an abstract name. Each notification is one datagram of newline-separated
``KEY=VALUE`` assignments. Without ``NOTIFY_SOCKET`` (not run by systemd, or ``Type=`` other than
notify) every method is a no-op.

Sends never raise and never block: a datagram is sent with ``MSG_DONTWAIT``, and a failure (the
manager gone, its queue full) is logged at debug level and reported by returning False. The poll
loop can call these at any time.

Watchdog: with ``WatchdogSec=`` set, systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the
process it is meant for); :meth:`Notifier.watchdog_interval` gives the recommended ping period,
half the timeout, as sd_watchdog_enabled(3) recommends.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


def _address(value: str | None) -> str | None:
    """The socket address for ``NOTIFY_SOCKET``, or None if unset or of an unsupported kind."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.debug("ignoring NOTIFY_SOCKET of an unsupported kind", extra={"fields": {"value": value}})
    return None


class Notifier:
    """Sends readiness, status and watchdog notifications to systemd.

    ``environ`` defaults to ``os.environ``; it is read once, at construction.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True if there is a notification socket to send to."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if it was sent."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError as exc:
            log.debug(
                "sd_notify failed",
                extra={"fields": {"error": f"{type(exc).__name__}: {exc}", "sent": assignments[0]}},
            )
            return False
        return True

    def ready(self) -> bool:
        """Startup (or a reload) finished."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Shutdown began."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload began; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC) lets systemd >= 253 match the reload to the request.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` pings (half the timeout), or None if not wanted."""
        if self._address is None or not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
