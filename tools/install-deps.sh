#!/usr/bin/env bash
# Installs what fzpoll's tests and demo need on a Debian machine: the real WireGuard peers
# (wireguard-go, wg), iproute2 for namespaces, ping (v4 and v6), util-linux's setpriv (drops
# CAP_NET_ADMIN in a test), systemd-analyze (the unit is verified), jq (the log recipes),
# systemd-nspawn and Debian's python3 with fzpoll's runtime dependencies (tests/test_systemd_nspawn.py
# runs the unit under a real systemd in a container that shares the host's /usr), and the
# Python dependencies, from one of two sets:
#   bash tools/install-deps.sh            # PyPI: pip install -e '.[test,dev]' for `python3`
#   bash tools/install-deps.sh --debian   # Debian: /usr/bin/python3 and apt's python3-nacl,
#                                         # python3-pyroute2, python3-dnslib, python3-pytest,
#                                         # python3-hypothesis; no pip (tools/pytest-debian.sh)
# CI runs the suite on both (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-pypi}
case "$mode" in pypi|--pypi) mode=pypi ;; --debian) mode=debian ;;
    *) echo "usage: $0 [--debian]" >&2; exit 2 ;; esac
DEBS="wireguard-go wireguard-tools iproute2 iputils-ping iperf3 socat nftables dnsmasq-base dnsutils curl procps util-linux systemd jq systemd-container python3 python3-nacl python3-pyroute2 python3-dnslib"
# Debian's own python3 is "externally managed" (PEP 668): pip must not write into it, or its
# packages would shadow apt's and the Debian set would no longer be what apt installed.
externally_managed() {
    python3 -c 'import sys, sysconfig, os; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'
}
if [ "$mode" = debian ]; then
    DEBS="$DEBS python3 python3-nacl python3-pyroute2 python3-dnslib python3-pytest python3-hypothesis"
elif externally_managed; then
    DEBS="$DEBS python3-venv"
else
    python3 -m pip --version >/dev/null 2>&1 || DEBS="$DEBS python3-pip"
fi
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
[ "$mode" = debian ] && exit 0
PY=python3
if externally_managed; then
    # So the PyPI set goes into a virtual environment in the clone (.ci/run and the README use it).
    [ -x .venv/bin/python3 ] || python3 -m venv .venv
    PY=.venv/bin/python3
    echo "Debian's python3 is externally managed: the PyPI set is in .venv (. .venv/bin/activate)"
fi
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,dev]'
