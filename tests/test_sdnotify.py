import os
import socket
import time

import pytest

from fzpoll.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_unset_is_noop():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval() is None
    notifier.close()


def test_relative_path_is_ignored():
    assert not Notifier({"NOTIFY_SOCKET": "relative/sock"}).enabled


def test_messages(receiver):
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    assert recv(sock) == ["READY=1"]
    assert notifier.status("up\n2 peers")
    assert recv(sock) == ["STATUS=up 2 peers"]
    assert notifier.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert recv(sock) == ["STOPPING=1"]
    notifier.close()


def test_reloading_sends_monotonic_usec(receiver):
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(sock)
    assert first == "RELOADING=1"
    key, _, usec = second.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    notifier.close()


def test_abstract_socket():
    name = f"fzpoll-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert recv(sock) == ["READY=1"]
        notifier.close()


def test_send_failure_does_not_raise(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    with caplog.at_level("DEBUG", logger="fzpoll.sdnotify"):
        assert notifier.ready() is False
    assert any("sd_notify failed" in r.message for r in caplog.records)
    notifier.close()


def test_full_receiver_does_not_block(receiver):
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    results = [notifier.status("x" * 1000) for _ in range(2000)]  # nobody reads: queue fills
    assert results[0] is True and results[-1] is False
    notifier.close()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    notifier = Notifier({"NOTIFY_SOCKET": "/run/unused.sock", **env})
    assert notifier.watchdog_interval() == expected
