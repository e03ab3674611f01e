#!/bin/sh
# aiva microVM /init (busybox sh, in the initramfs). Contract with the QEMU backend:
#   kernel cmdline  aiva.root=/dev/vda         read-only ext4 system image (required)
#                   aiva.data=/dev/vdb         read-write ext4 data disk (else a tmpfs)
#                   aiva.ip=ADDR/PREFIX[,GW]   static address on eth0 (optional)
#                   aiva.hostname=NAME         (optional)
#                   aiva.agent=vsock:PORT      serve the agent on AF_VSOCK PORT (Firecracker)
#                                              instead of the virtio-serial port
#                   aiva.halt=reboot           end by reboot, never poweroff (Firecracker on
#                                              x86 exits only on reboot; needs reboot=k)
#                   aiva.syslog=1              a virtio-serial port named "aiva.syslog" takes
#                                              the guest's syslog: the agent serves /dev/log
#                                              and writes JSON lines to it (QEMU only)
#                   aiva.mount=N:PATH:ro|rw    (repeated) host directory N, a subdirectory of
#                                              the virtio-fs tree tagged "aiva.host", bound
#                                              at PATH in the root (QEMU only; read-only is
#                                              enforced by the host's file server)
#   root = overlay(lower=/.aiva/lower ro, upper=/.aiva/data/upper); /.aiva is a tmpfs
#   holding bin/busybox, agent/, run/stage2.sh; the agent serves the virtio-serial port
#   named "aiva.agent" and, when it exits, the VM syncs, remounts ro and powers off.
#   Any failure prints one "AIVA-INIT-ERROR: ..." line and powers off: never a shell.
PATH=/bin
export PATH
umask 022

# Power off; without ACPI (microvm,acpi=off) that only halts, so reboot instead and let
# QEMU's -no-reboot end the process.
off() {
    [ "$halt" != reboot ] && [ -d /sys/firmware/acpi ] && poweroff -f
    reboot -f
}

fail() {
    echo "AIVA-INIT-ERROR: $*"
    sync
    off
    exit 1
}

# wait_for PATH SECONDS: devices appear as their drivers probe; bounded, never a hang
wait_for() {
    n=0
    while [ ! -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -gt $(($2 * 50)) ] && return 1
        usleep 20000
    done
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs"

cmdline=$(cat /proc/cmdline)
root="" data="" ip="" name="" agent="" halt="" syslog="" mounts=""
for arg in $cmdline; do
    case "$arg" in
        aiva.root=*) root=${arg#*=} ;;
        aiva.data=*) data=${arg#*=} ;;
        aiva.ip=*) ip=${arg#*=} ;;
        aiva.hostname=*) name=${arg#*=} ;;
        aiva.agent=*) agent=${arg#*=} ;;
        aiva.halt=*) halt=${arg#*=} ;;
        aiva.syslog=*) syslog=${arg#*=} ;;
        aiva.mount=*) mounts="$mounts ${arg#*=}" ;;
    esac
done
case "$name" in *[!A-Za-z0-9.-]*) fail "bad aiva.hostname=$name" ;; esac
vsock=""
case "$agent" in
    "") ;;
    vsock:[0-9]*) vsock=${agent#vsock:} ;;
    *) fail "bad aiva.agent=$agent" ;;
esac
case "$vsock" in *[!0-9]*) fail "bad aiva.agent=$agent" ;; esac

# modules, dependencies first; "mod.key=value" on the cmdline becomes a parameter
load_modules() {
    while read -r ko; do
        mod=${ko##*/}
        mod=${mod%.ko}
        params=""
        for arg in $cmdline; do
            case "$arg" in "$mod".*) params="$params ${arg#"$mod".}" ;; esac
        done
        # shellcheck disable=SC2086
        insmod "$ko" $params || fail "insmod $mod failed"
    done <"$1"
}
load_modules /aiva/modules
# virtio-fs (fuse, virtiofs) only for a VM that mounts host directories
[ -z "$mounts" ] || load_modules /aiva/modules.mounts

[ -n "$root" ] || fail "no aiva.root= on the kernel command line"
wait_for "$root" 5 || fail "root device $root not found"
mount -t ext4 -o ro "$root" /lower || fail "cannot mount $root (ext4, read-only)"
if [ -n "$data" ]; then
    wait_for "$data" 5 || fail "data device $data not found"
    mount -t ext4 -o rw,noatime "$data" /data || fail "cannot mount $data (ext4)"
