"""The one loop: a single-threaded epoll loop that knows fds, masks, deadlines and passes - no protocol.

Theory of operation
-------------------
Every fd is registered level-triggered in one ``select.epoll``: the data fds a :class:`DataHooks`
owner (the WireGuard datapath, :mod:`fzpoll.io.datapath`) sets masks on with :meth:`Loop.set_mask`,
and any number of auxiliary sources (the UAPI socket and its clients, DNS sockets, the signal
wakeup socket) added with :meth:`Loop.add_reader` / :meth:`Loop.add_writer`. Level triggering
means nobody has to drain an fd to EAGAIN: whatever is left unread is reported again on the next
wakeup.

Each wakeup is one *pass*, in a fixed order (:meth:`Loop.run_pass`):

1. the datapath takes its input: it flushes writes that waited for EPOLLOUT, reads a batch from
   every ready data fd and processes it (see :mod:`fzpoll.io.datapath`);
2. the auxiliary sources' callbacks run, for the events on their fds;
3. due timers fire: every timer source whose deadline has come (the engine's is the first);
4. flushers run: a source sends what it produced during the pass (recursive DNS queries);
5. the datapath gives its output: writes, a TUN re-read, masks.

After the pass, everything that went wrong in it - drops the datapath counted and exceptions
caught around each packet or callback - is logged once as one aggregate error
(:mod:`fzpoll.io.report`). A failure never aborts a pass; only an exception meant to end the loop
does (the datapath's TunGone when the interface is deleted).

The wait's timeout is the earliest deadline of the timer sources; a source may give an O(1) lower
bound of its deadline (``hint``) for the wait, and its exact deadline is looked at only in a pass
that reaches the bound. An idle daemon sleeps in epoll_wait and uses no CPU.

``schedule="priority"`` keeps Firezone's old strict-priority loop (flush, UDP, TUN, auxiliary,
timers; a lower source is served only when every higher one is idle) on the same code, so the
benchmark can compare both: auxiliary sources and timers wait while the datapath was busy.

Robust fd handling (as trio's epoll layer): a mask change tries EPOLL_CTL_MOD and falls back to
ADD on ENOENT (an fd closed behind our back drops out of epoll, and its number may come back for
a new file), an ADD falls back to MOD on EEXIST, and an fd the kernel refuses (EBADF: closed and
not reused) is dropped from the loop with its callbacks and reported as a failure of the pass,
never silently forgotten. Sources remove an fd before closing it; one that does not shows up in
the log.
"""

from __future__ import annotations

import errno
import logging
import select
import time
from collections import deque
from typing import Callable, Protocol

from fzpoll.io.report import Drops, ErrorReport

log = logging.getLogger("fzpoll.io.loop")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
# Events taken per epoll_wait. Level-triggered: fds beyond it stay ready and come in the next pass
# (epoll rotates its ready list), while a small array keeps each wait's buffer small.
MAX_EVENTS = 64
MAX_PENDING_WRITES = 1024  # per output fd
_UNKNOWN = object()  # run_pass: no deadline given
Callback = Callable[[float], None]
Deadline = Callable[[], "float | None"]


class Outbox:
    """Writes to one fd that met EAGAIN, waiting for EPOLLOUT (bounded)."""

    __slots__ = ("pending", "limit")

    def __init__(self, limit: int = MAX_PENDING_WRITES) -> None:
        self.pending: deque = deque()
        self.limit = limit

    def push(self, item) -> bool:
        """Keep ``item`` for EPOLLOUT; False if the box is full (the caller counts the drop)."""
        if len(self.pending) >= self.limit:
            return False
        self.pending.append(item)
        return True


class DataHooks(Protocol):
    """The datapath's two steps of a pass; ``drops`` and ``failures`` are the pass's to fill."""

    def take_input(self, events: list[tuple[int, int]], now: float, drops: dict[str, int],
                   failures: list[Exception]) -> bool:
        """Flush, read and process the data fds; True if there was data (busy)."""

    def give_output(self, now: float, drops: dict[str, int], failures: list[Exception]) -> None:
        """Write what the pass produced and set the data fds' masks."""


