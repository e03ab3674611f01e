#!/usr/bin/env bash
# Installs what aiva needs on Debian/Ubuntu, idempotently: a Python venv with aiva,
# the Docker engine (started if it is not running), mmdebstrap, the base image, and
# gVisor's runsc registered with the engine (scripts/gvisor.sh).
# Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_UPDATED=""

say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- Python
if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "aiva needs Python >= 3.11 (found: $(python3 --version 2>&1))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv 2>/dev/null || { apt_install python3-venv; python3 -m venv .venv; }
fi
if ! .venv/bin/python -c 'import aiva, pytest, hypothesis' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.aiva-installed ]; then
  say "installing aiva and its dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.aiva-installed
fi

# --- Host tools: the Docker engine, mmdebstrap (images), busybox (initramfs, test image),
#     QEMU (microVMs), nftables (egress allow-lists)
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v nft >/dev/null || need+=(nftables)  # VM NAT, --network allow=... rules
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt_install "${need[@]}"
fi

# --- Start the Docker engine when none answers (as root, in the background)
if ! docker info >/dev/null 2>&1; then
  if [ -n "$SUDO" ]; then
    say "starting Docker with systemctl"
    sudo systemctl start docker
  else
    say "starting dockerd (log: /tmp/aiva-dockerd.log)"
    nohup dockerd >/tmp/aiva-dockerd.log 2>&1 &
    echo $! >/tmp/aiva-dockerd.pid
  fi
  for _ in $(seq 1 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "the Docker engine did not start; see /tmp/aiva-dockerd.log" >&2; exit 1; }
fi

# --- The base image (built once from Debian packages, then cached)
say "base image: aiva/python"
.venv/bin/aiva image build python --no-vm

# --- gVisor (`--runtime gvisor`): runsc registered with the engine as aiva-runsc
$SUDO bash scripts/gvisor.sh || say "gVisor is not set up: --runtime gvisor will say so"
export PATH="$ROOT/.venv/bin:$PATH"