else
    mount -t tmpfs -o mode=0755 data /data || fail "cannot mount a tmpfs for data"
fi
mkdir -p /data/upper /data/work || fail "cannot make the overlay dirs on $data"
mount -t overlay overlay -o lowerdir=/lower,upperdir=/data/upper,workdir=/data/work \
    /newroot || fail "cannot mount the overlay root"

a=/newroot/.aiva
mkdir -p "$a" /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/run \
    /newroot/workspace || fail "cannot make the root's directories"
mount -t tmpfs -o mode=0755,nosuid,nodev aiva "$a" || fail "cannot mount a tmpfs at /.aiva"
mkdir -p "$a/bin" "$a/run" "$a/agent" "$a/data" "$a/lower" "$a/host"
# host directories: "N PATH MODE" lines for stage 2, which mounts them once /tmp and /run
# are in place (so a PATH below them is not hidden)
: >"$a/run/mounts"
for m in $mounts; do
    sub=${m%%:*}
    rest=${m#*:}
    path=${rest%:*}
    mode=${rest##*:}
    case "$sub" in "" | *[!0-9]*) fail "bad aiva.mount=$m" ;; esac
    case "$path" in /?*) ;; *) fail "bad aiva.mount=$m" ;; esac
    case "$mode" in ro | rw) ;; *) fail "bad aiva.mount=$m" ;; esac
    echo "$sub $path $mode" >>"$a/run/mounts"
done
cp /bin/busybox "$a/bin/busybox" || fail "cannot copy busybox into the root"
cp -a /aiva/agent/. "$a/agent/" || fail "cannot copy the agent into the root"
mount --move /data "$a/data" || fail "cannot move the data disk"
mount --move /lower "$a/lower" || fail "cannot move the system image"

ip link set lo up
if [ -n "$ip" ]; then
    addr=${ip%%,*}
    gw=""
    case "$ip" in *,*) gw=${ip#*,} ;; esac
    wait_for /sys/class/net/eth0 5 || fail "aiva.ip given but there is no eth0"
    ip addr add "$addr" dev eth0 || fail "bad aiva.ip address $addr"
    ip link set eth0 up || fail "cannot bring eth0 up"
    if [ -n "$gw" ]; then
        ip route add default via "$gw" || fail "bad aiva.ip gateway $gw"
    fi
fi

# the agent's port: the virtio-serial port QEMU named aiva.agent (none with a vsock agent)
port=""
n=0
if [ -n "$vsock" ]; then
    wait_for /dev/vsock 5 || fail "aiva.agent=$agent but no vsock device (vsock modules?)"
fi
while [ -z "$port" ] && [ -z "$vsock" ]; do
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] && [ "$(cat "$f")" = aiva.agent ] && port=${f%/name} && port=${port##*/}
    done
    [ -n "$port" ] && break
    n=$((n + 1))
    [ "$n" -gt 250 ] && fail "no virtio-serial port named aiva.agent"
    usleep 20000
done
if [ -n "$port" ] && [ ! -c "/dev/$port" ]; then
    devno=$(cat "/sys/class/virtio-ports/$port/dev")
    mknod "/dev/$port" c "${devno%%:*}" "${devno##*:}" || fail "cannot make /dev/$port"
fi
[ -z "$port" ] || { mkdir -p /dev/virtio-ports && ln -sf "../$port" /dev/virtio-ports/aiva.agent; }

# the syslog port, named aiva.syslog, if the host said there is one; without it the VM
# runs on, just with no syslog (nothing answers at /dev/log)
sport=""
if [ "$syslog" = 1 ]; then
    n=0
    while [ -z "$sport" ]; do
        for f in /sys/class/virtio-ports/*/name; do
            [ -r "$f" ] && [ "$(cat "$f")" = aiva.syslog ] && sport=${f%/name} && sport=${sport##*/}
        done
        [ -n "$sport" ] && break
        n=$((n + 1))
        [ "$n" -gt 250 ] && echo "AIVA-INIT: no virtio-serial port named aiva.syslog" && break
        usleep 20000
    done
