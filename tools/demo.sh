#!/usr/bin/env bash
# Sets up and runs fzpoll's main job on a Debian machine, as root: installs what the demo needs
# from apt only (iproute2, ping, Debian's python3 with python3-nacl, python3-pyroute2,
# python3-dnslib), then `fzpoll demo` from this tree: two network namespaces, two daemons, ping and
# TCP through the tunnel, everything removed afterwards. Extra arguments go to `fzpoll demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh --debian
exec env PYTHONPATH="$PWD" /usr/bin/python3 -m fzpoll demo "$@"
