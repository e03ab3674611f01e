"""A sandbox's run dir (``AIVA_HOME/run/<id12>``: its agent socket and syslog) as a small
tmpfs of its own, mounted ``nosuid,nodev,noexec``.

The sandbox writes there (as root, on Docker), and the host reads there. On a plain host
directory a setuid binary or a device node the sandbox planted would keep its powers for
anyone on the host who reaches it; on this mount the kernel ignores both, nothing there
runs, and the size is bounded (``RUN_SIZE``: the agent rotates its syslog at 8 MiB, so
two of those and the socket fit; a sandbox cannot make it hold more). It stays mounted
while the sandbox exists, so the syslog can be read after the container stopped; start
mounts it again after a host reboot; rm and the reaper unmount it.

The Docker engine must see the mount: it resolves the bind source in its own mount
namespace, which normally receives ours by propagation. Where it does not (aiva run in a
private mount namespace, ``unshare --mount --propagation private``), the tmpfs is taken
down again and the run dir is a plain directory, with a warning.

Mounting needs root. Without root the run dir is a plain 0700 directory and a warning
says so: then only the user who runs aiva (who, in the docker group, is root-equivalent
anyway) can reach what the sandbox leaves there, and the container cannot make device
nodes (CAP_MKNOD is dropped), but a setuid file it plants keeps its bits on the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger("aiva")

RUN_SIZE = 32 << 20  # bytes
RUN_INODES = 256
_FLAGS = os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
_libc: ctypes.CDLL | None = None
_warned = False
DOCKER_PID_FILES = ("/var/run/docker.pid", "/run/docker.pid")


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def is_private_mount(path: Path) -> bool:
    """``path`` is a mount point with nosuid, nodev and noexec."""
    try:
        return os.path.ismount(path) and os.statvfs(path).f_flag & _FLAGS == _FLAGS
    except OSError:
        return False


def ensure(path: Path) -> bool:
    """Make ``path`` the sandbox's run dir: a fresh tmpfs (as root), else a plain 0700
    directory (with a warning, once per process). True when it is the tmpfs. A path
    already mounted is left as it is (the sandbox's files stay)."""
    _mkdir(path)
    if not is_private_mount(path):
        if os.geteuid() != 0:
            _warn_once("not root: sandbox run dirs are plain directories, not nosuid,nodev,"
                       "noexec mounts (a setuid file a sandbox leaves there keeps its bits; "
                       "only you can reach it: AIVA_HOME is 0700)")
            return False
        if os.path.ismount(path):  # a mount of someone else's here: never stack over it
            raise OSError(errno.EBUSY, f"{path} is a mount point without nosuid,nodev,noexec")
        opts = f"size={RUN_SIZE},nr_inodes={RUN_INODES},mode=0700".encode()
        if _c().mount(b"tmpfs", os.fsencode(path), b"tmpfs",
                      _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, opts) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot mount a tmpfs on {path}: {os.strerror(err)}")
    if not docker_sees(path):
        _umount(path)
        _warn_once("the Docker engine does not see mounts made here (a private mount "
                   "namespace?): sandbox run dirs are plain directories, not nosuid,nodev,"
                   "noexec mounts")
        return False
    return True


def _warn_once(text: str) -> None:
    global _warned
    if not _warned:
        log.warning("%s", text)
        _warned = True


def docker_sees(path: Path) -> bool:
    """Whether the Docker engine's mount namespace has ``path`` as a mount point too
    (True when the engine's pid is not known: then we cannot tell, and assume it)."""
    for pid_file in DOCKER_PID_FILES:
        try:
            pid = int(Path(pid_file).read_text().strip())
            theirs = os.readlink(f"/proc/{pid}/ns/mnt")
        except (OSError, ValueError):
            continue
        if theirs == os.readlink("/proc/self/ns/mnt"):
            return True
        return path in _mount_points(f"/proc/{pid}/mountinfo", path.parent)
    return True


def _mkdir(path: Path) -> None:
    from aiva.guard.private import private_dir

    private_dir(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{path} is not a directory")


def release(path: Path) -> None:
    """Unmount the run dir's tmpfs (lazily: whatever still holds it lets go later) and
    remove what is left: the directory, or a plain one's contents (never a link's)."""
    import shutil

    if os.path.ismount(path):
        _umount(path)
    shutil.rmtree(path, ignore_errors=True)  # fd-based: never follows a planted link


def _umount(path: Path) -> None:
    if _c().umount2(os.fsencode(path), _MNT_DETACH | _UMOUNT_NOFOLLOW) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot unmount {path}: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """The tmpfs mount points directly below ``root`` (this home's run dirs)."""
    return _mount_points("/proc/self/mountinfo", root)


def _mount_points(mountinfo: str, root: Path) -> list[Path]:
    out = []
    prefix = os.fsencode(root) + b"/"
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        point = _unescape(fields[4])
        if fields[sep + 1] != b"tmpfs" or not point.startswith(prefix):
            continue
        if b"/" in point[len(prefix):]:
            continue
        out.append(Path(os.fsdecode(point)))
    return out


def _unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def age(path: Path) -> float:
    """Seconds since the run dir changed (its root's ctime): a mount made moments ago by
    a create in another process is not an orphan yet."""
    try:
        return time.time() - os.stat(path).st_ctime
    except OSError:
        return 0.0
