"""``fzpoll down CONFIG|IFACE``: stop a running ``fzpoll up``, as ``wg-quick down`` stops its tunnel.

The daemon owns its teardown (SIGTERM from systemd must do the same thing), so this finds the
daemon serving IFACE through its UAPI socket (``get=fzpoll`` names its pid), sends it SIGTERM and
waits until it is gone: it has then run PreDown, removed its rules and routes and its interface,
and run PostDown (a failing hook is in the daemon's log and its exit code). If no daemon runs but
a crashed one left rules behind (see :mod:`fzpoll.up.routing`), they are removed.
"""

from __future__ import annotations

import os
import signal
import time

from fzpoll.errors import LocalError
from fzpoll.up.routing import process_running, remove_leftovers
from fzpoll.show import QueryError, interface_status

STOP_TIMEOUT = 60.0  # seconds: down hooks may take a while
POLL_INTERVAL = 0.05


def target_interface(target: str) -> str:
    """wg-quick's rule: a path (``.../wg0.conf``) names the interface by its file; else it is one."""
    if "/" in target or target.endswith(".conf"):
        from fzpoll.daemon import interface_name_from_config

        return interface_name_from_config(target)
    return target


def down(target: str, timeout: float = STOP_TIMEOUT) -> int:
    """Stop the daemon of ``target``; returns the exit code for the command (LocalError if none)."""
    ifname = target_interface(target)
    try:
        stats = interface_status(ifname).stats
    except QueryError as exc:
        removed = remove_leftovers(ifname, only_if_dead=True)
        if removed:
            print(f"{ifname}: no daemon running; removed {len(removed)} rules a crashed run left")
            return 0
        raise LocalError(f"{ifname} is not running: {exc}") from None
    if not stats or "daemon" not in stats:
        raise LocalError(f"{ifname} is not served by fzpoll (wireguard-go? use wg-quick down)")
    pid = int(stats["daemon"]["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            raise LocalError(f"{ifname}: daemon {pid} still running {timeout:g} s after SIGTERM")
        time.sleep(POLL_INTERVAL)
    remove_leftovers(ifname, only_if_dead=True)  # it may have died instead of stopping
    print(f"{ifname}: stopped (pid {pid})")
    return 0
