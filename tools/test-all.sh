#!/usr/bin/env bash
# Installs everything and runs every check, as CI does (.ci/run calls this; root, no stdin). The whole
# suite runs twice, once per dependency set fzpoll supports (netns tests included when running as
# root; they skip with a printed reason otherwise), then the Debian package is built, checked by
# lintian, installed on a clean Debian 12 root and used for a tunnel. Every step runs; the exit code
# is non-zero if any failed.
#   1. PyPI set: the newest releases, pip-installed for `python3` (or .venv, see install-deps.sh)
#   2. Debian 12 set: /usr/bin/python3 with apt's packages only, fzpoll from this tree
#   3. tools/build-deb.sh (tests skipped: 1 and 2 ran them) and tools/deb-chroot-test.sh
#      (exit 77 = skipped, reason printed: no debootstrap, no mirror, no root)
set -uo pipefail
cd "$(dirname "$0")/.."
failed=""
step() { local name=$1; shift; echo "=== $name"; "$@" || failed="$failed $name"; }

step install-pypi bash tools/install-deps.sh
# On Debian's own python3 the PyPI set is in .venv (install-deps.sh): activate it for this run.
[ -x .venv/bin/python3 ] && export PATH="$PWD/.venv/bin:$PATH"
python3 tools/deps-versions.py
step pytest-pypi python3 -m pytest -q

step install-debian bash tools/install-deps.sh --debian
step pytest-debian bash tools/pytest-debian.sh -q

step build-deb env DEB_BUILD_OPTIONS=nocheck bash tools/build-deb.sh
chroot_test() { bash tools/deb-chroot-test.sh; local rc=$?; [ "$rc" = 0 ] || [ "$rc" = 77 ]; }
step deb-chroot chroot_test

if [ -n "$failed" ]; then echo "=== FAILED:$failed"; exit 1; fi
echo "=== all steps passed"
