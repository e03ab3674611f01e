"""A disk a Docker sandbox cannot outgrow: one ext4 image file of ``spec.disk`` bytes.

Why this mechanism. Docker's own limit (``--storage-opt size``) needs overlay2 on xfs
with project quotas, which most hosts (ext4) do not have, so the container's writable
layer grows into the host's free space. Instead a Docker sandbox follows the seed's
"read-only system image + read-write data volume": its root filesystem is read-only and
every place it may write is a directory of one sparse ext4 image per sandbox, so the
kernel stops it with ENOSPC at ``spec.disk`` and the host's free space moves by at most
that much.

Why a host mount and bind mounts, not a Docker ``local`` volume of ``type=ext4``: Docker
20.10 cannot mount sub-directories of one volume at several paths, and a volume must
name a fixed ``/dev/loopN``, which after a reboot may be another file's loop device. So
aiva mounts the image itself (``mount -o loop``: the kernel frees the loop device on
unmount) under ``AIVA_HOME/disks/<id>/mnt`` with nosuid,nodev, and bind-mounts its
sub-directories into the container. That mount survives restarts of dockerd and of
aiva; after a reboot it is gone and aiva mounts it again before the container starts
(``ensure_mounted``). Until then the bind sources do not exist and Docker refuses to
start the container: a sandbox never writes to the host's disk instead of its own.

What is on the disk (see ``layout``): the workdir (``work/``) and the paths an agent
expects to write (``/root``, ``/home``, ``/tmp``, ``/var/tmp``, ``/usr/local``,
``/opt``, and ``/app`` for ``aiva deploy``). Where the image has files at such a path
they must not disappear, and copying them onto every disk costs (96 MB of /opt in an MCP
image took ~0.8 s a create): so the image's files there are copied out once per image
(the seed, ``disks/.seed/``, made by a helper container) and the path is an overlay with
the seed below, read-only, and the disk's directory above, where every write (and
deletion) goes; it is mounted inside the disk, so it too exists only while the disk is
mounted. /run is a small tmpfs (counted against the sandbox's memory). Everything else
is the image, read-only: ``apt-get install`` fails with EROFS; ``aiva image derive``
makes an image with more packages.

``rm`` unmounts (the loop device goes); the image file stays, as Docker kept the data
volume, unless ``--volumes``. A kept disk is a plain directory, removable with ``rm -r``.
Mounting needs root (aiva runs as root, as the README says); ``defaults.
enforce_docker_disk: false`` in config.yaml turns this off (a writable root, no limit).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiva import paths
from aiva.errors import BackendError
from aiva.models import SandboxSpec

WORK = "work"  # the sub-directory of the disk mounted at the sandbox's workdir
# guest path -> (sub-directory of the disk, mode when the image has no such directory)
SYSTEM_PATHS: dict[str, tuple[str, int]] = {
    "/root": ("root", 0o700),
    "/home": ("home", 0o755),
    "/tmp": ("tmp", 0o1777),
    "/var/tmp": ("var-tmp", 0o1777),
    "/usr/local": ("usr-local", 0o755),
    "/opt": ("opt", 0o755),
    "/app": ("app", 0o755),  # where `aiva deploy` pushes a program
}
RUN_TMPFS = {"/run": "rw,nosuid,nodev,noexec,size=32m,mode=755"}
MOUNT_OPTIONS = "loop,nosuid,nodev,noatime,noinit_itable"
_ID = re.compile(r"^[0-9a-f][0-9a-f-]{7,63}$")
_TIMEOUT = 120.0
LAYERS = "layers.json"  # sub-directory -> the image's seed below it (an overlay)


def disks_root() -> Path:
    return paths.disks_dir()


def disk_dir(sandbox_id: str) -> Path:
    if not _ID.match(sandbox_id):
        raise BackendError(f"not a sandbox id: {sandbox_id!r}")
    return disks_root() / sandbox_id


def image_path(sandbox_id: str) -> Path:
    return disk_dir(sandbox_id) / "disk.img"


def mount_point(sandbox_id: str) -> Path:
    return disk_dir(sandbox_id) / "mnt"


def layout(spec: SandboxSpec) -> list[tuple[str, str]]:
    """(guest path, sub-directory) pairs: the workdir, then each system path that neither
    the workdir nor a ``--mount`` covers (theirs wins there)."""
    work = posixpath.normpath(spec.workdir)
    taken = [work, *(posixpath.normpath(m.guest_path) for m in spec.mounts)]

    def covered(path: str) -> bool:
        return any(path == t or path.startswith(t.rstrip("/") + "/") for t in taken)

    return [(work, WORK)] + [(p, sub) for p, (sub, _) in SYSTEM_PATHS.items()
                             if not covered(p)]


def enforced() -> bool:
    """Whether new Docker sandboxes get a bounded disk (config; needs root)."""
    from aiva.config import load_config

    if not load_config().defaults.enforce_docker_disk:
        return False
    if os.geteuid() != 0:
        raise BackendError(
            "enforcing --disk on Docker needs root (aiva mounts an ext4 image per sandbox)",
            hint="run aiva as root, or set `defaults: {enforce_docker_disk: false}` in "
                 "config.yaml (then a sandbox can fill the host's disk)")
    return True


# ---------------------------------------------------------------------- the image


def make(sandbox_id: str, size: int) -> Path:
    """A new sparse ext4 image of ``size`` bytes, mounted; returns the mount point."""
    d = disk_dir(sandbox_id)
    d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.mkdir(mode=0o700)  # a fresh id: an existing directory is somebody else's
    img = image_path(sandbox_id)
    fd = os.open(img, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    # no reserved blocks (the sandbox is root anyway); inode tables and journal are not
    # zeroed (sparse: a 20 GB disk costs ~4 MB until written)
    _run(["mkfs.ext4", "-F", "-q", "-m", "0", "-L", "aiva-disk",
          "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", str(img)],
         "make the disk image")
    mnt = mount_point(sandbox_id)
    mnt.mkdir(mode=0o700)
    _mount(img, mnt)
    return mnt


def is_mounted(sandbox_id: str) -> bool:
    return os.path.ismount(mount_point(sandbox_id))


def ensure_mounted(sandbox_id: str) -> Path:
    """Mount the disk if it is not (after a reboot): before anything uses it."""
    mnt = mount_point(sandbox_id)
    if os.path.ismount(mnt):
        _mount_layers(sandbox_id)
    else:
        img = image_path(sandbox_id)
        if not img.is_file() or img.is_symlink():
            raise BackendError(f"the disk image of sandbox {sandbox_id[:12]} is missing "
                               f"({img})", hint="remove the sandbox and create it again")
        mnt.mkdir(mode=0o700, exist_ok=True)
        _mount(img, mnt)
        _mount_layers(sandbox_id)
    return mnt


def unmount(sandbox_id: str) -> None:
    """Unmount (the kernel then frees the loop device); lazily if something holds it."""
    mnt = mount_point(sandbox_id)
    if not os.path.ismount(mnt):
        return
    for sub in _layers(sandbox_id):  # the overlays first: they sit on the disk
        _umount(_view(sandbox_id, sub))
    _umount(mnt)


def _umount(path: Path, *, patience: float = 5.0) -> None:
    """Unmount; a container just removed may hold the mount for a moment (its mount
    namespace goes after it), so retry for ``patience`` s, then detach lazily (the
    kernel frees it, and the loop device, once the last user is gone)."""
    deadline = time.monotonic() + patience
    while os.path.ismount(path):
        if subprocess.run(["umount", str(path)], capture_output=True,
                          timeout=_TIMEOUT).returncode == 0:
            return
        if time.monotonic() >= deadline:
            _run(["umount", "-l", str(path)], "unmount the disk")
            return
        time.sleep(0.1)


def remove(sandbox_id: str) -> None:
    """Unmount, then delete the image and its directory."""
    unmount(sandbox_id)
    if is_mounted(sandbox_id):  # never delete through a mount
        raise BackendError(f"the disk of {sandbox_id[:12]} is still mounted",
                           hint=f"unmount {mount_point(sandbox_id)} and retry `aiva rm`")
    shutil.rmtree(disk_dir(sandbox_id), ignore_errors=True)


def _mount(img: Path, mnt: Path) -> None:
    """Mount the image, and make sure the Docker engine sees that mount: were aiva in a
    mount namespace of its own, the container would bind the empty directory beneath,
    and write to the host's disk with no limit."""
    from aiva.guard.runmount import docker_sees

    _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(img), str(mnt)],
         "mount the disk image")
    if not docker_sees(mnt):
        _umount(mnt)
        raise BackendError(
            "the Docker engine cannot see the disk aiva mounted for the sandbox (aiva runs "
            "in a mount namespace of its own)",
            hint="run aiva in the engine's mount namespace, or set `defaults: "
                 "{enforce_docker_disk: false}` in config.yaml (then --disk is not enforced)")


