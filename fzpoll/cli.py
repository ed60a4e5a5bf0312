"""Command line: ``fzpoll [-f] IFACE`` (as wireguard-go), ``fzpoll up CONFIG``, and tools."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from fzpoll import __version__
from fzpoll.wireguard.constants import DEFAULT_BATCH_SIZE
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import redact

COMMANDS = ("up", "down", "show", "demo", "genkey", "pubkey")


MAX_BATCH_SIZE = 4096  # a pass must stay short: more packets per fd per wakeup only adds latency


def _int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``, else a clear error."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, not {text}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                        help="log level (JSON lines on stderr; default $LOG_LEVEL, else info). "
                        "A daemonized `fzpoll IFACE` keeps logging to stderr only if this or "
                        "$LOG_LEVEL is given, as wireguard-go")
    parser.add_argument("--schedule", choices=["fair", "priority"], default="fair",
                        help="loop schedule: fair batches from every source (default) or the old strict priority")
    parser.add_argument("--batch-size", type=_int_between(1, MAX_BATCH_SIZE), default=DEFAULT_BATCH_SIZE,
                        metavar="N", help=f"packets read per ready fd per wakeup, 1 to {MAX_BATCH_SIZE} "
                        f"(default {DEFAULT_BATCH_SIZE})")


def _interface_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fzpoll",
        description="Userspace WireGuard tunnel daemon. `fzpoll IFACE` creates IFACE and serves its UAPI "
        "(configure it with `wg`), like wireguard-go. Other commands: " + ", ".join(COMMANDS)
        + " (see `fzpoll COMMAND --help`).",
    )
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (default: return once the interface is ready)")
    p.add_argument("--version", action="version", version=f"fzpoll {__version__}")
    _common(p)
    p.add_argument("interface", help="interface name to create (at most 15 characters)")
    return p


def _command_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fzpoll {command}")
    if command == "up":
        p.description = ("Bring up an interface from a wg-quick style file and run in the foreground: "
                         "addresses, MTU, routes (a /0 gets wg-quick's policy routing; Table = off|auto|N), "
                         "PreUp/PostUp/PreDown/PostDown hooks. SIGHUP applies file changes; SIGTERM or "
                         "`fzpoll down` stops it and undoes all of it.")
        p.add_argument("config", help="configuration file; the interface is named after it (wg0.conf -> wg0)")
        p.add_argument("--resolv-conf", metavar="PATH",
                       help="write the DNS stub's sentinel addresses here as resolv.conf nameserver lines")
        _common(p)
    elif command == "down":
        p.description = ("Stop a running `fzpoll up` (its PreDown/PostDown hooks run, its rules, routes "
                         "and interface go), as `wg-quick down`.")
        p.add_argument("target", metavar="CONFIG|IFACE",
                       help="the configuration file it was started with, or the interface name")
    elif command == "show":
        p.description = "Show interfaces, peers and fzpoll's own counters (drops, batches, buffers)."
        p.add_argument("interface", nargs="?", help="interface (default: all fzpoll interfaces)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif command == "demo":
        p.description = "Two network namespaces, two fzpoll daemons, a ping and a transfer through the tunnel."
        p.add_argument("--seconds", type=_positive_float, default=3.0, help="length of the throughput test")
    elif command == "genkey":
        p.description = "Print a new private key (base64), as `wg genkey`."
    elif command == "pubkey":
        p.description = "Read a private key on stdin, print its public key, as `wg pubkey`."
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    try:
        if command is None:
            return _run_interface(_interface_parser().parse_args(argv))
        args = _command_parser(command).parse_args(argv[1:])
        return _COMMANDS[command](args)
    except LocalError as exc:
        print(f"fzpoll: {redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# wireguard-go's LOG_LEVEL words, so an environment set up for it works for us too.
_WIREGUARD_GO_LEVELS = {"verbose": "debug", "silent": "critical"}


def _log_level(args: argparse.Namespace) -> str:
    level = args.log_level or os.environ.get("LOG_LEVEL", "").strip().lower() or "info"
    return _WIREGUARD_GO_LEVELS.get(level, level)


def _log_level_given(args: argparse.Namespace) -> bool:
    """Whether the user asked for logs (so a daemon keeps its stderr), as wireguard-go decides."""
    if args.log_level is not None:
        return True
    return os.environ.get("LOG_LEVEL", "").strip().lower() not in ("", "silent")


def _setup_logging(args: argparse.Namespace) -> None:
    from fzpoll.jsonlog import quiet_pyroute2, setup_logging

    # An unknown $LOG_LEVEL is a LocalError naming the accepted levels (main() prints it).
    setup_logging(_log_level(args))
    quiet_pyroute2(os.environ.get("FZPOLL_PYROUTE2_DEBUG") == "1")


def _run_interface(args: argparse.Namespace) -> int:
    from fzpoll.daemon import Options, run

    _setup_logging(args)
    foreground = args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    return run(Options(ifname=args.interface, foreground=foreground, schedule=args.schedule,
                       batch_size=args.batch_size, keep_stderr=_log_level_given(args)))


def _cmd_up(args: argparse.Namespace) -> int:
    from fzpoll.daemon import Options, interface_name_from_config, run

    _setup_logging(args)
    return run(Options(ifname=interface_name_from_config(args.config), foreground=True,
                       schedule=args.schedule, batch_size=args.batch_size, config_path=args.config,
                       resolv_conf=args.resolv_conf))


def _cmd_down(args: argparse.Namespace) -> int:
    from fzpoll.up.down import down

    return down(args.target)


def _cmd_show(args: argparse.Namespace) -> int:
    from fzpoll.show import show

    return show(args.interface, as_json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fzpoll.demo import demo

    return demo(seconds=args.seconds)


def _cmd_genkey(args: argparse.Namespace) -> int:
    from fzpoll.wireguard.keys import PrivateKey

    print(PrivateKey.generate(os.urandom).base64())
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from fzpoll.wireguard.keys import PrivateKey

    print(PrivateKey.from_text(sys.stdin.read()).public_key.base64())
    return 0


_COMMANDS = {"up": _cmd_up, "down": _cmd_down, "show": _cmd_show, "demo": _cmd_demo, "genkey": _cmd_genkey, "pubkey": _cmd_pubkey}
