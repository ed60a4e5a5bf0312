#!/usr/bin/env bash
# Builds the Debian package of fzpoll with Debian's own tooling (dpkg-buildpackage, debhelper,
# dh-python/pybuild), installing the build dependencies from apt, then runs lintian on it.
# Output: dist/fzpoll_VERSION_all.deb (and its .changes/.buildinfo); prints lintian's tags.
#   bash tools/build-deb.sh            # runs the non-namespace tests during the build
#   DEB_BUILD_OPTIONS=nocheck bash tools/build-deb.sh   # CI: the suite ran already
# The build happens in a scratch copy of the tree (dpkg-buildpackage writes into the parent
# directory and leaves .pybuild/ and debian/fzpoll/ behind).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
need="dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel lintian"
case " ${DEB_BUILD_OPTIONS:-} " in
    *" nocheck "*) ;;
    *) need="$need python3-dnslib python3-hypothesis python3-nacl python3-pyroute2 python3-pytest" ;;
esac
missing=""
for p in $need; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
version=$(dpkg-parsechangelog -S Version)
upstream=$(python3 -c 'import re; print(re.search(r"__version__ = \"(.*)\"", open("fzpoll/__init__.py").read())[1])')
if [ "$version" != "$upstream" ]; then
    echo "debian/changelog says $version but fzpoll/__init__.py says $upstream: add a changelog entry" >&2
    exit 1
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
src="$scratch/fzpoll-$version"
mkdir "$src"
# Tracked and new (not ignored) files: what a clean clone with your changes would hold.
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null \
    || { echo "cannot copy the tree (deleted files not yet committed?)" >&2; exit 1; }
# Debian's own interpreters only (pybuild runs `python3.11` from PATH: not a pyenv or venv one).
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b 2>&1) > "$scratch/build.log" \
    || { tail -40 "$scratch/build.log" >&2; echo "dpkg-buildpackage failed" >&2; exit 1; }
grep -E "passed|failed|dpkg-deb: building" "$scratch/build.log" || true
mkdir -p dist
changes=$(cd "$scratch" && ls fzpoll_"$version"_*.changes)
(cd "$scratch" && cp fzpoll_"$version"_all.deb fzpoll_"$version"_*.buildinfo "$changes" "$OLDPWD/dist/")
echo "built dist/fzpoll_${version}_all.deb"
# Errors fail the build; warnings, info and pedantic tags are printed, to be fixed or explained.
set +e
tags=$(lintian --display-info --pedantic --fail-on error "dist/$changes" 2>&1)
rc=$?
set -e
tags=$(printf '%s\n' "$tags" | grep -v 'running with root privileges is not recommended' || true)
printf 'lintian --pedantic --display-info: %s\n' "${tags:-no tags}"
exit $rc
