"""systemd/fzpoll@.service under a real systemd: PID 1 of a container (systemd-nspawn), driven
with systemctl (issue 17).

The container boots the host's /usr on a volatile (tmpfs) root, in a network namespace of ours
joined by a veth pair to another namespace where wireguard-go is the peer (see /work/shared
NOTES "A real systemd for tests"). fzpoll is installed where the unit's ExecStart expects it, in
a scratch tree bound over /usr/local: /usr/local/bin/fzpoll (a console script for Debian's
/usr/bin/python3, which has python3-nacl, python3-pyroute2 and python3-dnslib from apt) and the
package in /usr/local/lib/python3.X/dist-packages. The unit as shipped is bound read-only to
/etc/systemd/system/fzpoll@.service, the configuration to /etc/fzpoll. Nothing is installed on
the host.

One drop-in shortens what would make CI wait: WatchdogSec=3 (the unit says 30) and
TimeoutAbortSec=3 (how long a watchdog-aborted process may take to die before SIGKILL).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import netns

pytestmark = [pytest.mark.netns, pytest.mark.needs("wireguard-go", "systemd-nspawn", "nsenter", "jq", "setpriv")]

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "fzpoll@.service"
PYTHON = "/usr/bin/python3"
IFNAME = "wgsd0"
SERVICE = f"fzpoll@{IFNAME}.service"
DROP_IN = """[Service]
WatchdogSec=3
TimeoutAbortSec=3
"""
PRE_UP_SECONDS = 2  # the daemon is not ready before its PreUp hook is done: systemd must wait
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12


def _why_not() -> str | None:
    if not os.path.exists(PYTHON) or subprocess.run(
            [PYTHON, "-c", "import nacl, pyroute2, dnslib"], capture_output=True).returncode != 0:
        return f"the systemd test needs {PYTHON} with python3-nacl, python3-pyroute2, python3-dnslib"
    return None


def _wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Container:
    """A booted systemd in network namespace ``ns``; commands run in it with nsenter."""

    def __init__(self, ns: netns.Namespace, scratch: Path) -> None:
        self.ns = ns
        self.scratch = scratch
        self.log_path = scratch / "nspawn.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 60.0) -> "Container":
        argv = [
            "systemd-nspawn", "--register=no", "--keep-unit", "--volatile=yes", "-D", "/",
            "-M", f"fzsd{os.getpid() % 100000}", f"--network-namespace-path=/run/netns/{self.ns.name}",
            "--capability=CAP_NET_ADMIN", "--bind=/dev/net/tun",
            f"--bind-ro={self.scratch / 'etc-fzpoll'}:/etc/fzpoll",
            f"--bind-ro={self.scratch / 'unit'}:/etc/systemd/system/fzpoll@.service",
            f"--bind-ro={self.scratch / 'drop-in'}:/etc/systemd/system/fzpoll@.service.d",
            f"--bind={self.scratch / 'usr-local'}:/usr/local",
            "--boot", "--", "systemd.firstboot=off", "systemd.mask=systemd-networkd-wait-online.service",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid1 = _wait_until(self._find_pid1, timeout, "the container's PID 1")
        state = _wait_until(self._booted, timeout, "the container to finish booting")
        print(f"container booted: {state}")
        return self

    def _booted(self) -> str | None:
        """'running', or 'degraded' (units of the host's presets that fail on an empty /etc)."""
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state if state in ("running", "degraded") else None

    def _find_pid1(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited: {self.log()}")
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def show(self, *properties: str) -> dict[str, str]:
        out = self.run("systemctl", "show", SERVICE, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid1:
            self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _install(scratch: Path) -> None:
    """fzpoll in a scratch /usr/local (console script + package), unit, drop-in, config dir."""
    version = subprocess.run([PYTHON, "-c", "import sys; print(f'python3.{sys.version_info[1]}')"],
                             capture_output=True, text=True, check=True).stdout.strip()
    site = scratch / "usr-local" / "lib" / version / "dist-packages"
    shutil.copytree(REPO / "fzpoll", site / "fzpoll", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(site / "fzpoll")], check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    script = scratch / "usr-local" / "bin" / "fzpoll"
    script.parent.mkdir(parents=True)
    script.write_text(f"#!{PYTHON}\nimport sys\nfrom fzpoll.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    shutil.copy(UNIT, scratch / "unit")
    (scratch / "drop-in").mkdir()
    (scratch / "drop-in" / "ci.conf").write_text(DROP_IN)
    (scratch / "etc-fzpoll").mkdir(mode=0o700)


def _write_config(scratch: Path, key: str, peer_key: str, endpoint: str, allowed: str) -> None:
    path = scratch / "etc-fzpoll" / f"{IFNAME}.conf"
    path.touch(mode=0o600)
    path.write_text(f"[Interface]\nPrivateKey = {key}\nListenPort = 51820\nAddress = 100.64.0.1/32\n"
                    f"PreUp = sleep {PRE_UP_SECONDS}\n\n"
                    f"[Peer]\nPublicKey = {peer_key}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n")


def _ping(ns: netns.Namespace, address: str) -> None:
    result = ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "3", address], check=False, timeout=15)
    assert result.returncode == 0, result.stdout + result.stderr


def _cap_eff(container: Container, pid: int) -> int:
    status = container.run("cat", f"/proc/{pid}/status").stdout
    return int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]


# Paths the daemon must not be able to write (a new file in each), and the one it must.
_WRITE_PROBE = r"""
import os, sys
for d in sys.argv[1:]:
    try:
        fd = os.open(os.path.join(d, ".fzpoll-probe"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        print(d, "denied", exc.strerror)
    else:
        os.close(fd)
        os.unlink(os.path.join(d, ".fzpoll-probe"))
        print(d, "WRITABLE")
"""
_FORBIDDEN = ["/", "/etc", "/etc/fzpoll", "/usr", "/usr/local/bin", "/var", "/var/lib", "/root", "/home",
              "/run", "/run/systemd", "/run/lock", "/srv", "/opt", "/boot", "/dev/shm"]


def _writable_from_the_sandbox(container: Container, pid: int, paths: list[str]) -> dict[str, bool]:
    """Each path: can a process with the daemon's mount namespace (its read-only view of the
    system) and its capabilities create a file there?"""
    caps = "-all,+net_admin,+net_bind_service"
    out = container.run("nsenter", "-t", str(pid), "-m", "--", "setpriv", f"--inh-caps={caps}",
                        f"--bounding-set={caps}", "--no-new-privs", "--", PYTHON, "-c", _WRITE_PROBE,
                        *paths).stdout
    return {line.split()[0]: line.split()[1] == "WRITABLE" for line in out.splitlines()}


def test_the_unit_under_a_real_systemd() -> None:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory(prefix="fzsd-") as tmp, netns.Namespace("sd") as ns_sd, \
            netns.Namespace("peer") as ns_peer:
        scratch = Path(tmp)
        _install(scratch)
        pair = netns.veth_pair(ns_sd, ns_peer)
        key, peer_key = netns.genkey(), netns.genkey()
        peer = netns.WireguardGo(ns_peer).start()
        peer.configure(peer_key, 51821)
        peer.add_peer(netns.pubkey(key), ["100.64.0.1/32"], f"{pair.ip_a}:51820")
        peer.address("100.64.0.2/32")
        peer.up()
        peer.route("100.64.0.0/24")
        _write_config(scratch, key, netns.pubkey(peer_key), f"{pair.ip_b}:51821", "100.64.0.2/32")
        container = Container(ns_sd, scratch)
        try:
            container.boot()
            _exercise(container, scratch, ns_sd, ns_peer, peer, key, peer_key, pair)
        except AssertionError:
            print("--- journal ---\n" + container.run("journalctl", "-b", "--no-pager", "-n", "80",
                                                     check=False).stdout if container.pid1 else "")
            print("--- nspawn ---\n" + container.log())
            raise
        finally:
            container.close()


def _exercise(c: Container, scratch: Path, ns_sd: netns.Namespace, ns_peer: netns.Namespace,
              peer: netns.WireguardGo, key: str, peer_key: str, pair: netns.VethPair) -> None:
    # start: a Type=notify unit is active only after READY=1, which the daemon sends after its
    # PreUp hook (sleep 2), the interface and the UAPI socket: "activating" until then, and once
    # active the interface exists and the UAPI answers, with no retry
    started = time.monotonic()
    c.run("systemctl", "start", "--no-block", SERVICE)
    state = _wait_until(lambda: (c.show("ActiveState")["ActiveState"] != "inactive"
                                 and c.show("ActiveState")["ActiveState"]), 10, "the start job to run")
    assert state == "activating"
    _wait_until(lambda: c.show("ActiveState")["ActiveState"] != "activating", 60, "the unit to start")
    assert time.monotonic() - started >= PRE_UP_SECONDS
    props = c.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "MemoryMax")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert "1 peers" in props["StatusText"], props  # STATUS= is sent with READY=1
    dump = c.run("wg", "show", IFNAME, "dump").stdout.splitlines()
    assert dump[0].split("\t")[2] == "51820" and dump[1].split("\t")[0] == netns.pubkey(peer_key)
    assert ns_sd.ip_json("link", "show", IFNAME)[0]["mtu"] == 1420

    # traffic to the peer in the other namespace, both ways
    _ping(ns_peer, "100.64.0.1")
    _ping(ns_sd, "100.64.0.2")
    handshake = int(c.run("wg", "show", IFNAME, "latest-handshakes").stdout.split()[1])
    assert handshake > 0

    # reload: a changed AllowedIPs is applied, the session is kept (no new handshake)
    _write_config(scratch, key, netns.pubkey(peer_key), f"{pair.ip_b}:51821", "100.64.0.2/32, 10.77.0.0/24")
    c.run("systemctl", "reload", SERVICE, timeout=30)
    allowed = c.run("wg", "show", IFNAME, "allowed-ips").stdout.split()[1:]
    assert sorted(allowed) == ["10.77.0.0/24", "100.64.0.2/32"]
    assert "10.77.0.0/24 dev " + IFNAME in ns_sd.run(["ip", "route"]).stdout
    _ping(ns_sd, "100.64.0.2")
    assert int(c.run("wg", "show", IFNAME, "latest-handshakes").stdout.split()[1]) == handshake
    assert c.show("ActiveState")["ActiveState"] == "active"

    # the sandbox: only the two capabilities, no write outside /run/wireguard and /run/fzpoll
    # (its socket, its routing state) but its private /tmp
    pid = c.main_pid()
    assert _cap_eff(c, pid) == (1 << CAP_NET_ADMIN) | (1 << CAP_NET_BIND_SERVICE)
    writable = _writable_from_the_sandbox(c, pid, _FORBIDDEN + ["/run/wireguard", "/run/fzpoll"])
    assert writable.pop("/run/wireguard") is True and writable.pop("/run/fzpoll") is True
    mounts = c.run("nsenter", "-t", str(pid), "-m", "findmnt", "-R", "-o", "TARGET,FSTYPE,OPTIONS", "/run").stdout
    assert [p for p, w in writable.items() if w] == [], mounts
    rating = c.run("systemd-analyze", "security", "--no-pager", SERVICE).stdout
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", rating)
    assert exposure is not None, rating
    readme = (REPO / "README.md").read_text()
    claimed = re.search(r"`systemd-analyze security` on the running unit rates it \*\*(\d+\.\d+) (\w+)\*\*", readme)
    assert claimed is not None, "README must state the running unit's rating"
    assert exposure.groups() == claimed.groups(), (exposure.group(0), claimed.group(0))

    # memory: the lowered MemoryMax= holds what the daemon uses
    memory_max = int(c.show("MemoryMax")["MemoryMax"])
    assert memory_max == 64 << 20
    # Enforced only where systemd has a memory controller: not in this container on a host whose
    # cgroup v1 memory hierarchy is not delegated to it (MemoryCurrent is then "[not set]").
    print("memory accounting:", c.show("MemoryCurrent")["MemoryCurrent"])
    status = c.run("cat", f"/proc/{pid}/status").stdout
    rss = int(re.search(r"^VmRSS:\s*(\d+) kB$", status, re.M).group(1)) << 10  # type: ignore[union-attr]
    print(f"fzpoll up under systemd, idle after a reload: VmRSS {rss / 2**20:.1f} MiB")
    assert rss < memory_max / 2  # the footprint the MemoryMax= margin is built on

    # the watchdog: a stopped daemon sends no WATCHDOG=1; systemd kills it and starts it again
    c.run("kill", "-STOP", str(pid))  # the container's pid: signalled from inside it
    _wait_until(lambda: c.main_pid() not in (0, pid) and c.show("ActiveState")["ActiveState"] == "active",
                30, "the watchdog to restart the daemon")
    assert int(c.show("NRestarts")["NRestarts"]) == 1
    systemd_said = c.run("journalctl", "-u", SERVICE, "_PID=1", "-o", "cat", "--no-pager").stdout
    assert "Watchdog timeout" in systemd_said, systemd_said
    assert c.run("test", "-e", f"/proc/{pid}", check=False).returncode != 0  # the stopped one is gone
    _ping(ns_sd, "100.64.0.2")

    # stop: the interface and the socket are gone
    c.run("systemctl", "stop", SERVICE, timeout=30)
    assert c.show("ActiveState")["ActiveState"] == "inactive"
    assert ns_sd.ip("link", "show", IFNAME, check=False).returncode != 0
    assert c.run("test", "-e", f"/run/wireguard/{IFNAME}.sock", check=False).returncode != 0

    # every line the daemon logged is JSON (systemd's own lines about the unit are not ours)
    lines = c.run("journalctl", f"_SYSTEMD_UNIT={SERVICE}", "-o", "cat", "--no-pager").stdout.splitlines()
    assert len(lines) > 5
    parsed = c.run("sh", "-c", f"journalctl _SYSTEMD_UNIT={SERVICE} -o cat --no-pager | jq -c .").stdout.splitlines()
    assert len(parsed) == len(lines)
    # `-u` adds systemd's own plain-text lines about the unit: the README's `jq -R 'fromjson?'`
    # recipe skips exactly those
    everything = c.run("sh", "-c", f"journalctl -u {SERVICE} -o cat --no-pager | jq -R -c 'fromjson?'").stdout
    assert everything.splitlines() == parsed
    messages = [json.loads(line)["message"] for line in parsed]
    assert messages.count("interface ready") == 2 and "configuration reloaded" in messages
