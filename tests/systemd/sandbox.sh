#!/bin/bash
# systemd-sandbox.sh -- boot a throwaway, REAL systemd (PID 1 of a private
# pid+mount+uts+cgroup namespace) for integration tests, drive it with
# systemctl, and tear it down.  Needs root, util-linux (unshare/nsenter) and
# the systemd package (tested with Debian 12's systemd 252).  No systemd on the
# host is needed (the host's PID 1 can be anything).
#
#   systemd-sandbox.sh boot    DIR          # boot; prints host PID of the sandboxed systemd
#   systemd-sandbox.sh ctl     DIR ARGS...  # systemctl ARGS... inside the sandbox
#   systemd-sandbox.sh run     DIR CMD...   # any command inside the sandbox namespaces
#   systemd-sandbox.sh install DIR FILE...  # copy unit files in + daemon-reload
#   systemd-sandbox.sh down    DIR          # orderly shutdown (falls back to SIGKILL)
#
# handoff's copy of the recipe in ../shared/reference/systemd-sandbox.sh (the tests
# must not depend on anything outside the repository), used by tests/systemd/conftest.py.
# Changes: the `demo` command is left out (tests/systemd/test_systemd.py is the demo).
# The safety rules are unchanged; keep them so:
#   - SYSTEMD_UNIT_PATH hides /lib/systemd/system from the sandboxed systemd (its
#     systemd-tmpfiles-setup.service would EMPTY THE HOST'S /tmp);
#   - the network namespace is shared: services listen on loopback ports the test picks;
#   - services run as real root on the real filesystem: keep their files in temp dirs;
#   - a killed test run leaves the sandbox up: `kill -KILL $(cat DIR/pid)`, then
#     `systemd-sandbox.sh down DIR` removes the cgroup named in DIR/cgroup.
#
# DIR layout (host side; DIR must already be absolute or is made absolute):
#   DIR/units/        bind-mounted over /etc/systemd/system inside the sandbox:
#                     drop unit files here, then `ctl DIR daemon-reload`
#   DIR/stubs/        empty stand-ins for sysinit.target, basic.target, ... (see below)
#   DIR/console.log   systemd's own log: the sandbox's /dev/console is a pty whose
#                     output a small python3 pty proxy appends here
#   DIR/pid           host PID of the sandboxed systemd (PID 1 inside)
#   DIR/unshare.pid   host PID of the unshare(1) parent (proxy.pid: the pty proxy above it)
#   DIR/cgroup        host path of the delegated cgroup2 subtree
#
# Host state touched: one cgroup2 directory (removed by `down`); systemd's
# startup raises the host-global sysctls fs.file-max / net.unix.max_dgram_qlen
# (saved by the first sandbox to boot, restored by the last `down`, state in
# /tmp/.systemd-sandbox-sysctl).  The sandbox's /run, /etc/systemd/system,
# /sys/fs/cgroup, /dev/console and /var/log/journal are private overlays.
# The rest of the host filesystem is shared, and services run as real root on
# it -- which is why the unit search path is restricted (see inner()).
set -euo pipefail

SELF=$(readlink -f "$0")
SYSTEMD_BIN=${SYSTEMD_BIN:-/lib/systemd/systemd}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-30}
# any python3 >= 3.8 does for the pty proxy; prefer the system one (pyenv shims are slow)
PYTHON=${SANDBOX_PYTHON:-$(command -v /usr/bin/python3 || command -v python3)}
TARGET=sandbox.target
SYSCTLS="fs.file-max fs.nr_open net.unix.max_dgram_qlen"

# pty proxy: run argv[2:] on a new pty (controlling tty + stdio), append its output to argv[1]
export PTY_PROXY='
import os, pty, sys
log = open(sys.argv[1], "ab", buffering=0)
pid, master = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
while True:
    try:
        data = os.read(master, 65536)
    except OSError:          # EIO: every holder of the pty slave is gone
        break
    if not data:
        break
    log.write(data.replace(b"\r\n", b"\n"))
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
'

die() { echo "systemd-sandbox: $*" >&2; exit 1; }
unit_path() { echo "/etc/systemd/system:/run/systemd/system:$1/stubs"; }

