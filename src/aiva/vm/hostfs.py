"""Host directories in a QEMU microVM (``--mount``), over virtio-fs.

Debian's cloud kernel, which aiva VMs boot, has no 9p at all (no ``9p``/``9pnet``
module, nothing built in) but does ship ``fuse`` and ``virtiofs``; QEMU 7.2 ships
``virtiofsd`` and has ``vhost-user-fs-device`` for ``-M microvm``'s virtio-mmio. So:

- one ``virtiofsd`` per VM serves a *tree*: in a private mount namespace of its own
  (``unshare --mount``), a small tmpfs over an empty directory of the VM dir, with each
  host directory bind-mounted on subdirectory ``0``, ``1``, ..., and the tmpfs then made
  read-only. A read-only mount is a read-only bind mount there: the host kernel refuses
  writes whatever the guest does (virtiofsd has no read-only switch of its own and drops
  CAP_SYS_ADMIN, so the guest cannot undo it). On the host the directory stays empty:
  the mounts exist only in that namespace and end with it.
- QEMU gets one ``vhost-user-fs-device`` (tag ``aiva.host``), whatever the number of
  mounts (microvm has few virtio-mmio slots), and its RAM as a shared memfd, which
  vhost-user needs.
- ``/init`` (``init.sh``) mounts the tag once and binds each subdirectory at its path in
  the sandbox (``aiva.mount=N:PATH:ro|rw`` on the kernel command line).

The supervisor starts virtiofsd before QEMU (QEMU connects to its socket at start-up);
virtiofsd exits when QEMU disconnects, and the supervisor reaps it.

Costs: vhost-user-fs cannot be migrated, so a VM with mounts cannot ``savevm`` (memory
snapshots); a stopped VM's disk snapshot still works. Needs root: virtiofsd's sandbox
and the bind mounts use mount namespaces.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from aiva.errors import BackendUnavailable, InvalidValue
from aiva.models import MountSpec, SandboxInfo, resolve_host_dir

TAG = "aiva.host"
SOCKET = "fs.sock"
TREE = "hostfs"  # in the VM dir
PIDS = "helpers.pid"  # the supervisor writes its helpers' pids here
_VIRTIOFSD = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd")

# $1 tree, $2 virtiofsd, $3 socket, then N HOST MODE triples. A rw mount is recursive
# (--rbind, like Docker's); a ro one is not (a remount,ro covers only the top mount, so a
# recursive ro bind would leave submounts writable): below it, other filesystems show as
# empty directories.
_SCRIPT = """set -e
tree=$1 daemon=$2 sock=$3
shift 3
mount -t tmpfs -o mode=0755,size=64k aiva-hostfs "$tree"
while [ $# -gt 0 ]; do
    mkdir "$tree/$1"
    if [ "$3" = ro ]; then
        mount --bind "$2" "$tree/$1"
        mount -o remount,bind,ro "$tree/$1"
    else
        mount --rbind "$2" "$tree/$1"
    fi
    shift 3
done
mount -o remount,ro "$tree"
exec "$daemon" --socket-path="$sock" -o source="$tree" -o cache=auto -o announce_submounts
"""


def virtiofsd() -> str | None:
    for path in _VIRTIOFSD:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("virtiofsd")


def check_host() -> str:
    """The virtiofsd to use; BackendUnavailable, with the fix, when this host cannot."""
    daemon = virtiofsd()
    for bad, what, hint in (
        (os.geteuid() != 0, "mounting host directories into a QEMU VM needs root "
         "(virtiofsd and its read-only bind mounts use mount namespaces)",
         "run aiva as root, or use --backend docker for --mount"),
        (daemon is None, "virtiofsd is missing (QEMU's virtio-fs file server)",
         "install it: `sudo apt-get install qemu-system-common` (or `virtiofsd`)"),
        (shutil.which("unshare") is None or shutil.which("mount") is None,
         "`unshare` and `mount` are needed for --mount on QEMU",
         "install util-linux and mount"),
    ):
        if bad:
            raise BackendUnavailable(what, hint=hint)
    assert daemon is not None
    return daemon


def helper(sb: SandboxInfo, vm_dir: Path, run: Path) -> dict[str, Any]:
    """What the supervisor runs before QEMU: virtiofsd over this VM's mounts."""
    daemon = check_host()
    tree = vm_dir / TREE
    triples: list[str] = []
    for i, m in enumerate(sb.spec.mounts):
        try:
            resolve_host_dir(m.host_path)
        except InvalidValue as exc:
            raise InvalidValue(f"cannot start {sb.name}: {exc}",
                               hint="create the directory again, or remove the sandbox "
                               "and make it without this --mount") from None
        triples += [str(i), m.host_path, "ro" if m.read_only else "rw"]
    tree.mkdir(parents=True, exist_ok=True)
    sock = run / SOCKET
    sock.unlink(missing_ok=True)
    argv = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SCRIPT,
            "aiva-hostfs", str(tree), daemon, str(sock), *triples]
    return {"argv": argv, "socket": str(sock), "log": str(vm_dir / "virtiofsd.log")}


def qemu_args(run: Path, mem_mib: int) -> list[str]:
    """The file system device, and guest RAM vhost-user can share (use with
    ``-M microvm,memory-backend=mem``)."""
    return ["-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on",
            # microvm's virtio-mmio is legacy (v1) by default; libvhost-user, which
            # virtiofsd is built on, serves only modern (virtio 1.0) devices
            "-global", "virtio-mmio.force-legacy=false",
            "-chardev", f"socket,id=hostfs,path={run}/{SOCKET}",
            "-device", f"vhost-user-fs-device,chardev=hostfs,tag={TAG}"]


def kernel_args(mounts: list[MountSpec]) -> list[str]:
    """``aiva.mount=N:PATH:MODE``, parents before what is mounted inside them."""
    order = sorted(range(len(mounts)), key=lambda i: mounts[i].guest_path.count("/"))
    return [f"aiva.mount={i}:{mounts[i].guest_path}:{'ro' if mounts[i].read_only else 'rw'}"
            for i in order]
