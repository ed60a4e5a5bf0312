"""The daemon process: wireguard-go compatible start-up, signals, systemd notification, reload.

``fzpoll [-f] IFACE`` behaves as ``wireguard-go [-f] IFACE``: it creates the interface, serves the
UAPI, and without ``-f`` returns once the interface is ready, leaving the daemon running.
``fzpoll up CONFIG`` reads a wg-quick style file, configures addresses and routes too, and runs in
the foreground (the systemd unit uses it). Either exits cleanly, removing its interface and
socket, on SIGTERM/SIGINT or when its interface is deleted.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from fzpoll.wireguard.constants import DEFAULT_BATCH_SIZE, DEFAULT_MTU
from fzpoll.device import Device, bind_udp
from fzpoll.errors import LocalError
from fzpoll.up.hooks import HookError, run_hooks
from fzpoll.up import forked
from fzpoll.io.linkwatch import LinkWatcher
from fzpoll.io.datapath import TunGone
from fzpoll.io.loop import MAX_PENDING_WRITES
from fzpoll.sdnotify import Notifier
from fzpoll.wireguard.peer import Event, HandshakeCompleted, HandshakeGaveUp, HandshakeInitiated, KeysZeroed

if TYPE_CHECKING:  # imported where used: a daemon without a config file, DNS or resources never loads them
    from fzpoll.up import reload
    from fzpoll.config import Config
    from fzpoll.dns.forwarder import DnsForwarder
    from fzpoll.dns.resources import ResourcesIO

log = logging.getLogger("fzpoll.daemon")

STATUS_INTERVAL = 10.0  # how often STATUS= is refreshed for systemd while running
# How each engine event is logged: the handshake outcomes at info, the routine ones at debug.
_EVENT_LOG = {
    HandshakeInitiated: (logging.DEBUG, "handshake initiated"),
    HandshakeCompleted: (logging.INFO, "handshake complete"),
    HandshakeGaveUp: (logging.INFO, "handshake gave up"),
    KeysZeroed: (logging.DEBUG, "keys zeroed"),
}


@dataclass(frozen=True)
class Options:
    ifname: str
    foreground: bool = True
    schedule: str = "fair"
    batch_size: int = DEFAULT_BATCH_SIZE
    config_path: str | None = None
    resolv_conf: str | None = None  # where to write the DNS stub's sentinels as nameserver lines
    # Daemonized (not ``foreground``): keep logging to the caller's stderr once ready? As
    # wireguard-go, only when asked (LOG_LEVEL or --log-level); otherwise stdout and stderr go to
    # /dev/null at readiness, so a caller reading our output to EOF (wg-quick under a test,
    # ``$(fzpoll wg0)``) is not held open by the daemon for its whole life.
    keep_stderr: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LocalError(f"batch size must be a whole number >= 1, not {self.batch_size!r}")
        if self.schedule not in ("fair", "priority"):
            raise LocalError(f"schedule must be fair or priority, not {self.schedule!r}")


class Daemon:
    """Runs one :class:`Device` with its UAPI server inside the loop, until told to stop."""

    def __init__(self, options: Options, config: Config | None = None) -> None:
        from fzpoll.uapi.server import UapiServer

        self.options = options
        self.config = config
        mtu = config.interface.mtu if config is not None and config.interface.mtu else DEFAULT_MTU
        port = config.interface.listen_port if config is not None and config.interface.listen_port else 0
        self.device = Device(options.ifname, mtu=mtu, batch_size=options.batch_size,
                             schedule=options.schedule, listen_port=port)
        self.loop = self.device.loop
        self.notifier = Notifier()
        self.exit_code = 0
        # Routes and rules (up.routing.PolicyRouting), made on the first config by the
        # configuration child and kept here pickled: unpickling would import pyroute2.
        self._routing_state: bytes | None = None
        self.hooks_armed = False  # PostUp done: PreDown/PostDown run when we stop
        self._addresses: set[str] = set()
        self.dns: DnsForwarder | None = None
        self.resources: ResourcesIO | None = None
        self._last_status = float("-inf")
        self._watchdog_interval = self.notifier.watchdog_interval()
        self._notify_enabled = self.notifier.enabled  # fixed: the environment is read once
        self._last_watchdog = float("-inf")
        self.link: LinkWatcher | None = None
        try:
            self.uapi = UapiServer(self.device.name, self.device, self.loop, stats=self.stats_snapshot)
        except BaseException:
            self.device.close()
            raise
        self._signal_r, self._signal_w = socket.socketpair()
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        self.loop.add_reader(self._signal_r.fileno(), self._on_signal)
        self.loop.add_timer_source(self._next_housekeeping, self._housekeeping)
        self.reloader: reload.Reloader | None = None
        self._watch_link(mtu)
        if options.config_path is not None:
            from fzpoll.up import reload

            self.reloader = reload.Reloader(
                options.config_path, self.loop,
                lambda config, resolved: self.configure(config, initial=False, resolved=resolved),
                time.monotonic, self.notifier.ready, self.uapi.commit_lock)

    # ------------------------------------------------------------------ configuration

    def apply_config(self, config: Config, *, initial: bool,
                     resolved: dict[bytes, tuple] | None = None) -> None:
        """Apply ``config`` in one go (start-up, before the loop runs): see :meth:`configure`."""
        for _ in self.configure(config, initial=initial, resolved=resolved):
            pass

    def configure(self, config: Config, *, initial: bool,
                  resolved: dict[bytes, tuple] | None = None) -> Iterator[None]:
        """Apply ``config`` like ``wg setconf`` at start, like ``wg syncconf`` on reload, all or
        nothing (see :mod:`fzpoll.up.reload`). A generator: its first steps do everything that can
        fail - resolving (blocking, only when ``resolved`` is None: before the loop runs),
        validating the peers (one step), then binding a new port, changing addresses and routes,
        the fwmark (the next) - and raise LocalError having changed nothing; the next steps commit
        the peers in slices (they cannot fail), then the new sockets and the DNS stub go in."""
        from fzpoll.up import reload

        if initial:
            for warning in config.warnings:
                log.warning(warning)
        if resolved is None:
            resolved = {raw: reload.resolve(host, port)
                        for raw, (host, port) in reload.hostnames(config).items()}
        current = None if initial else list(self.device.engine.peers)
        txn = reload.stage(reload.set_lines(config, resolved, current), self.device.zone_exists)
        if not initial:
            yield  # validated, nothing changed yet: the changes start in the next pass
        sockets = self._bind_new_port(config)
        try:
            if initial:
                self._sync_dns(config)
                self._sync_resources(config)
            yield from self._sync_network_steps(config)
            steps = txn.commit(self.device, time.monotonic())
            first = next(steps, None)
            if first is None and txn.result:  # only the fwmark can fail, and it was undone
                if not initial and self.config is not None:
                    self._sync_network(self.config)  # the routes and addresses back as they were
                err = txn.result
                raise LocalError(f"applying {self.options.config_path}: {txn.error_key}: errno {err} ({os.strerror(err)})")
        except BaseException:
            for s in sockets or ():
                s.close()
            raise
        yield
        for _ in steps:
            yield
        if sockets:
            self.device.install_sockets(sockets)
        if not initial:
            had_dns = self.dns is not None
            self._sync_dns(config)
            self._sync_resources(config)
            if self.dns is not None and not had_dns:
                self._route_dns(config)
        self.config = config

    def _bind_new_port(self, config: Config) -> list[socket.socket] | None:
        """Sockets on the config's ListenPort if it differs from ours (None: no change)."""
        port = config.interface.listen_port
        if port is None or port == self.device.listen_port or self.config is None:
            return None
        try:
            return bind_udp(port, self.device.fwmark)
        except OSError as exc:
            raise LocalError(f"cannot listen on UDP port {port}: {exc.strerror}") from None

    def _route_dns(self, config: Config) -> None:
        """A reload started the DNS stub: route its addresses too (the peers are applied)."""
        try:
            self._sync_network(config)
        except LocalError as exc:
            log.error("cannot route the DNS stub's addresses", extra={"fields": {"error": str(exc)}})

    def _sync_dns(self, config: Config) -> None:
        """The DNS stub runs when the config names DNS servers or declares resources."""
        from fzpoll.dns.forwarder import DnsForwarder, make_stub, write_resolv_conf
        from fzpoll.dns.stub import Resource

        resources = [Resource(r.name, r.peer.base64()) for r in config.resources]
        if self.dns is not None:
            self.dns.stub.set_resources(resources)
            self.dns.reroute_proxies()
            return
        if not config.interface.dns and not resources:
            return
        stub = make_stub(list(config.interface.dns), resources)
        self.dns = DnsForwarder(stub, self.loop, self.device.datapath)  # kernel_limit: with the routes
        log.info("DNS stub ready", extra={"fields": {
            "sentinels": [str(s) for s in stub.sentinels],
            "upstreams": [f"{h}:{p}" for h, p in (stub.upstream_for(s) for s in stub.sentinels)],
            "search": list(config.interface.dns_search),
        }})
        if self.options.resolv_conf:
            write_resolv_conf(stub, self.options.resolv_conf, config.interface.dns_search)

    def _sync_resources(self, config: Config) -> None:
        """The client side of DNS resources runs with ``[Resource]``s, the gateway side with
        ``[Gateway]``; both are set up once (the gateway's patterns follow a reload)."""
        gateway_config = config.gateway
        if self.resources is not None:
            if self.resources.gateway is not None and gateway_config is not None:
                self.resources.gateway.set_patterns(list(gateway_config.resources))
                self.resources.gateway.keep_only({p.public_key.base64() for p in config.peers})
            return
        if not config.resources and gateway_config is None:
            return
        from fzpoll.dns.forwarder import upstreams_from
        from fzpoll.dns.lookup import Lookups
        from fzpoll.gateway.client import ResourceClient
        from fzpoll.gateway.gateway import Gateway
        from fzpoll.dns.resources import ResourcesIO

        client = ResourceClient() if config.resources else None
        gateway = None
        if gateway_config is not None:
            servers = upstreams_from([gateway_config.dns] if gateway_config.dns is not None else [])
            if not servers:
                raise LocalError("[Gateway]: no DNS server (set DNS = or a nameserver in /etc/resolv.conf)")
            gateway = Gateway(list(gateway_config.resources), Lookups(servers[0]))
            log.info("gateway of DNS resources", extra={"fields": {
                "resources": list(gateway_config.resources), "resolver": servers[0][0]}})
        self.resources = ResourcesIO(self.loop, self.device.datapath, dns=self.dns, client=client, gateway=gateway)

    def _dns_routes(self, config: Config) -> set[str]:
        """Sentinels, and the proxy ranges when resources exist, are routed into the tunnel."""
        if self.dns is None:
            return set()
        from fzpoll.dns.stub import PROXY_V4, PROXY_V6

        routes = {str(ipaddress.ip_network(s)) for s in self.dns.stub.sentinels}
        if config.resources:
            routes |= {str(PROXY_V4), str(PROXY_V6)}
        return routes

    def _sync_network(self, config: Config) -> None:
        """Addresses, MTU, routes and rules to match ``config``; on failure the additions are
        undone and LocalError raised (routes in batches: one netlink round trip per batch)."""
        for _ in self._sync_network_steps(config):
            pass

    def _sync_network_steps(self, config: Config) -> Iterator[None]:
        """:meth:`_sync_network` in a forked child, so that pyroute2 never enters the daemon's
        memory (see :mod:`fzpoll.up.forked`), while the loop goes on (a step per pass until the
        child answers). The child sends back what it configured and the fwmark it chose for a
        full tunnel (already set on the shared UDP sockets); on failure it has undone its
        additions and its LocalError is raised here, nothing changed."""
        self._addresses, self._routing_state, fwmark, dns_limit = yield from forked.steps(
            self._sync_network_in_child, config, os.getpid())
        if fwmark != self.device.fwmark:
            self.device.set_fwmark(fwmark)
        if dns_limit is not None and self.dns is not None:
            self.dns.set_kernel_limit(self.device.name, *dns_limit)

    def _sync_network_in_child(self, config: Config, daemon_pid: int) -> tuple[set[str], bytes, int, tuple[int, str | None] | None]:
        """(Also installs the DNS stub's kernel rate limit, once: fzpoll.dns.shaper.)"""
        import pickle

        from fzpoll.dns import shaper
        from fzpoll.io import netlink
        from fzpoll.up.routing import PolicyRouting

        if self._routing_state is None:
            routing = PolicyRouting(self.device.name, owner_pid=daemon_pid)
        else:
            routing = pickle.loads(self._routing_state)
        for _ in self._network_batches(config, routing, netlink):
            pass
        dns_limit = None
        if self.dns is not None and self.dns.kernel_limit is None:
            dns_limit = shaper.install_sentinel_limit(self.device.name)
        return self._addresses, pickle.dumps(routing), self.device.fwmark, dns_limit

    def _network_batches(self, config: Config, routing, netlink) -> Iterator[None]:
        """Addresses, MTU, routes (in batches: one netlink round trip each) and rules."""
        name = self.device.name
        addresses = {str(address) for address in config.interface.addresses}
        added: list[str] = []
        try:
            if config.interface.mtu:
                netlink.set_mtu(name, config.interface.mtu)
            for address in sorted(addresses - self._addresses):
                netlink.add_address(name, address)
                added.append(address)
            netlink.set_up(name)
            wanted = {net for p in config.peers for net in p.allowed_ips}
            wanted |= {ipaddress.ip_network(cidr) for cidr in self._dns_routes(config)}
            yield from routing.sync_steps(wanted, config.interface.table, self.device)  # undone on failure
        except LocalError:
            self._undo_addresses(added, netlink)
            raise
        for address in sorted(self._addresses - addresses):
            netlink.del_address(name, address)
        self._addresses = addresses

    def _close_routing_in_child(self, state: bytes) -> None:
        import pickle

        pickle.loads(state).close()

    def _undo_addresses(self, addresses: list[str], netlink) -> None:
        """Best effort: take back the addresses a failed :meth:`_sync_network` added."""
        try:
            for address in addresses:
                netlink.del_address(self.device.name, address)
        except LocalError as exc:
            log.error("could not undo a partial network change", extra={"fields": {"error": str(exc)}})

    # ------------------------------------------------------------------ signals and housekeeping

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wakeup fd carries the signal number

    def _on_signal(self, now: float) -> None:
        try:
            data = self._signal_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                self.loop.stop()
            elif signum == signal.SIGHUP:
                self.reload()

    def _watch_link(self, mtu: int) -> None:
        """Hear of our link's deletion and MTU changes from the loop (see io/linkwatch.py)."""
        try:
            self.link = LinkWatcher(self.device.name, mtu)
        except OSError as exc:
            self.close()
            raise LocalError(f"cannot watch link events of {self.device.name}: {exc.strerror}") from None
        self.loop.add_reader(self.link.fileno(), self._on_link)

    def _on_link(self, now: float) -> None:
        assert self.link is not None
        state = self.link.read()
        if state.mtu is not None:
            self.device.engine.set_mtu(state.mtu)
            log.info("MTU changed", extra={"fields": {"interface": self.device.name, "mtu": state.mtu}})
        if state.gone:
            log.info("interface deleted, exiting", extra={"fields": {"interface": self.device.name}})
            self.loop.stop()

    def reload(self) -> None:
        """SIGHUP: start a reload; it finishes from the loop (see :mod:`fzpoll.up.reload`)."""
        if self.reloader is None:
            log.warning("SIGHUP ignored: no configuration file to reload")
            return
        self.notifier.reloading()
        self.reloader.start()

    def _next_housekeeping(self) -> float | None:
        deadline = None  # computed before every wait: no lists here
        if self._watchdog_interval:
            d = self._last_watchdog + self._watchdog_interval
            if deadline is None or d < deadline:
                deadline = d
        if self._notify_enabled:
            d = self._last_status + STATUS_INTERVAL
            if deadline is None or d < deadline:
                deadline = d
        return deadline

    def _housekeeping(self, now: float) -> None:
        if self._watchdog_interval and now >= self._last_watchdog + self._watchdog_interval:
            self._last_watchdog = now
            self.notifier.watchdog()  # sent from inside the loop: a stuck loop stops sending it
        if self.notifier.enabled and now >= self._last_status + STATUS_INTERVAL:
            self._last_status = now
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        peers = self.device.engine.peers.values()
        active = sum(1 for p in peers if p.current is not None)
        return f"{len(peers)} peers, {active} with a session, listening on {self.device.listen_port}"

    # ------------------------------------------------------------------ running

    def announce_ready(self) -> None:
        """Tell systemd and the log that the interface and its UAPI socket are up."""
        self.notifier.ready()
        self.notifier.status(self.status_line())
        log.info("interface ready", extra={"fields": {"interface": self.device.name,
                                                        "port": self.device.listen_port,
                                                        "libsodium": self.device.engine.aead.describe()}})

    def run(self) -> int:
        """Serve until a signal or the interface's deletion; always cleans up. Returns the exit
        code: 0, or 1 if the loop itself failed (systemd's Restart=on-failure then restarts us)."""
        loop = self.loop
        take_events = self.device.engine.take_events
        loop.running = True
        # Everything made so far (modules, pyroute2, the start-up configuration) lives as long
        # as the process: keep it out of the garbage collector's full passes, which otherwise
        # scan it all and stop the loop (76 ms measured while 10,000 peers were added; 11 ms
        # with this). Reference counting still frees these objects as usual.
        gc.freeze()
        try:
            while loop.running:
                loop.run_once()
                events = take_events()
                if events:
                    self._log_events(events)
        except TunGone:
            log.info("interface deleted, exiting", extra={"fields": {"interface": self.device.name}})
        except Exception:  # a bug outside any packet's handling: say so, clean up, exit non-zero
            log.critical("the loop failed", exc_info=True)
            self.exit_code = 1
        finally:
            self.notifier.stopping()
            self.close()
        log.info("stopped", extra={"fields": {"interface": self.device.name}})
        return self.exit_code

    def _log_events(self, events: list[Event]) -> None:
        for event in events:
            level, message = _EVENT_LOG[type(event)]
            log.log(level, message, extra={"fields": {"peer": event.peer.short()}})

    def stats_snapshot(self) -> dict:
        """fzpoll's own counters for ``fzpoll show`` (UAPI ``get=fzpoll``): what wg cannot show."""
        engine, datapath = self.device.engine, self.device.datapath
        stats = {
            "daemon": {
                "pid": os.getpid(),
                "interface": self.device.name,
                "schedule": self.loop.schedule,
                "batch_size": datapath.batch_size,
                "mtu": engine.mtu,
                "listen_port": self.device.listen_port,
                "config": self.options.config_path,
                "uapi_clients": self.uapi.client_count,
                "udp_offloads": datapath.offloads(),
                "tun_offloads": self.device.tun.offloads,
                "sodium": engine.aead.as_dict(),
            },
            "drops": dict(engine.drops),
            "kernel": {"filter": self.device.udp_filter if self.device.prefilter.attached else "off",
                       "drops": self.device.kernel_drops(),
                       "filter_updates": self.device.prefilter.updates,
                       "receiver_indices_checked": self.device.prefilter.check_indices,
                       "replay_floors": self.device.prefilter.floors_on,
                       "replay_floods": self.device.prefilter.replay.activations},
            "poller": datapath.stats.as_dict(),
            "pending_writes": datapath.pending_writes(),
            "staged_packets": engine.staged_packet_count(),
            # every table remote input can fill: in use and limit; hitting one is counted among
            # the drops (staged_*_full, buffer_full, control_unexpected) or as resets
            "bounds": {**engine.bounds(), "pending_writes_per_fd": {
                "used": max(datapath.pending_writes().values()), "limit": MAX_PENDING_WRITES}},
            "uapi": dict(self.uapi.counters),  # accepted, answered, evicted, timed_out, slices
        }
        if self.dns is not None:
            stats["dns"] = self.dns.stats()
        if self.resources is not None:
            stats["resources"] = self.resources.stats()
        return stats

    def _down_hooks(self, phase: str) -> None:
        """PreDown/PostDown, once PostUp has run; a failure is logged and the stop goes on."""
        if not self.hooks_armed or self.config is None:
            return
        try:
            run_hooks(phase, self.config.interface.hooks(phase), self.device.name)
        except HookError as exc:
            log.error(str(exc), extra={"fields": {"phase": phase, "exit_code": exc.code}})
            self.exit_code = exc.code

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._down_hooks("PreDown")
        if self.resources is not None:
            self.resources.close()
        if self.dns is not None:
            self.dns.close()
        if self.reloader is not None:
            self.reloader.close()
        self.uapi.close()
        if self.link is not None:
            self.link.close()
        if self._routing_state is not None:
            try:
                forked.call(self._close_routing_in_child, self._routing_state)
                self._routing_state = None
            except LocalError as exc:
                log.error(str(exc))
                self.exit_code = 1
        self.device.close()
        self._signal_r.close()
        self._signal_w.close()
        self._down_hooks("PostDown")
        self.hooks_armed = False


