"""The protocol-free loop: robust fd handling (trio-style) on real sockets, and its import rule."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from fzpoll.io.loop import Loop


@pytest.fixture
def loop():
    lp = Loop(clock=lambda: 0.0)
    yield lp
    lp.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_a_reused_fd_number_is_registered_again_not_silently_forgotten(loop):
    """A source closes its fd without removing it (epoll forgets it on the close); a new file gets
    the same number: adding it must not be skipped as "already registered" (MOD -> ENOENT -> ADD)."""
    old, old_peer = _pair()
    fd = old.fileno()
    loop.add_reader(fd, lambda now: None)
    old.close()
    new, new_peer = _pair()
    if new.fileno() != fd:  # the kernel hands out the lowest free number: the two ends swap here
        new, new_peer = new_peer, new
    assert new.fileno() == fd
    got: list[bytes] = []
    loop.add_reader(fd, lambda now: got.append(new.recv(100)))
    new_peer.send(b"ping")
    loop.run_once(max_timeout=1)
    assert got == [b"ping"]
    for s in (old_peer, new, new_peer):
        s.close()


def test_removing_an_fd_closed_before_its_removal_is_reported(loop):
    sock, peer = _pair()
    fd = sock.fileno()
    loop.add_reader(fd, lambda now: None)
    sock.close()
    loop.remove_reader(fd)
    loop.run_pass([], 0.0)
    assert loop.last_error is not None and loop.last_error.counts() == {"OSError": 1}
    assert f"fd {fd} was closed" in str(loop.last_error.exceptions[0])
    peer.close()


def test_adding_a_closed_fd_drops_it_and_reports_it(loop):
    sock, peer = _pair()
    fd = sock.fileno()
    sock.close()
    peer.close()
    loop.add_reader(fd, lambda now: None)  # EBADF: no exception here, a failure of the pass
    loop.run_pass([], 0.0)
    assert loop.last_error is not None and loop.last_error.counts() == {"OSError": 1}
    assert f"fd {fd} dropped" in str(loop.last_error.exceptions[0])
    loop.run_pass([(fd, 1)], 0.0)  # a stale event for it runs no callback
    assert loop.last_error.counts() == {"OSError": 1}


def test_a_callback_failing_with_ebadf_has_its_fd_dropped(loop):
    sock, peer = _pair()
    fd = sock.fileno()
    calls: list[int] = []

    def on_readable(now: float) -> None:
        calls.append(1)
        raise OSError(9, "Bad file descriptor")

    loop.add_reader(fd, on_readable)
    peer.send(b"x")
    loop.run_once(max_timeout=1)
    assert calls == [1] and f"fd {fd} dropped" in str(loop.last_error.exceptions[0])
    loop.run_once(max_timeout=0.01)  # still readable, but no longer watched
    assert calls == [1]
    sock.close()
    peer.close()


def test_a_failing_callback_costs_only_itself_and_is_reported(loop):
    a, a_peer = _pair()
    b, b_peer = _pair()
    served: list[str] = []

    def bad(now: float) -> None:
        a.recv(100)
        raise RuntimeError("bug")

    loop.add_reader(a.fileno(), bad)
    loop.add_reader(b.fileno(), lambda now: served.append(b.recv(100).decode()))
    a_peer.send(b"1")
    b_peer.send(b"2")
    loop.run_once(max_timeout=1)
    assert served == ["2"] and loop.last_error.counts() == {"RuntimeError": 1}
    for s in (a, a_peer, b, b_peer):
        s.close()


def test_timer_sources_wait_on_their_hint_and_fire_on_their_deadline(loop):
    fired: list[float] = []
    loop.add_timer_source(lambda: 5.0, fired.append, hint=lambda: 3.0)
    loop.add_timer_source(lambda: 4.0, fired.append)
    assert loop.next_deadline() == 4.0
    loop.run_pass([], 3.5, 3.0)  # the wait's bound came; no exact deadline yet
    assert fired == []
    loop.run_pass([], 5.0, 3.0)
    assert fired == [5.0, 5.0]


def test_the_loop_imports_no_protocol_module():
    code = ("import sys, fzpoll.io.loop; "
            "print(sorted(m for m in sys.modules if m.startswith(('fzpoll.wireguard', 'fzpoll.dns', "
            "'fzpoll.uapi', 'fzpoll.ippacket'))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"
