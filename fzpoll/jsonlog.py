"""JSON-lines logging on top of the standard library's :mod:`logging`.

Every record becomes one line holding one JSON object::

    {"time": "2024-11-24T17:30:00.123Z", "severity": "info", "logger": "fzpoll.poll",
     "message": "peer up", "peer": "AOD66E7i", "endpoint": "10.231.0.2:51820"}

Structured fields: pass them as ``extra={"fields": {...}}`` (or call :func:`log_event`); they are
merged at the top level of the object. A field whose name collides with one of the fixed keys
(``time``, ``severity``, ``logger``, ``message``, ``error``, ``traceback``) is written with a
trailing underscore (``message_``) rather than overwriting it.

An exception attached to a record (``logger.exception(...)`` or ``exc_info=``) becomes an
``error`` field, ``{"type": ..., "message": ...}``; the full traceback is added as a
``traceback`` string only when logging at debug level.

Keys never appear, at a cost per line that does not depend on how many keys are configured:

- at the source: key objects print as ``<PrivateKey (hidden)>`` / ``<PublicKey AOD66E7i>``
  (:mod:`fzpoll.wireguard.keys`), and the code logs peers by their short public key;
- for operator text (a key pasted into the wrong field of a config or a UAPI request, an
  exception's message): the message, string values, field names and exception text go through
  :func:`fzpoll.wireguard.keys.redact`, one regex scan that masks anything key-shaped (base64 or
  hex of 32 bytes, a bytes repr); a ``bytes`` value of 32 bytes is masked whole. There is no
  registry of secrets: nothing grows with the peers, nothing to forget when a peer is removed.

Values that JSON cannot hold are written as their ``str()``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, TextIO

from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import REDACTED, _Key, redact

__all__ = ["JsonFormatter", "log_event", "redact_text", "setup_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
RESERVED = frozenset({"time", "severity", "logger", "message", "error", "traceback"})

def redact_text(text: str) -> str:
    """``text`` with anything key-shaped replaced by ``<redacted>``."""
    return redact(text)


def _clean(value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` with secrets masked."""
    if isinstance(value, _Key):
        return repr(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return REDACTED if len(raw) == 32 and any(raw) else redact_text(str(raw))
    if depth < 8 and isinstance(value, dict):
        return {redact_text(str(k)): _clean(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v, depth + 1) for v in value]
    return redact_text(str(value))


def _severity(levelno: int) -> str:
    for name, number in reversed(LEVELS.items()):
        if levelno >= number:
            return name
    return "debug"


def _rfc3339(created: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-30T20:16:04.123Z (time, not datetime: 0.5 MiB less)."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON; ``with_traceback`` adds full tracebacks."""

    def __init__(self, *, with_traceback: bool = False) -> None:
        super().__init__()
        self.with_traceback = with_traceback

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "severity": _severity(record.levelno),
            "logger": record.name,
            "message": _clean(self._message(record)),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                name = redact_text(str(name))
                out[name + "_" if name in RESERVED else name] = _clean(value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = {"type": type(exc).__name__, "message": _clean(str(exc))}
            if self.with_traceback:
                out["traceback"] = _clean(self.formatException(record.exc_info))
        if record.stack_info and self.with_traceback:
            out["stack"] = _clean(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        try:
            return record.getMessage()
        except Exception as exc:  # a bad %-format must not lose the line
            return f"{record.msg!r} (unformattable: {type(exc).__name__})"


class _JsonHandler(logging.StreamHandler):
    """Marks the handler :func:`setup_logging` installed, so calling it again replaces it."""


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send all logging to ``stream`` (``sys.stderr`` at call time) as JSON lines at ``level``.

    ``level`` is one of debug, info, warning, error, critical (case-insensitive); anything else
    raises :class:`LocalError`. Calling it again replaces the previous setup.
    """
    levelno = LEVELS.get(level.strip().lower()) if isinstance(level, str) else None
    if levelno is None:
        raise LocalError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
    handler = _JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(with_traceback=levelno <= logging.DEBUG))
    root.addHandler(handler)
    root.setLevel(levelno)


def log_event(
    logger: logging.Logger,
    level: str | int,
    message: str,
    /,
    *,
    exc_info: Any = None,
    **fields: Any,
) -> None:
    """Log ``message`` at ``level`` (a name or number) with ``fields`` as top-level JSON keys.

    The message is not %-formatted. ``exc_info`` is passed on to :meth:`logging.Logger.log`.
    """
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise LocalError(f"unknown log level {level!r}")
        level = LEVELS[level.lower()]
    logger.log(level, "%s", message, exc_info=exc_info, extra={"fields": fields}, stacklevel=2)


def quiet_pyroute2(debug: bool = False) -> None:
    """pyroute2's own loggers stay at warning (their debug output is most of a debug log and
    costs time per message) unless ``debug`` asks for them (FZPOLL_PYROUTE2_DEBUG=1). Here, not
    in io/netlink.py: setting a logger's level must not import pyroute2 (19 MiB) into the daemon,
    which only its configuration child uses (up/forked.py)."""
    logging.getLogger("pyroute2").setLevel(logging.DEBUG if debug else logging.WARNING)
