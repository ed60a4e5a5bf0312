"""Shared fixtures: the engine pair, a fake UAPI host, and the ``needs`` marker that skips (with
the reason printed) only when the environment lacks root, /dev/net/tun or a command:
``pytestmark = pytest.mark.needs("netns", "dnsmasq")``."""

from __future__ import annotations

import pytest

from helpers import FakeHost, Pair, missing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*what): skip (reason printed) unless each is there: root (uid 0), netns "
        "(root, /dev/net/tun, ip), wireguard-go (netns plus wireguard-go, wg), or a command on PATH")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        reason = missing(*mark.args)
        if reason:
            pytest.skip(reason)


@pytest.fixture
def pair() -> Pair:
    """Engines ``a`` and ``b`` peered with each other, a fake network and clock (seed 1)."""
    return Pair()


@pytest.fixture
def host() -> FakeHost:
    """A UapiHost without sockets (seed 7, the recorded wall clock)."""
    return FakeHost()
