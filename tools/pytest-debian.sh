#!/usr/bin/env bash
# Runs the test suite as an embedded Debian 12 user has it: Debian's /usr/bin/python3 with only
# apt's packages (python3-nacl, python3-pyroute2, python3-dnslib, python3-pytest,
# python3-hypothesis; bash tools/install-deps.sh --debian installs them) and fzpoll from this tree.
#   bash tools/pytest-debian.sh [pytest arguments]
# apt's dist-packages go first on PYTHONPATH and pytest loads no plugin it finds by itself, so a
# pip-installed package in /usr/local cannot stand in for apt's; the versions used are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:/usr/lib/python3/dist-packages"
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
/usr/bin/python3 tools/deps-versions.py --from /usr/lib/python3/dist-packages \
    || { echo "bash tools/install-deps.sh --debian installs them" >&2; exit 1; }
# wg-quick runs `fzpoll` from PATH: make it this tree under Debian's python3, as /usr/bin/fzpoll of
# the .deb would be, not whatever pip or pyenv put on PATH.
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
printf '#!/bin/sh\nexec /usr/bin/python3 -m fzpoll "$@"\n' > "$bin/fzpoll"
chmod 0755 "$bin/fzpoll"
export PATH="$bin:$PATH"
/usr/bin/python3 -m pytest -p _hypothesis_pytestplugin -p no:cacheprovider "$@"
