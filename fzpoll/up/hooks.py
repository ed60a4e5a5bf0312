"""wg-quick's PreUp/PostUp/PreDown/PostDown hooks, run as wg-quick runs them.

wg-quick runs each hook with ``%i`` replaced by the interface name, in file order, by bash
(``eval`` in a subshell of a script that has ``set -e -o pipefail``), and stops at the first one
that fails. fzpoll does the same with ``bash -e -o pipefail -c HOOK`` (``sh -e -c`` where there
is no bash). When they run, and what a failure does:

- PreUp: before the interface exists. A failure stops start-up; ``fzpoll up`` exits with the
  hook's exit code.
- PostUp: once addresses, MTU and routes are in place. A failure undoes the start-up (rules,
  routes, interface; no down hooks, as wg-quick's trap) and exits with the hook's code.
- PreDown: on SIGTERM/SIGINT (or ``fzpoll down``), before routes, rules and the interface go.
- PostDown: after they are gone. A failing down hook is logged and the rest of the shutdown
  still happens (a daemon must stop); the daemon then exits with the hook's code.

Security: hooks run as the daemon (root, or the systemd unit's sandbox), so whoever can write
the configuration file can run commands as root. :func:`fzpoll.config.load_config` refuses a
world-writable file, and hooks in a file owned by anyone but root: keep it ``root:root 0600``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Iterable

from fzpoll.errors import LocalError

log = logging.getLogger("fzpoll.up.hooks")

STDERR_KEPT = 2000  # characters of a hook's stderr kept in the log line


class HookError(LocalError):
    """A hook exited non-zero: carries its exit code, which ``fzpoll up`` exits with."""

    def __init__(self, phase: str, command: str, code: int, stderr: str) -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{phase} hook failed with exit code {code}: {command}{detail}")
        self.phase, self.command, self.code, self.stderr = phase, command, code, stderr


def shell_argv(command: str) -> list[str]:
    """The argv that runs ``command`` as wg-quick would: bash with errexit and pipefail."""
    bash = shutil.which("bash")
    if bash:
        return [bash, "-e", "-o", "pipefail", "-c", command]
    return ["/bin/sh", "-e", "-c", command]


def run_hooks(phase: str, commands: Iterable[str], ifname: str) -> None:
    """Run ``commands`` in order with ``%i`` replaced; raise :class:`HookError` at the first
    failure (the later ones do not run). stdout is passed through; stderr is captured into the
    log (a JSON line like every other) and, on failure, into the error, which says what the hook
    said."""
    for template in commands:
        command = template.replace("%i", ifname)
        log.info(f"running {phase} hook", extra={"fields": {"phase": phase, "command": command}})
        try:
            proc = subprocess.run(shell_argv(command), stdin=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, errors="replace")
        except OSError as exc:
            raise HookError(phase, command, 127, exc.strerror or str(exc)) from None
        stderr = proc.stderr[-STDERR_KEPT:]
        if proc.returncode != 0:
            code = proc.returncode if proc.returncode > 0 else 128 - proc.returncode  # killed: 128+N
            raise HookError(phase, command, code, stderr)
        if stderr.strip():
            log.info(f"{phase} hook wrote to stderr", extra={"fields": {"phase": phase, "stderr": stderr.strip()}})
