"""Reloads (fzpoll/up/reload.py) without namespaces: the stages, the commit lock, the slices."""

from __future__ import annotations

import logging
import os
import select
import time

import pytest

from fzpoll.up import reload
from fzpoll.config import parse_config
from fzpoll.errors import LocalError
from fzpoll.uapi.protocol import CommitLock
from fzpoll.wireguard.keys import PrivateKey

PRIV = PrivateKey(bytes(range(1, 33)))
PEER = PrivateKey(bytes(range(2, 34))).public_key
OTHER = PrivateKey(bytes(range(3, 35))).public_key


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict = {}
        self.timers: list = []
        self.waiting = lambda: False  # a helper thread's result is expected

    def add_reader(self, fd, callback) -> None:
        self.readers[fd] = callback

    def add_timer_source(self, next_deadline, handle) -> None:
        self.timers.append((next_deadline, handle))

    def run_timers(self, now: float = 1.0) -> None:
        deadline_ = time.monotonic() + 5
        for fd, callback in self.readers.items():  # the helper threads' results, when they come
            while time.monotonic() < deadline_ and not select.select([fd], [], [], 0.01)[0] and self.waiting():
                pass
            if select.select([fd], [], [], 0)[0]:
                callback(now)
        for deadline, handle in self.timers:
            d = deadline()
            if d is not None and d <= now:
                handle(now)


def _config_file(tmp_path, text: str):
    path = tmp_path / "wg0.conf"
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


CONF = f"[Interface]\nPrivateKey = {PRIV.base64()}\n[Peer]\nPublicKey = {PEER.base64()}\nAllowedIPs = 10.0.0.0/8\n"


def test_set_lines_syncconf_removes_missing_peers_and_sets_resolved_endpoints() -> None:
    config = parse_config(CONF + "Endpoint = vpn.example:51820\n", "wg0.conf")
    assert reload.hostnames(config) == {PEER.raw: ("vpn.example", 51820)}
    lines = reload.set_lines(config, {PEER.raw: ("192.0.2.7", 51820)}, [PEER.raw, OTHER.raw])
    assert "replace_peers=true" not in lines
    assert lines[-4:] == [f"public_key={OTHER.raw.hex()}", "remove=true",
                          f"public_key={PEER.raw.hex()}", "endpoint=192.0.2.7:51820"]
    assert reload.stage(lines, None).error == 0


def test_stage_names_the_key_never_the_value() -> None:
    with pytest.raises(LocalError) as info:
        reload.stage([f"public_key={PEER.raw.hex()}", f"endpoint={PRIV.hex()}"], None)
    assert "endpoint" in str(info.value) and PRIV.hex() not in str(info.value)


_reloaders: list[reload.Reloader] = []


@pytest.fixture(autouse=True)
def _close_reloaders():
    yield
    while _reloaders:
        _reloaders.pop().close()  # its resolver's socketpair


def _reloader(tmp_path, text: str, configure, lock: CommitLock | None = None):
    loop = FakeLoop()
    ended: list[int] = []
    r = reload.Reloader(_config_file(tmp_path, text), loop, configure, lambda: 0.0,
                        lambda: ended.append(1), lock)
    _reloaders.append(r)
    return loop, r, ended


def test_a_reload_commits_in_slices_holding_the_uapi_lock(tmp_path) -> None:
    progress: list[str] = []

    def configure(config, resolved):
        progress.append("checked")
        yield
        for i in range(3):
            progress.append(f"slice {i}")
            yield

    lock = CommitLock()
    loop, r, ended = _reloader(tmp_path, CONF, configure, lock)
    r.clock = iter([0.0, 0.0, 1.0] * 10).__next__  # every slice is over the budget
    lock.owner = "a client's set"
    r.start()
    loop.waiting = lambda: r.parsing
    loop.run_timers()
    assert progress == [] and not ended  # waits for the client's commit
    lock.owner = None
    loop.run_timers()
    assert progress[:2] == ["checked", "slice 0"] and lock.owner is r and not ended
    for _ in range(5):
        loop.run_timers()
    assert progress == ["checked", "slice 0", "slice 1", "slice 2"]
    assert ended == [1] and lock.owner is None and r.next_deadline() is None


def test_a_failed_check_changes_nothing_and_says_why(tmp_path, caplog) -> None:
    def configure(config, resolved):
        raise LocalError("cannot listen on UDP port 51999: Address already in use")
        yield

    loop, r, ended = _reloader(tmp_path, CONF, configure)
    loop.waiting = lambda: r.parsing
    with caplog.at_level(logging.ERROR, logger="fzpoll.up.reload"):
        r.start()
        loop.run_timers()
        loop.run_timers()
    assert ended == [1] and r.lock.owner is None
    [record] = caplog.records
    assert "nothing changed" in record.getMessage() and "51999" in record.fields["error"]


def test_resolution_results_and_timeout(tmp_path, caplog) -> None:
    configured: list[dict] = []

    def configure(config, resolved):
        configured.append(resolved)
        yield

    text = CONF + "Endpoint = one.example:1\n"
    loop, r, ended = _reloader(tmp_path, text, configure)
    r.resolver.start = lambda generation, names: None  # no resolver threads: fed by hand
    r.clock = lambda: 100.0
    loop.waiting = lambda: r.parsing
    r.start()
    loop.run_timers(0.0)  # the file, parsed by a helper thread
    assert r.next_deadline() == 100.0 + reload.RESOLVE_TIMEOUT
    r._resolved(r.generation, PEER.raw, ("192.0.2.1", 1), None)
    loop.run_timers(200.0)
    assert configured == [{PEER.raw: ("192.0.2.1", 1)}] and ended == [1]
    # a name server that never answers: the reload fails at the deadline, late answers are ignored
    with caplog.at_level(logging.ERROR, logger="fzpoll.up.reload"):
        r.start()
        loop.run_timers(0.0)
        loop.run_timers(100.0 + reload.RESOLVE_TIMEOUT - 0.1)
        assert ended == [1]
        loop.run_timers(100.0 + reload.RESOLVE_TIMEOUT)
        r._resolved(r.generation, PEER.raw, ("192.0.2.2", 1), None)
        loop.run_timers(300.0)
    assert ended == [1, 1] and len(configured) == 1
    assert "timed out" in caplog.records[-1].fields["error"]


def test_a_file_that_does_not_parse_fails_the_reload_from_the_helper(tmp_path, caplog) -> None:
    def configure(config, resolved):
        raise AssertionError("never reached")
        yield

    loop, r, ended = _reloader(tmp_path, CONF + "AllowedIPs = nonsense\n", configure)
    loop.waiting = lambda: r.parsing
    with caplog.at_level(logging.ERROR, logger="fzpoll.up.reload"):
        assert r.start()
        assert not ended  # parsed by a helper thread, not in this pass
        loop.run_timers()
    assert ended == [1] and "AllowedIPs" in caplog.records[-1].fields["error"]