_ready_fd: int | None = None  # daemonized child: the pipe to the waiting parent


def _daemonize() -> int | None:
    """Fork. The parent waits until the child reports (see :func:`_report_ready`) and returns the
    exit code for the command: 0 once the interface is ready, 1 if the child failed. The child
    returns None, in a new session, with stdin on /dev/null.

    Until it is ready the child still writes to the caller's stderr, so a start-up error appears
    there exactly once, as a JSON log line written by the child itself.
    """
    global _ready_fd
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        message = b"".join(chunks)
        if message.startswith(b"ok"):
            return 0
        if not message:  # killed, or a bug (its traceback is on stderr): it said nothing
            log.error("the daemon exited before it was ready", extra={"fields": {"pid": pid}})
        return 1
    os.close(r)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    _ready_fd = w
    return None


def _report_ready(ok: bool, keep_stderr: bool = True) -> None:
    """Daemonized child only: tell the parent whether we are up; once up, unless
    ``keep_stderr``, let go of the caller's stdout and stderr (they become /dev/null)."""
    global _ready_fd
    fd, _ready_fd = _ready_fd, None
    if fd is None:
        return
    if ok and not keep_stderr:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        os.write(fd, b"ok\n" if ok else b"error\n")
    except OSError:
        pass  # the parent is gone (killed): nobody to tell
    finally:
        os.close(fd)


