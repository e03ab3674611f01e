#!/usr/bin/env bash
# gVisor for `aiva start NAME --runtime gvisor`: installs runsc (Debian's package) and
# registers it with the Docker engine as the runtime `aiva-runsc`, idempotently.
#
# The entry is aiva's own, so a `runsc` entry the user made is never changed; every other
# key of /etc/docker/daemon.json is kept. dockerd reloads its runtimes on SIGHUP (no
# restart, running containers untouched); only the dockerd behind the pidfile is signalled.
# Flags: --host-uds=all lets the agent's Unix socket on the bind-mounted run dir be made
# (and renamed, chmod'ed: the 2022 build needs "open" for those too) as a real host socket
# the host connects to, as under runc. --network=host only where gVisor's own network
# stack cannot run (a VM without nested virtualisation): then gVisor uses the container's
# network namespace, so Docker's bridge, published ports and aiva's nft rules still apply.
#
# Run by scripts/setup.sh (sourced) and by the tests' gVisor fixture. Needs root.
set -euo pipefail
GV_NAME=aiva-runsc
GV_CONF=${AIVA_DOCKER_CONFIG:-/etc/docker/daemon.json}
GV_PIDFILE=${AIVA_DOCKER_PIDFILE:-/var/run/docker.pid}
GV_PROBE_IMAGE=${AIVA_GVISOR_PROBE_IMAGE:-aiva/python}

gv_say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
gv_fail() { echo "gVisor setup: $*" >&2; return 1; }

gv_registered() {  # the engine lists it, with the flags this version of aiva needs
  docker info --format '{{json .Runtimes}}' 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin).get('$GV_NAME') or {}
sys.exit(0 if '--host-uds=all' in (r.get('runtimeArgs') or []) else 1)" 2>/dev/null
}

# Merge {"runtimes": {NAME: {"path": ..., "runtimeArgs": [...]}}} into the config; prints
# "changed" when it wrote (atomically, mode kept), nothing when it was already so.
gv_merge() {
  python3 - "$GV_CONF" "$GV_NAME" "$@" <<'EOF'
import json, os, sys, tempfile
path, name, runsc, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    with open(path) as f:
        text = f.read()
    conf = json.loads(text) if text.strip() else {}
    mode = os.stat(path).st_mode & 0o777
except FileNotFoundError:
    conf, mode = {}, 0o644
except ValueError as exc:
    sys.exit(f"{path} is not valid JSON ({exc}); not touching it")
if not isinstance(conf, dict) or not isinstance(conf.get("runtimes", {}), dict):
    sys.exit(f"{path} is not a JSON object with a 'runtimes' object; not touching it")
want = {"path": runsc, "runtimeArgs": args}
if conf.get("runtimes", {}).get(name) == want:
    sys.exit(0)
conf.setdefault("runtimes", {})[name] = want
os.makedirs(os.path.dirname(path), exist_ok=True)
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".daemon.json.")
with os.fdopen(fd, "w") as f:
    json.dump(conf, f, indent=2)
    f.write("\n")
os.chmod(tmp, mode)
os.replace(tmp, path)
print("changed")
EOF
}

# SIGHUP the dockerd behind the pidfile (never any other), then wait for the reload.
gv_reload() {
  local pid
  pid=$(cat "$GV_PIDFILE" 2>/dev/null || true)
  if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
    gv_fail "no dockerd behind $GV_PIDFILE to reload; restart the Docker engine to pick up $GV_NAME"
    return 1
  fi
  kill -HUP "$pid"
}

gv_wait_args() {  # until the engine lists the runtime with these exact args
  local want
  want=$(printf '%s\n' "$@" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().split()))')
  for _ in $(seq 1 100); do
    docker info --format '{{json .Runtimes}}' 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin).get('$GV_NAME') or {}
sys.exit(0 if r.get('runtimeArgs') == json.loads(sys.argv[1]) else 1)" "$want" && return 0
    sleep 0.1
  done
  gv_fail "dockerd did not list $GV_NAME after the reload"
}

gv_register() {  # register with these args, reload, wait
  local out
  out=$(gv_merge "$RUNSC" "$@") || { gv_fail "could not update $GV_CONF"; return 1; }
  if [ "$out" = changed ]; then
    gv_reload || return 1
  fi
  gv_wait_args "$@"
}

gv_setup() {
  if gv_registered; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || { gv_fail "needs root (it edits $GV_CONF)"; return 1; }
  if ! command -v runsc >/dev/null; then
    gv_say "installing runsc (gVisor)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runsc \
      >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends runsc >/dev/null; } \
      || { gv_fail "apt-get install runsc failed"; return 1; }
  fi
  RUNSC=$(command -v runsc)
  gv_say "registering $GV_NAME with the Docker engine ($GV_CONF)"
  gv_register --host-uds=all || return 1
  # gVisor's own network stack first; where it cannot run (nested VMs), the host's
  if ! gv_probe; then
    if grep -q "root network namespace" "$GV_LOG"; then
      gv_say "gVisor's network stack cannot run here: $GV_NAME uses --network=host"
      gv_register --network=host --host-uds=all || return 1
    fi
    gv_probe || { gv_fail "runsc does not run here: $(tail -c 300 "$GV_LOG")"; return 1; }
  fi
}

GV_LOG=/tmp/aiva-gvisor-probe.log
gv_probe() {
  docker run --rm --pull never --runtime "$GV_NAME" --entrypoint true "$GV_PROBE_IMAGE" \
    >"$GV_LOG" 2>&1
}

# Executed (not sourced): do it now.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  gv_setup
fi