# ---------------------------------------------------------------- inside ----
inner() {   # runs as PID 1 of the new namespaces, then execs systemd
    local d=$1
    mount --make-rprivate /
    # private /run: systemd's sockets (/run/systemd/private, notify, ...) go here
    mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
    # hide the host's enablement symlinks; tests install units in DIR/units
    mount --bind "$d/units" /etc/systemd/system
    # fresh cgroup2 mount: inside the cgroup namespace its root is our subtree,
    # so systemd runs in "unified" mode and only ever touches that subtree
    mount -t cgroup2 cgroup2 /sys/fs/cgroup
    # systemd takes the cgroup it starts in as its root; use a fresh child so
    # the unshare(1) parent (left in the namespace root) is outside that tree
    mkdir /sys/fs/cgroup/sandbox
    echo $$ > /sys/fs/cgroup/sandbox/cgroup.procs
    # systemd (PID 1 in a container) logs to /dev/console and insists that it
    # is a tty (open_terminal() -> isatty()); give it the pty that the proxy
    # allocated for us (its output is copied to DIR/console.log), never the
    # host's real console
    local tty; tty=$(tty) || { echo "inner: stdin is not a tty" >&2; exit 1; }
    mount --bind "$tty" /dev/console
    # nothing in the sandbox may read or write the host's kernel log
    mount --bind /dev/null /dev/kmsg
    # journald: volatile storage in the private /run, no kmsg, no wall
    mkdir -p /run/systemd/journald.conf.d
    printf '[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToWall=no\nForwardToKMsg=no\n' \
        > /run/systemd/journald.conf.d/sandbox.conf
    if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi   # belt and braces
    # SAFETY: SYSTEMD_UNIT_PATH (no trailing ":") *replaces* the unit search
    # path, so nothing from /lib/systemd/system is visible.  Without this, a
    # unit with default dependencies pulls in the distro's sysinit.target, whose
    # systemd-tmpfiles-setup.service runs `tmpfiles --create --remove --boot`
    # and EMPTIES THE HOST'S /tmp (happened in testing), writes /var/log/wtmp,
    # creates /dev/log, /dev/hugepages, ...  Empty generator dirs: no
    # fstab/getty/... generators run either.
    exec env -i container=systemd-sandbox PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        SYSTEMD_UNIT_PATH="$(unit_path "$d")" \
        SYSTEMD_GENERATOR_PATH="$d/empty" SYSTEMD_ENVIRONMENT_GENERATOR_PATH="$d/empty" \
        "$SYSTEMD_BIN" --system --unit="$TARGET" \
        --log-target=console --log-level="${SANDBOX_LOG_LEVEL:-info}"
}

# ---------------------------------------------------------------- helpers ---
sd_pid()  { cat "$1/pid" 2>/dev/null || die "$1/pid missing (not booted?)"; }
in_ns()   { local d=$1; shift
            SYSTEMD_UNIT_PATH="$(unit_path "$d")" nsenter -t "$(sd_pid "$d")" -m -p -u -C -- "$@"; }
ctl()     { local d=$1; shift; in_ns "$d" systemctl --no-pager "$@"; }

alive() {   # running and not a zombie (the host's PID 1 may reap orphans lazily)
    local st
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null || true)
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

find_unshare_and_pid1() {  # walk the descendants of $1; print "<unshare pid> <systemd pid>"
    local todo=$1 p c
    while [ -n "$todo" ]; do
        read -r p todo <<<"$todo"
        for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
            if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = unshare ] &&
               [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ]; then
                echo "$p $c"; return 0
            fi
            todo="$todo $c"
        done
    done
}

cgroup2_root() {  # where the host has cgroup2 mounted (hybrid: /sys/fs/cgroup/unified)
    findmnt -rn -t cgroup2 -o TARGET | head -n1
}

