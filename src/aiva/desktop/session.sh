#!/bin/sh
# The desktop session of an aiva desktop sandbox, started by aiva after every boot:
# X on a frame buffer (Xvfb :0), XFCE, x11vnc (VNC password, guest loopback only) and
# noVNC through websockify on :6080, which aiva publishes on the host's 127.0.0.1.
# Each service's output goes to syslog under its own tag (or to $dir/NAME.log).
# Writes $dir/ready once VNC and noVNC answer; $dir/failed with the reason if not.
set -u
dir=/run/aiva-desktop
geometry=${AIVA_DESKTOP_GEOMETRY:-1280x800}
export DISPLAY=:0 HOME="${HOME:-/root}" XDG_RUNTIME_DIR="$dir/xdg"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$dir" "$XDG_RUNTIME_DIR"
rm -f "$dir/ready" "$dir/failed"

fail() { echo "$*" >"$dir/failed"; echo "aiva desktop: $*" >&2; exit 1; }

# service TAG CMD...: run CMD in the background, its output to syslog or a file
service() {
    tag=$1; shift
    ( "$@" 2>&1 | { logger -t "$tag" 2>/dev/null || cat >"$dir/$tag.log"; } ) &
}

# wait_for SECONDS CMD...: poll CMD until it succeeds
wait_for() {
    n=$(($1 * 10)); shift
    while [ "$n" -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; n=$((n - 1)); done
    return 1
}

listening() {  # a TCP port on the guest's loopback accepts connections
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$1"
}

[ -s "$dir/password" ] || fail "no VNC password in $dir/password"
x11vnc -storepasswd "$(cat "$dir/password")" "$dir/passwd" >/dev/null 2>&1 \
    || fail "x11vnc could not store the VNC password"
rm -f "$dir/password"
rm -f /tmp/.X0-lock /tmp/.X11-unix/X0  # left by the last boot, if any

service Xvfb Xvfb :0 -screen 0 "${geometry}x24" -nolisten tcp
wait_for 30 xdpyinfo || fail "Xvfb did not start"
service xfce4 dbus-launch --exit-with-session startxfce4
service x11vnc x11vnc -display :0 -rfbauth "$dir/passwd" -localhost -rfbport 5900 \
    -forever -shared -noxdamage -quiet
service websockify websockify --web /usr/share/novnc 6080 127.0.0.1:5900
wait_for 60 listening 5900 || fail "x11vnc did not start"
wait_for 60 listening 6080 || fail "websockify did not start"
for part in xfwm4 xfce4-panel xfdesktop; do  # ready means the desktop is drawn
    wait_for 60 pgrep -x "$part" || fail "XFCE did not start ($part is missing)"
done
touch "$dir/ready"
wait