def _run(cmd: list[str], what: str) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"could not {what}: {exc}") from exc
    if r.returncode != 0:
        raise BackendError(f"could not {what}: {(r.stderr or r.stdout).strip()[-300:]}",
                           hint="it needs root, e2fsprogs and loop devices (`losetup -f`)")


# ---------------------------------------------------------------------- contents


def populate(sandbox_id: str, pairs: list[tuple[str, str]], seed: Path | None) -> None:
    """Lay the image's files under the fresh disk: a path where the image has files
    becomes an overlay (the image's seed below, read-only; the disk's directory above,
    where every write goes), so a create copies nothing; any other path is a directory
    of the disk with the image's mode."""
    mnt = mount_point(sandbox_id)
    layers: dict[str, str] = {}
    for _, sub in pairs:
        lower = seed / sub if seed is not None else None
        if lower is not None and lower.is_dir() and not lower.is_symlink():
            _mkdir_like(mnt / sub, lower)
            if any(lower.iterdir()):
                (mnt / ".ovl").mkdir(mode=0o700, exist_ok=True)
                (mnt / ".ovl" / sub).mkdir(mode=0o700)
                layers[sub] = str(lower)
    fd = os.open(disk_dir(sandbox_id) / LAYERS,
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(layers))
    ensure_layout(sandbox_id, pairs)
    _mount_layers(sandbox_id)


