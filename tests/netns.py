"""Helpers for tests that need real network namespaces (import as ``import netns``).

Everything a test creates is named uniquely (namespaces ``fzt-<pid>-<hex>``, wireguard-go
interfaces ``wgt<hex>``) so parallel runs and leftovers of crashed runs never collide, and
everything is torn down even when the test fails. Every subprocess has a timeout: a broken
setup fails the test quickly instead of hanging the suite.

Typical use::

    reason = need_root()
    if reason:
        pytest.skip(reason)
    with Namespace() as a, Namespace() as b:
        pair = veth_pair(a, b)
        a.run(["ping", "-c1", "-W1", pair.ip_b])
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

NS_PREFIX = "fzt-"
WG_SOCKET_DIR = Path("/var/run/wireguard")
DEFAULT_TIMEOUT = 10.0
_NS_RE = re.compile(r"^fzt-(\d+)-[0-9a-f]+$")


def _cmd(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; on failure raise with its stderr in the message."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"timed out after {timeout}s: {' '.join(argv)}") from None
    if check and proc.returncode != 0:
        output = "\n".join(t.strip() for t in (proc.stdout, proc.stderr) if t.strip())
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(argv)}\n{output}")
    return proc


def need_root() -> str | None:
    """Why namespace tests cannot run here (None if they can); also printed for the log."""
    reason = None
    if os.geteuid() != 0:
        reason = "netns tests need root"
    elif not os.path.exists("/dev/net/tun"):
        reason = "netns tests need /dev/net/tun"
    elif shutil.which("ip") is None:
        reason = "netns tests need the ip command (iproute2)"
    if reason:
        print(f"skipping: {reason}", file=sys.stderr)
    return reason


def need_wireguard_go() -> str | None:
    """Why wireguard-go interop tests cannot run here (None if they can)."""
    reason = need_root()
    if reason is None:
        missing = [c for c in ("wireguard-go", "wg") if shutil.which(c) is None]
        if missing:
            reason = f"interop tests need {' and '.join(missing)}"
            print(f"skipping: {reason}", file=sys.stderr)
    return reason


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(name: str) -> None:
    """SIGKILL every process still living in namespace ``name``."""
    proc = _cmd(["ip", "netns", "pids", name], check=False, timeout=5)
    for pid in proc.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _stop(proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _socket_is_stale(path: Path) -> bool:
    """A UAPI socket nobody listens on (its daemon died without cleaning up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
        except OSError:
            return False
    return False


def cleanup_stale() -> list[str]:
    """Remove ``fzt-*`` namespaces and ``wgt*`` UAPI sockets left by runs that have exited.

    A namespace is stale when the pid in its name is no longer alive, so runs going on in
    parallel keep theirs. Returns the names removed.
    """
    removed: list[str] = []
    listing = _cmd(["ip", "-j", "netns", "list"], check=False, timeout=5).stdout.strip()
    names = [entry["name"] for entry in json.loads(listing or "[]")]
    for name in names:
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_ns_pids(name)
            _cmd(["ip", "netns", "del", name], check=False, timeout=5)
            removed.append(name)
    if WG_SOCKET_DIR.is_dir():
        for sock_path in WG_SOCKET_DIR.glob("wgt*.sock"):
            # Young sockets may belong to a daemon between bind() and listen(): leave them.
            try:
                young = time.time() - sock_path.stat().st_mtime < 10
            except FileNotFoundError:
                continue
            if not young and _socket_is_stale(sock_path):
                sock_path.unlink(missing_ok=True)
                removed.append(str(sock_path))
    return removed


class Namespace:
    """A uniquely named network namespace with lo up; deleted (processes killed) on close."""

    def __init__(self, tag: str = "") -> None:
        self.name = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.tag = tag or self.name
        self._procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Any] = []  # callables run (newest first) before the ns goes
        self._closed = False
        _cmd(["ip", "netns", "add", self.name], timeout=5)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def exec_argv(self, cmd: Sequence[str]) -> list[str]:
        """The argv that runs ``cmd`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace, capturing text output; raise on failure if check."""
        return _cmd(self.exec_argv(cmd), check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS``."""
        return _cmd(["ip", "-n", self.name, *args], check=check, timeout=5)

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n NAME ARGS`` parsed."""
        out = _cmd(["ip", "-j", "-n", self.name, *args], timeout=5).stdout.strip()
        return json.loads(out or "[]")

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside the namespace; it is stopped when the namespace closes.

        stdin defaults to /dev/null so a child never blocks on the test's terminal.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.exec_argv(cmd), **kwargs)
        self._procs.append(proc)
        return proc

    def python(self, code: str, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
               wrapper: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` inside the namespace (warnings as errors) with this checkout
        importable; ``wrapper`` is an argv prefix such as ``setpriv ... --``."""
        repo = str(Path(__file__).resolve().parent.parent)
        env_path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
        return self.run(["env", f"PYTHONPATH={env_path}", *wrapper, sys.executable, "-W",
                         "error", "-c", code], timeout=timeout, check=check)

    def on_close(self, fn: Any) -> None:
        """Call ``fn()`` when the namespace closes, before the namespace is deleted."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Stop helpers and processes, kill stragglers, delete the namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:  # keep cleaning; report after
                errors.append(exc)
        for proc in self._procs:
            try:
                _stop(proc)
            except Exception as exc:
                errors.append(exc)
        _kill_ns_pids(self.name)
        _cmd(["ip", "netns", "del", self.name], check=False, timeout=5)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Namespace":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Each pair gets its own /24 and /64 so several pairs in one namespace never overlap.
_pair_numbers = itertools.count(1)


@dataclass(frozen=True)
class VethPair:
    """Two linked veth ends; ``ip_*`` are bare addresses, ``addr_*`` with their prefix."""

    ns_a: Namespace
    ns_b: Namespace
    if_a: str
    if_b: str
    addr_a: str
    addr_b: str
    addr6_a: str
    addr6_b: str

    @property
    def ip_a(self) -> str:
        return self.addr_a.split("/")[0]

    @property
    def ip_b(self) -> str:
        return self.addr_b.split("/")[0]

    @property
    def ip6_a(self) -> str:
        return self.addr6_a.split("/")[0]

    @property
    def ip6_b(self) -> str:
        return self.addr6_b.split("/")[0]


def veth_pair(ns_a: Namespace, ns_b: Namespace, addr_a: str | None = None,
              addr_b: str | None = None, addr6_a: str | None = None,
              addr6_b: str | None = None) -> VethPair:
    """Link two namespaces with a veth pair, addressed (v4 and v6, no DAD) and up.

    Defaults: 10.231.N.1/24 and .2, fd77:231:0:N::1/64 and ::2, N unique per pair in this run.
    """
    n = next(_pair_numbers) % 250 + 1
    addr_a = addr_a or f"10.231.{n}.1/24"
    addr_b = addr_b or f"10.231.{n}.2/24"
    addr6_a = addr6_a or f"fd77:231:0:{n:x}::1/64"
    addr6_b = addr6_b or f"fd77:231:0:{n:x}::2/64"
    if_a, if_b = f"veth{n}a", f"veth{n}b"
    # Both ends are created directly inside their namespaces: no name is ever taken in the
    # host namespace, so parallel runs cannot collide there.
    _cmd(["ip", "link", "add", if_a, "netns", ns_a.name, "type", "veth",
          "peer", "name", if_b, "netns", ns_b.name], timeout=5)
    for ns, ifname, a4, a6 in ((ns_a, if_a, addr_a, addr6_a), (ns_b, if_b, addr_b, addr6_b)):
        ns.ip("addr", "add", a4, "dev", ifname)
        ns.ip("addr", "add", a6, "dev", ifname, "nodad")
        ns.ip("link", "set", ifname, "up")
    return VethPair(ns_a, ns_b, if_a, if_b, addr_a, addr_b, addr6_a, addr6_b)


def genkey() -> str:
    """A new private key, base64, from ``wg genkey``."""
    return _cmd(["wg", "genkey"], timeout=5).stdout.strip()


def pubkey(private_key: str) -> str:
    """The base64 public key of a base64 private key, from ``wg pubkey``."""
    return _cmd(["wg", "pubkey"], input=private_key + "\n", timeout=5).stdout.strip()


@dataclass(frozen=True)
class WgPeerDump:
    """One peer line of ``wg show IF dump``."""

    public_key: str
    preshared_key: str | None
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # Unix seconds, 0 if never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass(frozen=True)
class WgDump:
    """``wg show IF dump`` parsed: the interface line and its peers."""

    private_key: str | None
    public_key: str | None
    listen_port: int
    fwmark: int | None
    peers: tuple[WgPeerDump, ...] = field(default_factory=tuple)

    def peer(self, public_key: str) -> WgPeerDump:
        for p in self.peers:
            if p.public_key == public_key:
                return p
        raise KeyError(public_key)


def _none(value: str) -> str | None:
    return None if value in ("(none)", "off", "") else value


def parse_wg_dump(text: str) -> WgDump:
    """Parse the tab-separated output of ``wg show IF dump``."""
    lines = [line.split("\t") for line in text.splitlines() if line]
    if not lines or len(lines[0]) != 4:
        raise ValueError(f"unexpected wg dump: {text!r}")
    priv, pub, port, fwmark = lines[0]
    peers = []
    for f in lines[1:]:
        if len(f) != 8:
            raise ValueError(f"unexpected wg dump peer line: {f!r}")
        keepalive = _none(f[7])
        peers.append(WgPeerDump(
            public_key=f[0], preshared_key=_none(f[1]), endpoint=_none(f[2]),
            allowed_ips=tuple(a for a in f[3].split(",") if a and a != "(none)"),
            latest_handshake=int(f[4]), rx_bytes=int(f[5]), tx_bytes=int(f[6]),
            persistent_keepalive=int(keepalive) if keepalive else None,
        ))
    mark = _none(fwmark)
    return WgDump(_none(priv), _none(pub), int(port), int(mark, 0) if mark else None,
                  tuple(peers))


class WireguardGo:
    """Debian's wireguard-go running in a namespace, configured only with ``wg set``.

    The UAPI socket lives in the shared filesystem (/var/run/wireguard/IFNAME.sock), so the
    interface name is random (``wgt`` + 4 hex digits) to keep concurrent tests apart. The
    instance is stopped automatically when its namespace closes.
    """

    program: Sequence[str] = ("wireguard-go", "-f")  # the daemon, before the interface name
    extra_env: dict[str, str] = {}

    def __init__(self, ns: Namespace, ifname: str | None = None,
                 log_level: str = "error") -> None:
        self.ns = ns
        self.ifname = ifname or f"wgt{secrets.token_hex(2)}"
        self.socket_path = WG_SOCKET_DIR / f"{self.ifname}.sock"
        self.log_level = log_level
        self.proc: subprocess.Popen[Any] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix=f"fzt-{self.ifname}-")
        self.log_path = Path(self._tmp.name) / "wireguard-go.log"
        ns.on_close(self.stop)

    def __repr__(self) -> str:
        return f"WireguardGo({self.ifname!r} in {self.ns.name})"

    def start(self, timeout: float = 5.0) -> "WireguardGo":
        """Start ``wireguard-go -f IFNAME`` and wait until its UAPI socket answers."""
        if self.socket_path.exists() and _socket_is_stale(self.socket_path):
            self.socket_path.unlink(missing_ok=True)
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL=self.log_level,
                   WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", **self.extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = self.ns.popen(self.argv(), env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"wireguard-go exited with {self.proc.returncode}: {self.log()}"
                )
            if self.socket_path.exists() and not _socket_is_stale(self.socket_path):
                return self
            time.sleep(0.02)
        raise AssertionError(f"wireguard-go socket {self.socket_path} did not appear: {self.log()}")

    def argv(self) -> list[str]:
        """The command that starts the daemon (a subclass may run it another way)."""
        return [*self.program, self.ifname]

    def log(self) -> str:
        """What wireguard-go printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``wg ARGS`` inside the namespace."""
        return self.ns.run(["wg", *args], check=check, timeout=5)

    def set(self, *args: str) -> None:
        """``wg set IFNAME ARGS``."""
        self.wg("set", self.ifname, *args)

    def configure(self, private_key: str, listen_port: int | None = None) -> None:
        """Set the private key (through a 0600 file, as wg requires) and the listen port."""
        key_file = Path(self._tmp.name) / "private.key"
        key_file.touch(mode=0o600)
        key_file.write_text(private_key + "\n")
        args = ["private-key", str(key_file)]
        if listen_port is not None:
            args += ["listen-port", str(listen_port)]
        self.set(*args)

    def add_peer(self, public_key: str, allowed_ips: Iterable[str] = (),
                 endpoint: str | None = None, persistent_keepalive: int | None = None,
                 preshared_key: str | None = None) -> None:
        """Add or update a peer."""
        args = ["peer", public_key]
        ips = list(allowed_ips)
        if ips:
            args += ["allowed-ips", ",".join(ips)]
        if endpoint:
            args += ["endpoint", endpoint]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive)]
        if preshared_key:
            psk_file = Path(self._tmp.name) / "psk.key"
            psk_file.touch(mode=0o600)
            psk_file.write_text(preshared_key + "\n")
            args += ["preshared-key", str(psk_file)]
        self.set(*args)

    def address(self, *cidrs: str) -> None:
        """Add addresses to the interface (IPv6 without DAD)."""
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []
            self.ns.ip("addr", "add", cidr, "dev", self.ifname, *extra)

    def up(self, mtu: int | None = None) -> None:
        """Bring the interface up (optionally setting its MTU first)."""
        if mtu is not None:
            self.ns.ip("link", "set", self.ifname, "mtu", str(mtu))
        self.ns.ip("link", "set", self.ifname, "up")

    def route(self, *cidrs: str) -> None:
        """Route ``cidrs`` through the interface."""
        for cidr in cidrs:
            self.ns.ip("route", "replace", cidr, "dev", self.ifname)

    def wg_show_dump(self) -> WgDump:
        """``wg show IFNAME dump``, parsed."""
        return parse_wg_dump(self.wg("show", self.ifname, "dump").stdout)

    def public_key(self) -> str | None:
        return self.wg_show_dump().public_key

    def stop(self) -> None:
        """Stop the daemon (SIGTERM removes its socket and TUN; SIGKILL if it hangs)."""
        if self.proc is not None:
            _stop(self.proc)
        self.socket_path.unlink(missing_ok=True)
        self._tmp.cleanup()

    def vnet_hdr(self) -> bool:
        """Whether the TUN device was opened with virtio-net headers (TUN offloads on)."""
        return "vnet_hdr on" in self.ns.ip("-d", "link", "show", "dev", self.ifname).stdout


# Upstream wireguard-go (with sticky sockets and offloads): FZPOLL_WIREGUARD_GO_UPSTREAM, else the
# binary the project keeps beside its checkouts (shared/anchors/README.md says how it is built).
# The upstream build lies in ../shared/anchors beside the checkout (as CI lays it out).
# A git worktree (wt/NAME) sits a level deeper: the first parent with shared/anchors wins.
_ANCHOR = Path("shared") / "anchors" / "wireguard-go-upstream"
UPSTREAM_WIREGUARD_GO = os.environ.get(
    "FZPOLL_WIREGUARD_GO_UPSTREAM",
    str(next((p / _ANCHOR for p in Path(__file__).resolve().parents if (p / _ANCHOR).exists()),
             Path(__file__).resolve().parent.parent.parent / _ANCHOR)))


def need_upstream_wireguard_go() -> str | None:
    """Why tests against upstream wireguard-go cannot run here (None if they can)."""
    reason = need_wireguard_go()
    if reason is None and not os.access(UPSTREAM_WIREGUARD_GO, os.X_OK):
        reason = f"needs upstream wireguard-go at {UPSTREAM_WIREGUARD_GO} (set FZPOLL_WIREGUARD_GO_UPSTREAM)"
        print(f"skipping: {reason}", file=sys.stderr)
    return reason


class UpstreamWireguardGo(WireguardGo):
    """Upstream wireguard-go, run and configured exactly as Debian's."""

    program = (UPSTREAM_WIREGUARD_GO, "-f")


class Fzpoll(WireguardGo):
    """fzpoll run exactly as wireguard-go is (``fzpoll -f IFNAME``, configured with ``wg``)."""

    program = (sys.executable, "-m", "fzpoll", "-f", "--log-level", "debug")


def wireguard_go_peer(ns_b: Namespace, pair: VethPair, key_a: str, port_a: int = 51820,
                      port_b: int = 51821) -> tuple[WireguardGo, str]:
    """Debian's wireguard-go in ns_b as 100.64.0.2, the peer of ``key_a`` (100.64.0.1 at
    ``pair.ip_a:port_a``), for a daemon the test starts itself in ns_a (``fzpoll up``).
    Returns it and its private key."""
    b = WireguardGo(ns_b).start()
    key_b = genkey()
    b.configure(key_b, port_b)
    b.add_peer(pubkey(key_a), ["100.64.0.1/32"], f"{pair.ip_a}:{port_a}")
    b.address("100.64.0.2/32")
    b.up()
    b.route("100.64.0.1/32")
    return b, key_b


class FzpollNoOffload(Fzpoll):
    """fzpoll with its TUN offloads switched off (the path of kernels without them)."""

    extra_env = {"FZPOLL_DISABLE_OFFLOAD": "tun"}


class FzpollSodiumSystem(Fzpoll):
    """fzpoll sealing with the shared system libsodium (fzpoll/wireguard/sodium.py)."""

    extra_env = {"FZPOLL_SODIUM": "system"}


class FzpollSodiumBundled(Fzpoll):
    """fzpoll sealing with PyNaCl's own libsodium, whatever it links."""

    extra_env = {"FZPOLL_SODIUM": "bundled"}


class FzpollTso(Fzpoll):
    """fzpoll reading TSO/USO super-packets from TUN (split in Python), not only coalescing."""

    extra_env = {"FZPOLL_ENABLE_OFFLOAD": "tso"}


def wg_pair(ns_a: Namespace, ns_b: Namespace, pair: VethPair, port_a: int = 51820,
            port_b: int = 51821, kind_a: type = WireguardGo,
            kind_b: type = WireguardGo) -> tuple[WireguardGo, WireguardGo]:
    """Two configured peers over ``pair``: 100.64.0.1 / fd00:64::1 in ns_a and
    100.64.0.2 / fd00:64::2 in ns_b, each routing the other's /32 and /128.
    ``kind_a``/``kind_b`` pick the implementation (wireguard-go or fzpoll)."""
    a, b = kind_a(ns_a).start(), kind_b(ns_b).start()
    key_a, key_b = genkey(), genkey()
    a.configure(key_a, port_a)
    b.configure(key_b, port_b)
    a.add_peer(pubkey(key_b), ["100.64.0.2/32", "fd00:64::2/128"], f"{pair.ip_b}:{port_b}")
    b.add_peer(pubkey(key_a), ["100.64.0.1/32", "fd00:64::1/128"], f"{pair.ip_a}:{port_a}")
    for wg, mine, theirs in ((a, "1", "2"), (b, "2", "1")):
        wg.address(f"100.64.0.{mine}/32", f"fd00:64::{mine}/128")
        wg.up()
        wg.route(f"100.64.0.{theirs}/32", f"fd00:64::{theirs}/128")
    return a, b


_RECEIVE = """
import hashlib, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7001)); s.listen(1); print("ready", flush=True)
s.settimeout(40); c, _ = s.accept(); c.settimeout(40); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

_SEND = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[2]))
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.create_connection((sys.argv[1], 7001), timeout=40); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def transfer(src: Namespace, dst: Namespace, address: str, size: int, timeout: float = 45) -> float:
    """Send ``size`` random bytes over TCP from ``src`` to ``address`` in ``dst``; asserts both
    ends' length and sha256 match. Returns the seconds it took."""
    receiver = dst.popen([sys.executable, "-c", _RECEIVE, address], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
    start = time.monotonic()
    sent = src.run([sys.executable, "-c", _SEND, address, str(size)], timeout=timeout).stdout.split()
    received, _ = receiver.communicate(timeout=timeout)
    assert received.split() == sent, "the transfer arrived incomplete or corrupted"
    return time.monotonic() - start
