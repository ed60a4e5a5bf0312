"""Reloads of ``fzpoll up`` (SIGHUP): all or nothing, and never blocking the loop.

A reload runs in stages, each finished before anything running is changed:

1. read and parse the file, in a helper thread (a :class:`~fzpoll.config.ConfigError` fails
   the reload);
2. resolve the endpoints given as host names, in helper threads (getaddrinfo blocks, so it is
   never called on the loop); the loop goes on forwarding packets and the reload continues when
   every name is resolved, or fails after RESOLVE_TIMEOUT seconds (a dead name server);
3. bind the new UDP port, if it changes, next to the old one;
4. stage and validate the peers as one UAPI transaction (nothing applied yet);
5. change addresses and routes (undone if any change fails);

and only then commit: the engine's transaction (it cannot fail once validated), the new sockets,
the DNS stub. On any failure before the commit nothing changed (key, port, peers, routes) and
the log says why; on success only the difference is applied and sessions are kept.

At start-up (before the loop runs) the same plan is built with blocking resolution.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fzpoll.config import Config, load_config
from fzpoll.errors import LocalError
from fzpoll.uapi.protocol import CommitLock
from fzpoll.uapi.transaction import SetTransaction

log = logging.getLogger("fzpoll.up.reload")

RESOLVE_TIMEOUT = 5.0  # seconds a reload waits for host names before it fails
COMMIT_BUDGET = 0.002  # seconds of a reload's commit per pass of the loop

Sockaddr = tuple
_CONFIG = object()  # the tag of the helper job that reads and parses the file


def resolve(host: str, port: int) -> Sockaddr:
    """getaddrinfo (blocking) to the endpoint form the engine stores; LocalError on failure."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        raise LocalError(f"cannot resolve endpoint host {host!r}: {exc}") from None
    family, _, _, _, sockaddr = info[0]
    return sockaddr if family == socket.AF_INET else (sockaddr[0], sockaddr[1], 0, 0)


def hostnames(config: Config) -> dict[bytes, tuple[str, int]]:
    """Peers (by raw public key) whose endpoint is a name to resolve."""
    return {p.public_key.raw: (p.endpoint.host, p.endpoint.port)
            for p in config.peers if p.endpoint is not None and p.endpoint.ip is None}


def set_lines(config: Config, resolved: dict[bytes, Sockaddr], current_peers: list[bytes] | None) -> list[str]:
    """The UAPI set body for ``config``: ``wg setconf`` at start (``current_peers`` None), ``wg
    syncconf`` on reload (peers kept with their sessions, missing ones removed). The listen port
    is not in it: the daemon binds it itself before the commit."""
    lines = [line for line in config.to_uapi_set().splitlines()
             if line and not line.startswith(("set=", "listen_port="))]
    if current_peers is not None:
        lines.remove("replace_peers=true")
        wanted = {p.public_key.raw for p in config.peers}
        for raw in current_peers:
            if raw not in wanted:
                lines += [f"public_key={raw.hex()}", "remove=true"]
    for raw, sockaddr in resolved.items():
        host = sockaddr[0]
        text = f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"
        lines += [f"public_key={raw.hex()}", f"endpoint={text}"]
    return lines


def stage(lines: list[str], zone_exists: Callable[[str], bool] | None) -> SetTransaction:
    """The validated transaction of ``lines``; LocalError (naming the key, never the value)."""
    txn = SetTransaction(zone_exists)
    for line in lines:
        txn.add_line(line)
    if txn.error:
        raise LocalError(f"invalid configuration for the device: {txn.error_key} (errno {txn.error})")
    return txn


@dataclass
class _Pending:
    """One reload waiting for its host names."""

    config: Config
    deadline: float
    names: dict[bytes, tuple[str, int]]
    resolved: dict[bytes, Sockaddr] = field(default_factory=dict)
    error: str | None = None


class Resolver:
    """Runs a reload's blocking or long work - reading and parsing the file, resolving host
    names - in helper threads; results come back to the loop through a socketpair the loop reads
    (the only wake-up it needs). Results carry the reload's generation: those of a reload that
    timed out are ignored."""

    def __init__(self, add_reader: Callable[[int, Callable[[float], None]], None],
                 on_done: Callable[[int, object, object, str | None], None]) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._lock = threading.Lock()
        self._results: list[tuple[int, object, object, str | None]] = []
        self._on_done = on_done
        add_reader(self._r.fileno(), self._drain)

    def submit(self, generation: int, tag: object, work: Callable[[], object]) -> None:
        """Run ``work()`` in a thread; ``on_done(generation, tag, value, error)`` from the loop."""
        threading.Thread(target=self._work, args=(generation, tag, work), daemon=True,
                         name="fzpoll-reload").start()

    def start(self, generation: int, names: dict[bytes, tuple[str, int]]) -> None:
        for raw, (host, port) in names.items():
            self.submit(generation, raw, lambda host=host, port=port: resolve(host, port))

    def _work(self, generation: int, tag: object, work: Callable[[], object]) -> None:
        try:
            result: tuple = (generation, tag, work(), None)
        except LocalError as exc:
            result = (generation, tag, None, str(exc))
        with self._lock:
            self._results.append(result)
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # closed: the daemon is stopping

    def _drain(self, now: float) -> None:
        try:
            self._r.recv(4096)
        except BlockingIOError:
            pass
        with self._lock:
            results, self._results = self._results, []
        for result in results:
            self._on_done(*result)

    def close(self) -> None:
        self._r.close()
        self._w.close()


