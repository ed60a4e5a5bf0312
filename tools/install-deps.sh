#!/usr/bin/env bash
# Installs what fzpoll's tests and demo need on a Debian machine: the real WireGuard peers
# (wireguard-go, wg), iproute2 for namespaces, ping (v4 and v6), util-linux's setpriv (drops
# CAP_NET_ADMIN in a test), systemd-analyze (the unit is verified), jq (the log recipes), and the
# Python package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
DEBS="wireguard-go wireguard-tools iproute2 iputils-ping iperf3 socat nftables dnsmasq-base dnsutils procps util-linux systemd jq"
python3 -m pip --version >/dev/null 2>&1 || DEBS="$DEBS python3-pip"
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing
fi
# Debian's own python3 refuses pip installs (PEP 668) outside a venv; a CI machine is disposable,
# so allow it there. pyenv/venv interpreters are not marked and need nothing.
PIP_EXTRA=""
if python3 -c 'import sys, sysconfig, os; sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
    PIP_EXTRA="--break-system-packages"
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore $PIP_EXTRA -e '.[test,dev]'