def run(options: Options) -> int:
    """Start the daemon; returns the process exit code."""
    if not options.foreground:
        code = _daemonize()
        if code is not None:
            return code
    daemon: Daemon | None = None
    try:
        if options.config_path:
            from fzpoll.config import load_config
        config = load_config(options.config_path) if options.config_path else None
        if config is not None:
            if _link_exists(options.ifname):  # as wg-quick, before any hook runs
                raise LocalError(f"{options.ifname} already exists")
            run_hooks("PreUp", config.interface.pre_up, options.ifname)
        daemon = Daemon(options, config)
        if config is not None:
            daemon.apply_config(config, initial=True)
            run_hooks("PostUp", config.interface.post_up, daemon.device.name)
            daemon.hooks_armed = True
        daemon.install_signal_handlers()
    except LocalError as exc:
        fields = {"phase": exc.phase, "exit_code": exc.code} if isinstance(exc, HookError) else {}
        log.error(str(exc), extra={"fields": fields})
        if daemon is not None:
            daemon.close()
        _report_ready(False)
        return exc.code if isinstance(exc, HookError) else 1
    daemon.announce_ready()
    _report_ready(True, keep_stderr=options.keep_stderr)
    return daemon.run()


def _link_exists(ifname: str) -> bool:
    """Whether an interface of that name exists in this network namespace (no netlink needed)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def interface_name_from_config(path: str) -> str:
    """wg-quick's rule: the interface is named after the file, without ``.conf``."""
    name = os.path.basename(path)
    return name[: -len(".conf")] if name.endswith(".conf") else name

