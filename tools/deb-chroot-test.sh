#!/usr/bin/env bash
# Installs the .deb on a clean Debian 12 root, as an embedded user would (apt only, no pip, no
# compiler), and brings a tunnel up with it (`fzpoll demo`: two namespaces, two daemons, ping and
# TCP through the tunnel).
#   bash tools/deb-chroot-test.sh [dist/fzpoll_VERSION_all.deb]
# The root is made by debootstrap (minbase) from the Debian mirror this machine's apt uses; the
# downloaded base system and the root debootstrap made from it are cached in /var/cache/fzpoll-ci
# (refreshed after 30 days), so a run costs an extraction, an `apt-get update` and the install.
# Everything runs in a private mount namespace (proc, sysfs, /dev, a tmpfs /run), so nothing stays
# mounted, and the root is deleted.
# Exits 77 with "SKIP: reason" without root, /dev/net/tun, debootstrap or a reachable mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
skip() { echo "SKIP: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, network namespaces)"
[ -c /dev/net/tun ] || skip "no /dev/net/tun"
deb=${1:-$(ls -t dist/fzpoll_*_all.deb 2>/dev/null | head -1)}
[ -n "$deb" ] && [ -f "$deb" ] || { echo "no .deb: run tools/build-deb.sh first" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 \
        || skip "debootstrap is not installed and apt cannot install it"
fi
# The bookworm main archive of this machine's apt sources (no other network is used).
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Identifier: Packages' \
         | awk '$2 == "bookworm" && $3 == "main" { print $1; exit }')
[ -n "$mirror" ] || skip "apt has no Debian bookworm main source (run apt-get update)"
why=$(python3 - "$mirror" 2>&1 <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1].rstrip("/") + "/dists/bookworm/InRelease", timeout=10).read(1)
except OSError as exc:
    sys.exit(str(exc))
PY
) || skip "the mirror $mirror is not reachable ($why)"
cache=/var/cache/fzpoll-ci
tarball="$cache/debootstrap-bookworm-minbase-$(dpkg --print-architecture).tgz"
mkdir -p "$cache"
start=$SECONDS
if [ -z "$(find "$tarball" -mtime -30 2>/dev/null)" ]; then
    work=$(mktemp -d /var/tmp/fzpoll-debootstrap.XXXXXX)
    debootstrap --variant=minbase --make-tarball="$tarball.tmp" bookworm "$work/root" "$mirror" \
        > "$work/log" 2>&1 || { tail -20 "$work/log" >&2; rm -rf "$work"; skip "debootstrap could not download from $mirror"; }
    mv "$tarball.tmp" "$tarball"
    rm -rf "$work"
    echo "downloaded the base system into $tarball in $((SECONDS - start)) s"
fi
root=$(mktemp -d /var/tmp/fzpoll-chroot.XXXXXX)
chmod 0755 "$root"  # it is /: apt's _apt user and the daemons must be able to traverse it
[ -n "${FZPOLL_KEEP_ROOT:-}" ] || trap 'rm -rf --one-file-system "$root"' EXIT
t0=$SECONDS
# debootstrap's second stage (dpkg unpacking and configuring ~90 packages) costs 30-100 s here;
# the pristine result is kept as a tarball next to the download, so later runs only extract it.
rootcache="$cache/root-bookworm-minbase-$(dpkg --print-architecture).tar.gz"
if [ "$rootcache" -nt "$tarball" ]; then
    tar -xzpf "$rootcache" --numeric-owner -C "$root"
    echo "clean Debian 12 root extracted from $rootcache (made by debootstrap): $((SECONDS - t0)) s"
else
    debootstrap --variant=minbase --unpack-tarball="$tarball" bookworm "$root" "$mirror" > "$root.log" 2>&1 \
        || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    echo "debootstrap (minbase, cached download): $((SECONDS - t0)) s"
    tar -czf "$rootcache.tmp" --numeric-owner -C "$root" . && mv "$rootcache.tmp" "$rootcache"
fi
cp "$deb" "$root/tmp/"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
debname=$(basename "$deb")
cat > "$root/tmp/check.sh" <<CHECK
set -eu
export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin
footprint() { du -sxk --exclude=/var/lib/apt/lists --exclude=/var/cache/apt --exclude=/tmp / | cut -f1; }
t=\$(date +%s)
apt-get update -qq
base=\$(footprint)
# python3 first, alone, so the footprint splits into the interpreter and what fzpoll adds to it.
apt-get install -y -qq --no-install-recommends python3 >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
python=\$(footprint)
apt-get install -y -qq --no-install-recommends ./tmp/$debname >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
echo "apt-get update + install python3 ./$debname: \$((\$(date +%s) - t)) s"
grep -o '^Setting up [^ ]*' /tmp/apt.log | cut -d' ' -f3 | tr '\n' ' ' | sed 's/^/installed with it: /'; echo
echo "on disk (du): python3 \$(( (python - base) / 1024 )) MiB, then fzpoll and its dependencies \$(( (\$(footprint) - python) / 1024 )) MiB; fzpoll alone \$(dpkg-query -W -f '\${Installed-Size}' fzpoll) KiB"
# The demo also needs ip and ping (Suggests of the package, not dependencies of the daemon).
apt-get install -y -qq --no-install-recommends iproute2 iputils-ping >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
dpkg-query -W -f '\${Package} \${Version}\n' fzpoll python3 python3-nacl python3-pyroute2 python3-dnslib
if python3 -m pip --version >/dev/null 2>&1; then echo "pip is installed: not an apt-only root"; exit 1; fi
if command -v gcc >/dev/null; then echo "a compiler is installed: not a minimal root"; exit 1; fi
python3 -c 'import nacl, pyroute2, dnslib, fzpoll, sys; [print(m.__name__, m.__file__) for m in (fzpoll, nacl, pyroute2, dnslib)]; sys.exit(any(not m.__file__.startswith("/usr/lib/python3/dist-packages/") for m in (fzpoll, nacl, pyroute2, dnslib)))'
test "\$(command -v fzpoll)" = /usr/bin/fzpoll
fzpoll --version
test -f /lib/systemd/system/fzpoll@.service
grep -q '^ExecStart=/usr/bin/fzpoll up /etc/fzpoll/%i.conf' /lib/systemd/system/fzpoll@.service
if ls /etc/systemd/system/*.wants/fzpoll@* >/dev/null 2>&1; then echo "fzpoll@ was enabled by the install"; exit 1; fi
test -f /usr/share/doc/fzpoll/README.md.gz && test -f /usr/share/man/man8/fzpoll.8.gz
fzpoll demo
CHECK
# / of the chroot must be a mount point: `ip -n NS` makes / a slave mount (EINVAL otherwise).
unshare --mount --propagation private bash -euc '
    root=$1
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$root/run"
    chroot "$root" env -i TERM=dumb /bin/sh /tmp/check.sh
' _ "$root"
echo "clean Debian 12 root: install and tunnel ok, $((SECONDS - start)) s in all"