Configure = Callable[[Config, dict[bytes, Sockaddr]], Iterator[None]]


class Reloader:
    """Drives reloads for a daemon: ``start()`` on SIGHUP, the rest from the loop.

    ``configure(config, resolved)`` is the daemon's all-or-nothing apply as a generator: its first
    step raises LocalError having changed nothing, or does all that can fail; the rest commits in
    slices, run here at most COMMIT_BUDGET seconds per pass while holding ``lock`` (the UAPI's
    commit lock: a client's ``set`` and a reload never interleave). ``clock`` is monotonic.
    """

    def __init__(self, path: str, loop, configure: Configure, clock: Callable[[], float],
                 on_end: Callable[[], None], lock: CommitLock | None = None) -> None:
        self.path = path
        self.configure = configure
        self.clock = clock
        self.on_end = on_end  # the reload ended (either way): READY=1 for systemd
        self.lock = lock if lock is not None else CommitLock()
        self.generation = 0
        self.pending: _Pending | None = None
        self.ready: tuple[Config, dict[bytes, Sockaddr]] | None = None  # resolved, waiting for the lock
        self.steps: Iterator[None] | None = None  # a commit in progress
        self.again = False  # a SIGHUP came during a reload: run another after it
        self.parsing = False
        self.resolver = Resolver(loop.add_reader, self._resolved)
        loop.add_timer_source(self.next_deadline, self._on_timer)

    def start(self) -> bool:
        """Begin a reload (it goes on from the loop); False if it failed at once (the file)."""
        if self.parsing or self.pending is not None or self.ready is not None or self.steps is not None:
            self.again = True
            return True
        self.generation += 1
        self.parsing = True  # the file is read and parsed by a helper thread (10,000 peers: ~0.2 s)
        self.resolver.submit(self.generation, _CONFIG, lambda: load_config(self.path))
        return True

    def _parsed(self, config: Config | None, error: str | None) -> None:
        self.parsing = False
        if config is None:
            self._fail(error or "cannot read the configuration")
            return
        names = hostnames(config)
        if not names:
            self._finish(config, {})
            return
        self.pending = _Pending(config, self.clock() + RESOLVE_TIMEOUT, names)
        self.resolver.start(self.generation, names)

    def next_deadline(self) -> float | None:
        if self.ready is not None or self.steps is not None:
            return 0.0  # work to do: due at once
        return None if self.pending is None else self.pending.deadline

    def _on_timer(self, now: float) -> None:
        if self.ready is not None and self.lock.owner is None:
            config, resolved = self.ready
            self.ready = None
            self._begin(config, resolved)
        elif self.steps is not None:
            self._run_steps()
        pending = self.pending
        if pending is not None and now >= pending.deadline:
            missing = sorted(host for raw, (host, _) in pending.names.items() if raw not in pending.resolved)
            self._end_pending()
            self._fail(f"resolving endpoint host names timed out after {RESOLVE_TIMEOUT:g} s: {', '.join(missing)}")

    def _resolved(self, generation: int, raw: object, sockaddr: object, error: str | None) -> None:
        if generation != self.generation:
            return
        if raw is _CONFIG:
            self._parsed(sockaddr, error)  # type: ignore[arg-type]
            return
        pending = self.pending
        if pending is None:
            return
        if error is not None:
            self._end_pending()
            self._fail(error)
            return
        pending.resolved[raw] = sockaddr  # type: ignore[index]
        if len(pending.resolved) == len(pending.names):
            self._end_pending()
            self._finish(pending.config, pending.resolved)

    def _end_pending(self) -> None:
        self.pending = None

    def _finish(self, config: Config, resolved: dict[bytes, Sockaddr]) -> None:
        """Everything is resolved: commit when no UAPI ``set`` is committing (next pass)."""
        self.ready = (config, resolved)

    def _begin(self, config: Config, resolved: dict[bytes, Sockaddr]) -> None:
        self.lock.owner = self  # from the first check to the last slice: no client's set between
        self.steps = self.configure(config, resolved)
        self._run_steps()

    def _run_steps(self) -> None:
        """Steps until COMMIT_BUDGET is spent. The first ones check and may raise LocalError
        (nothing changed: the reload fails); a step that checks or changes the network is one
        pass of its own."""
        assert self.steps is not None
        started = self.clock()
        try:
            for _ in self.steps:
                if self.clock() - started >= COMMIT_BUDGET:
                    return  # the rest in the next pass
        except LocalError as exc:
            self.steps = None
            self.lock.owner = None
            self._fail(str(exc))
            return
        self.steps = None
        self.lock.owner = None
        log.info("configuration reloaded", extra={"fields": {"path": self.path}})
        self._ended()

    def _fail(self, why: str) -> None:
        log.error("reload failed, nothing changed: keeping the running configuration",
                  extra={"fields": {"path": self.path, "error": why}})
        self._ended()

    def _ended(self) -> None:
        self.on_end()
        if self.again:
            self.again = False
            self.start()

    def close(self) -> None:
        self.resolver.close()
