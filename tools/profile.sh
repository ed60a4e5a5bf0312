#!/bin/sh
# Profile a running fzpoll daemon with py-spy (pip install py-spy; the "dev" extra has it).
#
#   tools/profile.sh record TARGET [SECONDS] [OUT.svg]   flame graph of SECONDS (default 30) of CPU
#                                  (OUT.json: speedscope format; OUT.txt: raw collapsed stacks)
#   tools/profile.sh top TARGET                          live top-like view of the hottest functions
#   tools/profile.sh dump TARGET                         every thread's stack now (a stuck daemon)
#
# TARGET is a PID, or an interface name (wg0): the pid of the process serving
# /var/run/wireguard/wg0.sock, taken from the socket's peer credentials (SO_PEERCRED).
#
# py-spy reads the target's memory with ptrace/process_vm_readv: run as root (or with
# CAP_SYS_PTRACE). In a container, start it with --cap-add SYS_PTRACE; where the target cannot be
# paused (ptrace stopped by a seccomp profile or a sandbox), add --nonblocking: samples are then
# taken without stopping the daemon, cheaper but a stack may be torn now and then.
# Extra py-spy options go in PYSPY_OPTS, e.g. PYSPY_OPTS="--nonblocking --idle --rate 250".
# An idle daemon sleeps in epoll_wait, which py-spy leaves out unless --idle is given.
set -eu

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "profile.sh: $*" >&2
    exit 1
}

resolve_pid() {
    case $1 in
        '' ) usage ;;
        *[!0-9]*)
            sock="${WG_SOCKET_DIR:-/var/run/wireguard}/$1.sock"
            [ -S "$sock" ] || die "no daemon for interface $1 (no socket $sock)"
            python3 - "$sock" <<'EOF' || die "cannot find the pid serving $sock"
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(2)
s.connect(sys.argv[1])
pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
s.close()
if pid <= 0:
    sys.exit(1)
print(pid)
EOF
            ;;
        *) echo "$1" ;;
    esac
}

[ $# -ge 2 ] || usage
command -v py-spy >/dev/null 2>&1 || die "py-spy not found (pip install py-spy)"
action=$1
pid=$(resolve_pid "$2")
kill -0 "$pid" 2>/dev/null || die "no process $pid (or not allowed to signal it: run as root)"
[ "$(id -u)" -eq 0 ] || echo "profile.sh: not root: py-spy will likely fail to attach (ptrace)" >&2
# shellcheck disable=SC2086  # PYSPY_OPTS is a list of options
case $action in
    record)
        seconds=${3:-30}
        out=${4:-fzpoll-$pid-$(date +%Y%m%d-%H%M%S).svg}
        case $seconds in ''|*[!0-9]*) die "SECONDS must be a whole number, not '$seconds'" ;; esac
        case $out in
            *.json) format=speedscope ;;  # https://www.speedscope.app
            *.txt) format=raw ;;          # collapsed stacks, for flamegraph.pl or grep
            *) format=flamegraph ;;       # an interactive SVG
        esac
        py-spy record --pid "$pid" --duration "$seconds" --format "$format" -o "$out" ${PYSPY_OPTS:-}
        echo "profile.sh: $format written to $out" >&2
        ;;
    top)
        exec py-spy top --pid "$pid" ${PYSPY_OPTS:-}
        ;;
    dump)
        exec py-spy dump --pid "$pid" ${PYSPY_OPTS:-}
        ;;
    *)
        usage
        ;;
esac