write_stubs() {  # empty stand-ins for the targets that default dependencies reference
    local s=$1 t
    for t in "$TARGET" sysinit.target basic.target sockets.target timers.target paths.target \
             slices.target local-fs.target local-fs-pre.target remote-fs.target swap.target \
             network.target network-pre.target network-online.target nss-lookup.target \
             time-sync.target multi-user.target default.target \
             shutdown.target umount.target final.target; do
        printf '[Unit]\nDescription=systemd-sandbox stub %s\nDefaultDependencies=no\n' "$t" > "$s/$t"
    done
    if [ "${SANDBOX_JOURNAL:-1}" = 1 ]; then
        # a private journald (its /run and /var/log/journal are tmpfs overlays),
        # so services log exactly like in production and `journalctl -u X` works.
        # No systemd-journald-dev-log.socket: it would symlink the HOST's /dev/log.
        printf 'Wants=systemd-journald.socket systemd-journald.service\n' >> "$s/$TARGET"
        cat > "$s/systemd-journald.socket" <<'EOF'
[Unit]
Description=Journal Socket (sandbox)
DefaultDependencies=no
IgnoreOnIsolate=yes
[Socket]
ListenDatagram=/run/systemd/journal/socket
ListenStream=/run/systemd/journal/stdout
PassCredentials=yes
PassSecurity=yes
ReceiveBuffer=8M
Service=systemd-journald.service
SocketMode=0666
Timestamping=us
EOF
        cat > "$s/systemd-journald.service" <<'EOF'
[Unit]
Description=Journal Service (sandbox)
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket
IgnoreOnIsolate=yes
[Service]
Type=notify
ExecStart=/lib/systemd/systemd-journald
Sockets=systemd-journald.socket
RuntimeDirectory=systemd/journal
RuntimeDirectoryPreserve=yes
# journald's own messages: to the sandbox console (default would be kmsg)
Environment=SYSTEMD_LOG_TARGET=console
StandardOutput=tty
FileDescriptorStoreMax=4224
Restart=always
RestartSec=0
EOF
    fi
    # `systemctl exit` -> exit.target -> systemd-exit.service -> PID 1 exits.
    # shutdown.target conflicts with every unit that has default dependencies,
    # so those get stopped in order first.
    cat > "$s/exit.target" <<'EOF'
[Unit]
Description=Exit the sandbox
DefaultDependencies=no
Requires=systemd-exit.service
After=systemd-exit.service
AllowIsolate=yes
EOF
    cat > "$s/systemd-exit.service" <<'EOF'
[Unit]
Description=Exit the sandbox
DefaultDependencies=no
Requires=shutdown.target umount.target final.target
After=shutdown.target umount.target final.target
SuccessAction=exit-force
EOF
}

# systemd's startup (PID 1, system mode) raises the host-global sysctls
# fs.file-max / fs.nr_open / net.unix.max_dgram_qlen (it never lowers them).
# The first sandbox to boot saves them, the last one to go down restores them.
SYSCTL_STATE=${SYSCTL_STATE:-/tmp/.systemd-sandbox-sysctl}
save_sysctls() {
    local d=$1 k
    mkdir -p "$SYSCTL_STATE/live"
    (
        flock 9
        if [ -z "$(ls -A "$SYSCTL_STATE/live")" ]; then
            for k in $SYSCTLS; do echo "$k=$(sysctl -n "$k")"; done > "$SYSCTL_STATE/saved"
        fi
        echo "$d" > "$SYSCTL_STATE/live/$(echo "$d" | md5sum | cut -c1-16)"
    ) 9>"$SYSCTL_STATE/lock"
}
restore_sysctls() {
    local d=$1 m
    [ -d "$SYSCTL_STATE/live" ] || return 0
    m="$SYSCTL_STATE/live/$(echo "$d" | md5sum | cut -c1-16)"
    [ -e "$m" ] || return 0
    (
        flock 9
        rm -f "$m"
        if [ -z "$(ls -A "$SYSCTL_STATE/live")" ] && [ -f "$SYSCTL_STATE/saved" ]; then
            sysctl -q -p "$SYSCTL_STATE/saved" >/dev/null 2>&1 || true
            rm -f "$SYSCTL_STATE/saved"
        fi
    ) 9>"$SYSCTL_STATE/lock"
}

