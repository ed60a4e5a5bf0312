"""Run a function in a short-lived forked child, so what it imports never weighs on the daemon.

The rtnetlink configuration (addresses, MTU, routes) uses pyroute2, whose import alone costs about
19 MiB of resident memory and 80 ms, for a few requests at start-up and on reload. Done in a
forked child, the daemon's memory never holds pyroute2: the child imports it, does the requests,
sends back the function's result (pickled) or its :class:`~fzpoll.errors.LocalError` message over
a pipe, and exits with ``os._exit`` (no cleanup of the parent's fds, sockets or atexit hooks). The
parent waits for it: the daemon is single-threaded and this happens only outside packet handling.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any, Callable, Generator

from fzpoll.errors import LocalError

_OK = b"o"
_ERROR = b"e"


def _child(write_fd: int, fn: Callable[..., Any], args: tuple) -> None:
    """In the child: run ``fn`` and report; never returns."""
    code = 0
    try:
        gc.freeze()  # a collection in the child must not touch (and so copy) the parent's objects
        signal.set_wakeup_fd(-1)  # the parent's signal pipe is not ours to write
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        import pickle

        try:
            message = _OK + pickle.dumps(fn(*args))
        except LocalError as exc:
            message = _ERROR + str(exc).encode("utf-8", "replace")
        except BaseException as exc:  # a bug: say what it was, without a traceback's locals
            message = _ERROR + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        view = memoryview(message)
        while view:
            view = view[os.write(write_fd, view):]
    except BaseException:
        code = 1
    finally:
        try:
            sys.stderr.flush()
        except BaseException:
            pass
        os._exit(code)


def _spawn(fn: Callable[..., Any], args: tuple) -> tuple[int, int]:
    """Fork a child running ``fn(*args)``; (its pid, the read end of its answer pipe)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise LocalError(f"cannot fork the configuration helper: {exc.strerror}") from None
    if pid == 0:
        os.close(read_fd)
        _child(write_fd, fn, args)
    os.close(write_fd)
    return pid, read_fd


def _answer(message: bytes, status: int) -> Any:
    import pickle  # only a daemon with a configuration file comes here

    if message[:1] == _OK:
        return pickle.loads(message[1:])
    if message[:1] == _ERROR:
        raise LocalError(message[1:].decode("utf-8", "replace"))
    raise LocalError(f"the configuration helper died without an answer (wait status {status})")


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child; its result (picklable), or its LocalError raised here."""
    pid, read_fd = _spawn(fn, args)
    chunks = []
    try:
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    return _answer(b"".join(chunks), status)


def steps(fn: Callable[..., Any], *args: Any) -> Generator[None, None, Any]:
    """:func:`call` for a loop that must not wait: yields until the child has answered, then
    returns its result (``result = yield from steps(...)``) or raises its LocalError."""
    pid, read_fd = _spawn(fn, args)
    os.set_blocking(read_fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                yield
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    return _answer(b"".join(chunks), status)