fi
if [ -n "$sport" ] && [ ! -c "/dev/$sport" ]; then
    devno=$(cat "/sys/class/virtio-ports/$sport/dev")
    mknod "/dev/$sport" c "${devno%%:*}" "${devno##*:}" || sport=""
fi
if [ -n "$sport" ]; then
    mkdir -p /dev/virtio-ports && ln -sf "../$sport" /dev/virtio-ports/aiva.syslog
fi
mount --move /dev /newroot/dev || fail "cannot move /dev into the root"

{
    echo "PORT=$port"
    echo "SYSLOG_PORT=$sport"
    echo "NAME=$name"
    echo "VSOCK=$vsock"
    echo "HALT=$halt"
    cat <<'STAGE2'
# stage 2: PID 1 in the real root. Runs the agent, then shuts down cleanly.
bb=/.aiva/bin/busybox
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

halt_now() {
    $bb kill -TERM -1 2>/dev/null
    n=0
    until $bb mount -o remount,ro / 2>/dev/null; do  # busy while something still writes
        n=$((n + 1))
        [ "$n" -eq 25 ] && $bb kill -KILL -1 2>/dev/null
        [ "$n" -gt 50 ] && break
        $bb usleep 40000
    done
    $bb sync
    $bb mount -o remount,ro /.aiva/data 2>/dev/null || echo "AIVA-INIT-ERROR: data disk still busy"
    $bb sync
    [ "$HALT" != reboot ] && [ -d /sys/firmware/acpi ] && $bb poweroff -f
    $bb reboot -f
}

fail() {
    echo "AIVA-INIT-ERROR: $*"
    halt_now
}

$bb mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
$bb mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount /sys"
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts ||
    fail "cannot mount /dev/pts"
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm || fail "cannot mount /dev/shm"
$bb mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp || fail "cannot mount /tmp"
$bb mount -t tmpfs -o nosuid,nodev,mode=0755 run /run || fail "cannot mount /run"
[ -n "$NAME" ] && $bb hostname "$NAME"
# host directories: one virtio-fs tree with a subdirectory per mount, each bound at its
# path; the tree's own mount is then detached, so only the bound paths show
if [ -s /.aiva/run/mounts ]; then
    $bb mount -t virtiofs aiva.host /.aiva/host ||
        fail "cannot mount the host's directories (virtio-fs tag aiva.host)"
    while read -r sub path mode; do
        $bb mkdir -p "$path" || fail "cannot make the mount point $path"
        $bb mount -o bind "/.aiva/host/$sub" "$path" || fail "cannot mount a host directory at $path"
        if [ "$mode" = ro ]; then  # the host enforces it; this makes the guest say so too
            $bb mount -o remount,bind,ro "$path" || echo "AIVA-INIT: $path stays rw-flagged"
        fi
    done </.aiva/run/mounts
    $bb umount -l /.aiva/host
fi
command -v python3 >/dev/null || fail "no python3 in the system image"

# The agent reads EOF from a port whose host side is not connected yet, and exits on
# EOF; so start it only once the host holds the socket (debugfs shows that state).
if [ -z "$VSOCK" ] && $bb mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null; then
    state=/sys/kernel/debug/virtio-ports/$PORT
    while [ -r "$state" ]; do
        up=0
        while read -r key value; do
            [ "$key" = host_connected: ] && up=$value
        done <"$state"
        [ "$up" = 1 ] && break
        $bb usleep 20000
    done
    $bb umount /sys/kernel/debug
fi

echo AIVA-AGENT-START
cd / || fail "no /"
if [ -n "$VSOCK" ]; then set -- --vsock "$VSOCK"; else set -- --device "/dev/$PORT"; fi
[ -z "$SYSLOG_PORT" ] || set -- "$@" --syslog /dev/virtio-ports/aiva.syslog
$bb env -i PATH="$PATH" HOME=/root TERM=linux LANG=C.UTF-8 \
    python3 -B -S /.aiva/agent "$@" </dev/null
halt_now
STAGE2
} >"$a/run/stage2.sh" || fail "cannot write stage2"

umount /proc /sys
# switch_root must run as PID 1, so it is exec'd: were it to fail, init would exit and
# the kernel panic (run with panic=-1 and -no-reboot, so the VM still ends)
# shellcheck disable=SC2093
exec switch_root /newroot /.aiva/bin/busybox sh /.aiva/run/stage2.sh