boot() {
    local d=$1
    if [ -e "$d/pid" ] && kill -0 "$(cat "$d/pid")" 2>/dev/null; then die "already running in $d"; fi
    mkdir -p "$d/units" "$d/stubs" "$d/empty"
    : > "$d/console.log"
    write_stubs "$d/stubs"
    save_sysctls "$d"
    local cgr cg
    cgr=$(cgroup2_root); [ -n "$cgr" ] || die "no cgroup2 mount on the host"
    cg="$cgr/systemd-sandbox-$(basename "$d")-$$"
    mkdir "$cg"
    echo "$cg" > "$d/cgroup"
    local t0 t1
    t0=$(date +%s%N)
    # The child shell moves itself into the new cgroup, then execs a tiny pty
    # proxy (the sandbox's /dev/console, copied to DIR/console.log; script(1)
    # works too but lingers ~1.3 s after its child exits), which runs unshare,
    # which forks the future PID 1 (whose cgroup is the cgroup-namespace root).
    setsid bash -c 'echo $$ > "$1/cgroup.procs"; exec "$4" -c "$PTY_PROXY" "$3/console.log" \
        unshare --pid --fork --mount --uts --cgroup --mount-proc --propagation private \
        "$2" __inner "$3"' _ "$cg" "$SELF" "$d" "$PYTHON" </dev/null >/dev/null 2>&1 &
    local sp=$! up="" pid="" i pair
    echo "$sp" > "$d/proxy.pid"
    trap 'down "$d"' EXIT            # any failure below: tear down what we started
    for i in $(seq 1 $((BOOT_TIMEOUT * 100))); do   # proxy -> unshare -> systemd
        pair=$(find_unshare_and_pid1 "$sp")
        [ -n "$pair" ] && break
        alive "$sp" || die "sandbox exited early; see $d/console.log"
        sleep 0.01
    done
    [ -n "$pair" ] || die "could not find sandbox PID 1"
    read -r up pid <<<"$pair"
    echo "$up" > "$d/unshare.pid"
    echo "$pid" > "$d/pid"
    # move the helpers back out, so the delegated subtree holds only the sandbox
    echo "$sp" > "$cgr/cgroup.procs" 2>/dev/null || true
    echo "$up" > "$cgr/cgroup.procs" 2>/dev/null || true
    local st=""
    for i in $(seq 1 $((BOOT_TIMEOUT * 50))); do   # wait for private socket + finished boot
        if [ -S "/proc/$pid/root/run/systemd/private" ]; then
            st=$(in_ns "$d" systemctl is-system-running 2>/dev/null || true)
            case "$st" in running|degraded) break;; esac
        fi
        alive "$pid" || die "systemd died; see $d/console.log"
        sleep 0.02
    done
    t1=$(date +%s%N)
    case "$st" in running|degraded) ;; *) die "boot not finished after ${BOOT_TIMEOUT}s (state '$st'); see $d/console.log";; esac
    trap - EXIT
    echo "systemd-sandbox: booted, host pid $pid, state $st, $(( (t1 - t0) / 1000000 )) ms" >&2
    echo "$pid"
}

install_units() {
    local d=$1; shift
    cp -- "$@" "$d/units/"
    ctl "$d" daemon-reload
}

down() {
    local d=$1 pid up sp i pair
    pid=$(cat "$d/pid" 2>/dev/null || true)
    up=$(cat "$d/unshare.pid" 2>/dev/null || true)
    sp=$(cat "$d/proxy.pid" 2>/dev/null || true)
    if [ -z "$pid" ] && [ -n "$sp" ]; then       # boot failed half-way
        pair=$(find_unshare_and_pid1 "$sp"); [ -n "$pair" ] && read -r up pid <<<"$pair"
    fi
    if [ -n "$pid" ] && alive "$pid"; then
        # orderly: stops all units (default deps), then PID 1 exits
        if [ -e "$d/pid" ]; then ctl "$d" exit 0 >/dev/null 2>&1 || true; fi
        for i in $(seq 1 500); do alive "$pid" || break; sleep 0.02; done
        if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ]; then
            [ -e "$d/pid" ] && echo "systemd-sandbox: orderly exit timed out, SIGKILL pid $pid" >&2
            kill -KILL "$pid" 2>/dev/null || true   # PID 1 dies -> kernel kills the whole pid ns
        fi
    fi
    for up in $up $sp; do   # unshare and the pty proxy exit once PID 1 is gone
        for i in $(seq 1 250); do alive "$up" || break; sleep 0.02; done
        case "$(cat "/proc/$up/comm" 2>/dev/null)" in
            unshare|python3*) if alive "$up"; then kill -KILL "$up" 2>/dev/null || true; fi;;
        esac
    done
    local cg
    cg=$(cat "$d/cgroup" 2>/dev/null || true)
    if [ -n "$cg" ] && [ -d "$cg" ]; then   # remove leftover (empty) cgroups bottom-up
        find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        if [ -d "$cg" ]; then echo "systemd-sandbox: could not remove $cg" >&2; fi
    fi
    restore_sysctls "$d"
    rm -f "$d/pid" "$d/unshare.pid" "$d/proxy.pid" "$d/cgroup"
}

# ------------------------------------------------------------------ main ----
[ "$(id -u)" = 0 ] || die "must run as root"
cmd=${1:-}; shift || true
case "$cmd" in
    __inner) inner "$@";;
    boot)    d=$(readlink -m "$1"); boot "$d";;
    ctl)     d=$(readlink -m "$1"); shift; ctl "$d" "$@";;
    run)     d=$(readlink -m "$1"); shift; in_ns "$d" "$@";;
    install) d=$(readlink -m "$1"); shift; install_units "$d" "$@";;
    down)    d=$(readlink -m "$1"); down "$d";;
    *) sed -n '2,23p' "$SELF" >&2; exit 2;;
esac
