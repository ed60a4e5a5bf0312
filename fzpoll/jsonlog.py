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

Secrets, defense in depth (key objects already hide themselves, see :mod:`fzpoll.wireguard.keys`):

- a value that is a key object is written as its repr, which never shows a secret;
- every registered secret (:func:`register_secret`, for private and preshared keys) is masked
  wherever it appears in the message or in a string value, in its base64 form (padded or not) and
  its hex form (any case); a ``bytes`` value equal to a registered secret is masked too.

Values that JSON cannot hold are written as their ``str()``.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import math
import re
import sys
import threading
from typing import Any, TextIO

from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import _Key

__all__ = ["JsonFormatter", "log_event", "redact_text", "register_secret", "setup_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
RESERVED = frozenset({"time", "severity", "logger", "message", "error", "traceback"})
REDACTED = "<redacted>"

_lock = threading.Lock()
_secret_raw: set[bytes] = set()
_secret_pattern: re.Pattern[str] | None = None
_dirty = False  # secrets were added since the pattern was built


def register_secret(raw: bytes) -> None:
    """Mask this 32-byte key (base64 and hex forms) in every log line from now on.

    Cheap to call for every key of a large configuration: a known key costs a set lookup, and the
    pattern is rebuilt once, when the next line is logged, not once per key.
    """
    global _dirty
    raw = bytes(raw)
    if not raw or not any(raw) or raw in _secret_raw:
        return  # an all-zero key (no preshared key) is not a secret, and masking it is noise
    with _lock:
        _secret_raw.add(raw)
        _dirty = True


def _pattern() -> re.Pattern[str] | None:
    global _secret_pattern, _dirty
    if _dirty:
        with _lock:
            forms = []
            for secret in sorted(_secret_raw):
                b64 = base64.b64encode(secret).decode().rstrip("=")
                forms.append(re.escape(b64) + "=*")
                forms.append("(?i:" + secret.hex() + ")")
            _secret_pattern = re.compile("|".join(forms)) if forms else None
            _dirty = False
    return _secret_pattern


def _forget_secrets() -> None:
    """Drop every registered secret (for tests)."""
    global _secret_pattern, _dirty
    with _lock:
        _secret_raw.clear()
        _secret_pattern = None
        _dirty = False


def redact_text(text: str) -> str:
    """``text`` with every registered secret replaced by ``<redacted>``."""
    pattern = _pattern()
    if pattern is None:
        return text
    return pattern.sub(REDACTED, text)


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
        return REDACTED if raw in _secret_raw else redact_text(str(raw))
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
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
