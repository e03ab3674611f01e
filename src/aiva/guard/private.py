"""AIVA_HOME is private: the directory 0700, every directory in it 0700, every file 0600.

Why: the state db holds every sandbox's ``-e KEY=VALUE`` (API keys, tokens), the logs hold
what commands printed, ``daemon.token`` opens the daemon. None of it is for other local
users, whatever their umask or ours.

Two layers, neither touching the process umask (which would also mask files aiva writes
for the user elsewhere, e.g. ``aiva cp`` destinations):

- aiva's own writers create with an explicit mode: :func:`private_dir`,
  :func:`open_private`, :func:`write_private`.
- the home carries a default POSIX ACL (owner rwx, group and others nothing), which the
  kernel applies to everything created below it instead of the umask: files are born
  0600 and directories 0700 even when a library makes them (SQLite's ``-wal``/``-shm``,
  lock files, a logging handler). Where the filesystem has no ACLs, the first layer and
  the 0700 home remain.

Not private, on purpose: ``agent/`` (the agent bundle containers mount read-only; public
code, readable by any user of a guest) and ``cache/`` (images, kernels, VM system images:
public artifacts, which a jailed VMM with a uid of its own reads through hard links).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import struct
import threading
from pathlib import Path

from aiva.paths import aiva_home

log = logging.getLogger("aiva")

DIR_MODE = 0o700
FILE_MODE = 0o600
#: Directories under the home that stay readable (see the module's docstring).
PUBLIC = ("agent", "cache")

_ACL_XATTR = "system.posix_acl_default"
_ACL_UNDEFINED_ID = 0xFFFFFFFF
#: ``user::rwx group::--- other::---`` in the kernel's xattr form (version 2, entries of
#: tag, perm, id): a minimal ACL, so it means exactly mode bits 0700 (files: 0600).
_PRIVATE_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, _ACL_UNDEFINED_ID)
    for tag, perm in ((0x01, 0o7), (0x04, 0), (0x20, 0)))

_ready: set[str] = set()
_ready_lock = threading.Lock()


def ensure_home() -> Path:
    """Make AIVA_HOME (0700, with the private default ACL), or tighten an existing one
    that others can enter, once, with a note; cheap after the first call per home."""
    home = aiva_home()
    key = str(home)
    if key in _ready:
        return home
    with _ready_lock:
        if key in _ready:
            return home
        note = _make_home(home)
        _ready.add(key)
    if note:  # after: the log handler writes aiva.log, in this home
        log.warning("%s", note)
    return home


def _make_home(home: Path) -> str | None:
    """Returns the note to give when an open home was tightened."""
    try:
        st: os.stat_result | None = home.stat()
    except FileNotFoundError:
        st = None
        _mkdirs(home)
    note = None
    if st is not None and stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        os.chmod(home, DIR_MODE)
        tightened = _tighten(home)
        # said where aiva's data (the state db's secrets ...) was exposed; a home made by
        # hand, empty or with just a config.yaml, exposed nothing worth a warning
        if {p.name for p in home.iterdir()} - {"config.yaml"}:
            note = (f"{home} was open to other users (mode {stat.S_IMODE(st.st_mode):o}): "
                    f"made it 0700 and {tightened} files and directories in it private")
    if _has_default_acl(home) or not _set_default_acl(home):
        return note
    for name in PUBLIC:  # readable on purpose: not under the ACL, whenever made
        public = home / name
        with contextlib.suppress(FileExistsError):
            public.mkdir()
            os.chmod(public, 0o755)
        _drop_default_acl(public)
    return note


def _tighten(home: Path) -> int:
    """Drop group and other bits below the home, once, for a home made by an older aiva.
    Never follows a link; skips the public parts and what is below ``run/`` (sandboxes
    write there)."""
    count = 0
    for top in sorted(home.iterdir()):
        if top.name in PUBLIC:
            continue
        count += _chmod_private(top)
        if top.name == "run" or top.is_symlink() or not top.is_dir():
            continue
        for dirpath, dirnames, filenames, dfd in os.fwalk(top):
            for name in dirnames + filenames:
                count += _chmod_private(Path(dirpath) / name, dfd=dfd, name=name)
    return count


def _chmod_private(path: Path, *, dfd: int | None = None, name: str | None = None) -> int:
    try:
        st = os.stat(name or path, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
            return 0
        mode = stat.S_IMODE(st.st_mode)
        if not mode & 0o077:
            return 0
        os.chmod(name or path, mode & 0o700, dir_fd=dfd)
        return 1
    except OSError:
        return 0


def _set_default_acl(path: Path) -> bool:
    """False where the filesystem has no ACLs (tmpfs without them, NFS, macOS): there the
    explicit modes and the 0700 home are what keeps others out."""
    try:
        os.setxattr(path, _ACL_XATTR, _PRIVATE_ACL, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES):
            return False
        raise
    return True


def _has_default_acl(path: Path) -> bool:
    try:
        return os.getxattr(path, _ACL_XATTR, follow_symlinks=False) == _PRIVATE_ACL
    except OSError:
        return False


def _drop_default_acl(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.removexattr(path, _ACL_XATTR, follow_symlinks=False)


def _mkdirs(path: Path) -> None:
    """``mkdir -p`` with 0700 for every directory it makes (``parents=True`` would make
    the intermediate ones with the umask's mode)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)


def private_dir(path: Path) -> Path:
    """``path`` and its missing parents, each made 0700 (AIVA_HOME first, if under it)."""
    _home_first(path)
    _mkdirs(path)
    return path


def _home_first(path: Path) -> None:
    home = aiva_home()
    if path == home or home in path.parents:
        ensure_home()


def open_private(path: Path, flags: int) -> int:
    """``os.open`` for a file under AIVA_HOME: born 0600, never through a link at the
    last component; an older file open to others is tightened. Makes the parents."""
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    _home_first(path)
    try:
        fd = os.open(path, flags, FILE_MODE)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        private_dir(path.parent)
        fd = os.open(path, flags, FILE_MODE)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_file(path: Path) -> None:
    """Make sure ``path`` exists as a 0600 file without opening one that exists: closing
    any descriptor of a database file drops every POSIX lock this process holds on it
    (SQLite's, through its other connections). An older file open to others is chmodded."""
    try:
        os.close(open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 \
            and st.st_uid == os.geteuid():
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)


def write_private(path: Path, data: str | bytes) -> None:
    """Replace ``path`` atomically with ``data`` in a new 0600 file."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
