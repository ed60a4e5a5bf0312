"""wg-quick's nftables rules for a full tunnel, made with the ``nft`` command.

With a /0 routed into the tunnel (see :mod:`fzpoll.up.routing`), wg-quick also adds, per
family, an nftables table of three chains:

- at prerouting, mangle priority: a UDP packet takes its connection's mark (``meta mark set ct
  mark``), and at postrouting a marked UDP packet (the tunnel's own) saves its mark into the
  connection (``ct mark set mark``). So the replies of the endpoint carry the fwmark too and,
  with ``src_valid_mark=1``, pass a strict reverse-path filter: without that, the reverse route
  of the endpoint is the tunnel and the kernel drops every handshake reply on the real interface;
- at prerouting, raw priority: a packet for one of the tunnel's addresses that arrives on another
  interface from a non-local source is dropped (nobody on the LAN may inject "tunnel" traffic).

fzpoll names its table ``fzpoll-IFACE`` (``wg-quick-IFACE`` for wg-quick) and replaces it as a
whole in one ``nft -f`` transaction, so a reload never leaves a half-updated table. No ``nft``,
or an nft that fails: a warning, and the tunnel runs without these rules (as it does on hosts
without strict reverse-path filtering).
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
from typing import Iterable

from fzpoll.errors import LocalError

log = logging.getLogger("fzpoll.firewall")

NFT_TIMEOUT = 10.0  # seconds; nft answers in milliseconds
PREROUTING_RAW = -300  # NF_IP_PRI_RAW
MANGLE = -150  # NF_IP_PRI_MANGLE
NFT_FAMILY = {socket.AF_INET: "ip", socket.AF_INET6: "ip6"}


def table_name(ifname: str) -> str:
    return f"fzpoll-{ifname}"


def _reset(ifname: str, family: int) -> list[str]:
    """Lines that remove the table whether or not it exists (``add`` of an existing one is a no-op)."""
    ref = f"{NFT_FAMILY[family]} {table_name(ifname)}"
    return [f"add table {ref}", f"delete table {ref}"]


def full_tunnel_script(ifname: str, family: int, mark: int, addresses: Iterable[str]) -> str:
    """The nft transaction that (re)creates the table of ``family`` (pure: text out)."""
    fam = NFT_FAMILY[family]
    ref = f"{fam} {table_name(ifname)}"
    lines = _reset(ifname, family) + [
        f"add table {ref}",
        f"add chain {ref} preraw {{ type filter hook prerouting priority {PREROUTING_RAW}; }}",
        f"add chain {ref} premangle {{ type filter hook prerouting priority {MANGLE}; }}",
        f"add chain {ref} postmangle {{ type filter hook postrouting priority {MANGLE}; }}",
    ]
    for address in addresses:
        lines.append(f'add rule {ref} preraw iifname != "{ifname}" {fam} daddr {address} '
                     "fib saddr type != local drop")
    lines.append(f"add rule {ref} postmangle meta l4proto udp mark {mark:#x} ct mark set mark")
    lines.append(f"add rule {ref} premangle meta l4proto udp meta mark set ct mark")
    return "\n".join(lines) + "\n"


def _nft(script: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise LocalError("nft not found (install nftables)")
    try:
        proc = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalError(f"nft failed: {exc}") from None
    if proc.returncode != 0:
        raise LocalError(f"nft failed ({proc.returncode}): {proc.stderr.strip()[:500]}")


def add_full_tunnel(ifname: str, family: int, mark: int, addresses: Iterable[str]) -> bool:
    """Create (or replace) the table; False, with a warning logged, if nft is missing or fails."""
    try:
        _nft(full_tunnel_script(ifname, family, mark, addresses))
    except LocalError as exc:
        log.warning(f"full tunnel without its nftables rules: {exc}; with strict reverse-path "
                    "filtering the endpoint's replies will be dropped",
                    extra={"fields": {"interface": ifname}})
        return False
    log.info("added nftables table", extra={"fields": {"table": f"{NFT_FAMILY[family]} {table_name(ifname)}"}})
    return True


def remove(ifname: str, families: Iterable[int] = (socket.AF_INET, socket.AF_INET6)) -> None:
    """Delete the tables of ``families`` if they exist; a failure is logged, not raised (a cleanup)."""
    lines = [line for family in families for line in _reset(ifname, family)]
    if not lines or shutil.which("nft") is None:
        return
    try:
        _nft("\n".join(lines) + "\n")
    except LocalError as exc:
        log.error(f"cannot remove the nftables table {table_name(ifname)}: {exc}")
