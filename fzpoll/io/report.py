"""The aggregate error of one pass of the loop, logged at most a few times a second.

Every packet's failure in a pass - a drop reason counted by the datapath or an exception caught
around a packet or a callback - is collected, never raised mid-batch; after the pass they become
one :class:`TunnelError` logged once with counts by kind. A flood must not become a log flood: a
token bucket lets MAX_ERROR_LOGS_PER_SECOND lines through, and what it holds back is summed into
the next line's ``suppressed_since_last``.
"""

from __future__ import annotations

import logging
from collections import Counter

from fzpoll.errors import QUIET_DROPS, TunnelError

MAX_ERROR_LOGS_PER_SECOND = 5.0


class Drops(dict):
    """Drop counts of one pass: a dict that counts from 0 (a Counter costs ~1 us to create)."""

    __slots__ = ()

    def __missing__(self, key: str) -> int:
        return 0


class ErrorReport:
    """Turns one pass's drops and failures into one log line; keeps totals by kind."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.errors: Counter[str] = Counter()  # every kind ever reported, for ``fzpoll show``
        self.last_error: TunnelError | None = None
        self._last_log = float("-inf")
        self._tokens = MAX_ERROR_LOGS_PER_SECOND
        self._suppressed: Counter[str] = Counter()

    def report(self, drops: dict[str, int], failures: list[Exception], now: float) -> None:
        error = TunnelError.from_batch(drops, failures)
        if error is None:
            return
        self.last_error = error
        counts = error.counts()
        self.errors.update(counts)
        self._tokens = min(MAX_ERROR_LOGS_PER_SECOND,
                           self._tokens + (now - self._last_log) * MAX_ERROR_LOGS_PER_SECOND)
        self._last_log = now
        if self._tokens < 1.0:
            self._suppressed.update(counts)
            return
        self._tokens -= 1.0
        fields: dict = {"counts": counts, "total": sum(counts.values())}
        if self._suppressed:
            fields["suppressed_since_last"] = dict(self._suppressed)
            self._suppressed.clear()
        unexpected = error.exceptions
        if unexpected:
            fields["first_unexpected"] = f"{type(unexpected[0]).__name__}: {unexpected[0]}"
        quiet = all(kind in QUIET_DROPS for kind in counts)
        level = logging.ERROR if unexpected else logging.DEBUG if quiet else logging.WARNING
        self.log.log(level, str(error.message), extra={"fields": fields})