def _mkdir_like(target: Path, like: Path) -> None:
    st = os.lstat(like)
    os.mkdir(target)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))


def _layers(sandbox_id: str) -> dict[str, str]:
    try:
        data = json.loads((disk_dir(sandbox_id) / LAYERS).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise BackendError(f"the disk of {sandbox_id[:12]} has a bad {LAYERS}") from exc
    if not isinstance(data, dict):
        raise BackendError(f"the disk of {sandbox_id[:12]} has a bad {LAYERS}")
    return {str(k): str(v) for k, v in data.items()}


def _view(sandbox_id: str, sub: str) -> Path:
    """Where the overlay of ``sub`` is mounted: inside the disk, so that without the
    disk there is no such directory (and no container start)."""
    return mount_point(sandbox_id) / ".view" / sub


def bind_source(sandbox_id: str, sub: str, layers: dict[str, str]) -> Path:
    return _view(sandbox_id, sub) if sub in layers else mount_point(sandbox_id) / sub


def _mount_layers(sandbox_id: str) -> None:
    mnt = mount_point(sandbox_id)
    for sub, lower in _layers(sandbox_id).items():
        view = _view(sandbox_id, sub)
        if os.path.ismount(view):
            continue
        if not Path(lower).is_dir():
            raise BackendError(f"the image files under the disk of {sandbox_id[:12]} are "
                               f"gone ({lower})", hint="remove the sandbox and create it "
                               "again (its data is in " + str(mnt / sub) + ")")
        view.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(c in str(p) for p in (lower, mnt) for c in ",:\n"):
            raise BackendError(f"an overlay cannot name {mnt} or {lower} (a ',' or ':' in "
                               "the path)", hint="use an AIVA_HOME without ',' and ':'")
        opts = f"lowerdir={lower},upperdir={mnt / sub},workdir={mnt / '.ovl' / sub}"
        _run(["mount", "-t", "overlay", "overlay", "-o", f"{opts},nosuid,nodev",
              str(view)], "mount the image's files over the disk")


def ensure_layout(sandbox_id: str, pairs: list[tuple[str, str]]) -> None:
    """Every directory of the layout on the disk (the bind mounts need them): made with
    the mode the image would have had where the image (or a snapshot) has none. Only
    aiva writes the disk's top level: the sandbox sees the directories, never it."""
    mnt = mount_point(sandbox_id)
    for guest, sub in pairs:
        target = mnt / sub
        try:
            os.lstat(target)
        except FileNotFoundError:
            os.mkdir(target)
            os.chmod(target, SYSTEM_PATHS.get(guest, ("", 0o755))[1])


def seed(client: Any, image_id: str, pairs: list[tuple[str, str]],
         labels: dict[str, str]) -> Path:
    """The image's content at each layout path, copied out once per image and kept
    under ``disks/.seed/`` (never changed, never removed: it lies under the overlays of
    every disk of that image)."""
    key = image_id.split(":")[-1][:32] + "-" + _digest([g for g, _ in pairs])
    root = disks_root() / ".seed"
    done = root / key
    if done.is_dir():
        return done
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
    try:
        _seed_with_helper(client, image_id, pairs, tmp, labels)
        try:
            os.rename(tmp, done)
        except OSError:
            if not done.is_dir():  # another create won the race: theirs is the same
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


def _digest(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def _seed_with_helper(client: Any, image_id: str, pairs: list[tuple[str, str]],
                      out: Path, labels: dict[str, str]) -> None:
    import docker

    lines = ["set -e"]
    for guest, sub in pairs:
        g, s = shlex.quote(guest), shlex.quote(f"/seed/{sub}")
        lines.append(f"if [ -d {g} ]; then mkdir -p {s} && cp -a {g}/. {s}/; fi")
    helper = client.containers.run(
        image_id, entrypoint=["/bin/sh", "-c", "\n".join(lines)], command=[], detach=True,
        labels=labels | {"aiva.purpose": "disk-seed"}, network_mode="none",
        read_only=True, cap_drop=["MKNOD"], security_opt=["no-new-privileges"],
        mounts=[docker.types.Mount("/seed", str(out), type="bind")])
    try:
        result = helper.wait(timeout=600)
        if result.get("StatusCode") != 0:
            logs = helper.logs().decode(errors="replace").strip()[-300:]
            raise BackendError(f"could not copy the image's files onto the disk: {logs}")
    finally:
        helper.remove(force=True)


def docker_mounts(sandbox_id: str, spec: SandboxSpec) -> list[Any]:
    """The bind mounts of the disk's directories into the container. Their sources exist
    only while the disk is mounted, so Docker cannot start the container without it."""
    import docker

    layers = _layers(sandbox_id)
    return [docker.types.Mount(guest, str(bind_source(sandbox_id, sub, layers)), type="bind")
            for guest, sub in layout(spec)]


def copy_mounts(sandbox_id: str, spec: SandboxSpec, at: str, *, read_only: bool
                ) -> list[Any]:
    """The disk's directories as the sandbox sees them (overlays merged), each at
    ``at/<sub>`` in a helper container: what a snapshot saves and a restore refills."""
    import docker

    layers = _layers(sandbox_id)
    return [docker.types.Mount(f"{at}/{sub}", str(bind_source(sandbox_id, sub, layers)),
                               type="bind", read_only=read_only)
            for _, sub in layout(spec)]


# ---------------------------------------------------------------------- orphans


def reap(known: Callable[[], set[str]]) -> list[str]:
    """Unmount the disks of this AIVA_HOME whose sandbox is gone (a crash between mount
    and record); the image stays, as a kept disk does. ``known`` is read after listing."""
    root = disks_root()
    found = [d for d in root.iterdir() if _ID.match(d.name)] if root.is_dir() else []
    mounted = [d.name for d in found if os.path.ismount(d / "mnt")]
    if not mounted:
        return []
    ids = known()
    gone = []
    for sid in mounted:
        if sid not in ids:
            try:
                unmount(sid)
            except BackendError:
                continue
            gone.append(sid)
    return gone