class Loop:
    """Owns the epoll fd, the callbacks and the clock; runs passes."""

    def __init__(self, *, schedule: str = "fair", clock: Callable[[], float] = time.monotonic) -> None:
        if schedule not in ("fair", "priority"):
            raise ValueError("schedule must be 'fair' or 'priority'")
        self.schedule = schedule
        self.clock = clock
        self.running = False
        self.passes = 0
        self.datapath: DataHooks | None = None
        self.report = ErrorReport(log)
        self._priority = schedule == "priority"
        self._epoll = select.epoll()
        self._masks: dict[int, int] = {}
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._timer_sources: list[tuple[Deadline, Callback]] = []
        self._wait_deadlines: list[Deadline] = []  # per source: its hint, else its deadline
        self._flushers: list[Callback] = []
        self._failures: list[Exception] = []  # fd errors between passes wait here for the next

    @property
    def last_error(self):
        """The last pass's aggregate :class:`~fzpoll.errors.TunnelError`, if any pass had one."""
        return self.report.last_error

    # ------------------------------------------------------------------ registration

    def set_mask(self, fd: int, mask: int, *, force: bool = False) -> bool:
        """Watch ``fd`` for ``mask`` (0: only errors and hangups). Skips the syscall when the mask is the one
        set last, unless ``force`` (a new registration: the fd number may be a reused one).
        False if the fd was bad and has been dropped (and reported)."""
        old = self._masks.get(fd)
        if old == mask and not force:
            return True
        try:
            if old is None:
                self._ctl(self._epoll.register, self._epoll.modify, errno.EEXIST, fd, mask)
            else:
                self._ctl(self._epoll.modify, self._epoll.register, errno.ENOENT, fd, mask)
        except OSError as exc:
            self.drop_fd(fd, exc)
            return False
        self._masks[fd] = mask
        return True

    @staticmethod
    def _ctl(first, fallback, when: int, fd: int, mask: int) -> None:
        try:
            first(fd, mask)
        except OSError as exc:
            if exc.errno != when:
                raise
            fallback(fd, mask)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (call it before closing the fd)."""
        if self._masks.pop(fd, None) is None:
            return
        try:
            self._epoll.unregister(fd)
        except OSError as exc:  # closed before it was removed: epoll forgot it on the close
            self._failures.append(OSError(exc.errno, f"fd {fd} was closed before leaving the loop: "
                                                     f"{exc.strerror}"))

    def drop_fd(self, fd: int, exc: OSError) -> None:
        """Forget a bad fd (closed or refused by epoll) with its callbacks; report it in the pass."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        if self._masks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # the error being reported is why
        self._failures.append(OSError(exc.errno, f"fd {fd} dropped from the loop: {exc.strerror}"))

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set_callback(self._readers, fd, callback)

    def remove_reader(self, fd: int) -> None:
        self._set_callback(self._readers, fd, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set_callback(self._writers, fd, callback)

    def remove_writer(self, fd: int) -> None:
        self._set_callback(self._writers, fd, None)

    def _set_callback(self, table: dict[int, Callback], fd: int, callback: Callback | None) -> None:
        """Add (or, with None, remove) a reader or writer, and watch ``fd`` for what is left. An
        addition always asks epoll (the number may be a reused one: see the theory of operation)."""
        if callback is not None:
            table[fd] = callback
        elif table.pop(fd, None) is None:
            return
        mask = (EPOLLIN if fd in self._readers else 0) | (EPOLLOUT if fd in self._writers else 0)
        if mask:
            self.set_mask(fd, mask, force=True)
        else:
            self.unwatch(fd)

    def add_flusher(self, callback: Callback) -> None:
        """Called at the end of every pass, before the datapath writes: a source sends what it
        produced (the DNS stub's recursive queries)."""
        self._flushers.append(callback)

    def add_timer_source(self, next_deadline: Deadline, handle: Callback, hint: Deadline | None = None) -> None:
        """A sans-IO object with deadlines (the engine, UAPI idle clients, DNS, watchdog).
        ``hint``: an O(1) lower bound of ``next_deadline()`` the wait may use instead."""
        self._timer_sources.append((next_deadline, handle))
        self._wait_deadlines.append(hint or next_deadline)

    def attach(self, datapath: DataHooks) -> None:
        self.datapath = datapath

    # ------------------------------------------------------------------ running

    def next_deadline(self) -> float | None:
        """The earliest exact deadline of every timer source."""
        return _earliest(source for source, _ in self._timer_sources)

    def run(self) -> None:
        """Run passes until :meth:`stop` (or an exception such as TunGone) ends the loop."""
        self.running = True
        while self.running:
            self.run_once()

    def stop(self) -> None:
        self.running = False

    def run_once(self, max_timeout: float | None = None) -> None:
        """Wait for events or the next deadline (hints where a source has one), then run one pass.
        This runs between the last write of a pass and the next sleep, so it is kept short."""
        deadline = _earliest(self._wait_deadlines)
        if deadline is None:
            timeout = -1.0
        else:
            timeout = deadline - self.clock()
            if timeout < 0.0:
                timeout = 0.0
        if max_timeout is not None:
            timeout = max_timeout if timeout < 0 else min(timeout, max_timeout)
        try:
            events = self._epoll.poll(timeout, MAX_EVENTS)
        except InterruptedError:
            events = []
        self.run_pass(events, self.clock(), deadline)

    def run_pass(self, events: list[tuple[int, int]], now: float, deadline: float | None | object = _UNKNOWN) -> None:
        """One pass over ``events``. ``deadline`` is the deadline (or a lower bound of it) the wait
        was computed for, if the caller has it: timers are then only looked at when it is due (a
        timer armed during a pass is never due in that pass, and if it were, the next wait would
        not sleep)."""
        self.passes += 1
        drops: dict[str, int] = Drops()
        failures = self._failures
        datapath = self.datapath
        busy = datapath.take_input(events, now, drops, failures) if datapath is not None else False
        if not (busy and self._priority):
            readers, writers = self._readers, self._writers
            for fd, _ in events:  # _serve only for an auxiliary fd: a lone packet's pass has none
                if fd in readers or fd in writers:
                    busy = self._serve(events, now, failures) or busy
                    break
            if not (busy and self._priority) and \
                    (deadline is _UNKNOWN or (deadline is not None and deadline <= now)):  # type: ignore[operator]
                self.run_timers(now, failures)
        self.run_flushers(now, failures)
        if datapath is not None:
            datapath.give_output(now, drops, failures)
        if drops or failures:
            self._failures = []
            self.report.report(drops, failures, now)

    def _serve(self, events: list[tuple[int, int]], now: float, failures: list[Exception]) -> bool:
        """Run the auxiliary sources' callbacks for ``events``; True if any ran. A callback whose fd
        turned out closed (EBADF) has that fd dropped from the loop."""
        readers = self._readers
        served = False
        for fd, mask in events:
            callback = readers.get(fd) if mask & (EPOLLIN | EPOLLERR) else None
            if callback is None and mask & EPOLLOUT:
                callback = self._writers.get(fd)
            if callback is not None:
                served = True
                try:
                    callback(now)
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        self.drop_fd(fd, exc)
                    else:
                        failures.append(exc)
                except Exception as exc:
                    failures.append(exc)
        return served

    def run_timers(self, now: float, failures: list[Exception]) -> None:
        for next_deadline, handle in self._timer_sources:
            try:
                d = next_deadline()
                if d is not None and d <= now:
                    handle(now)
            except Exception as exc:
                failures.append(exc)

    def run_flushers(self, now: float, failures: list[Exception]) -> None:
        for flush in self._flushers:
            try:
                flush(now)
            except Exception as exc:
                failures.append(exc)

    def close(self) -> None:
        self._epoll.close()


def _earliest(deadlines) -> float | None:
    """The earliest of the deadlines the callables in ``deadlines`` return (None: never)."""
    earliest = None
    for next_deadline in deadlines:
        d = next_deadline()
        if d is not None and (earliest is None or d < earliest):
            earliest = d
    return earliest
