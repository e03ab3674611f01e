"""Writing what a sandbox sends onto the host without letting it choose where.

Names and bytes that come out of a sandbox are hostile: a path may climb out with ``..``
or be absolute, a mode may carry setuid bits, a size may lie, and anything already on the
host side of the destination (a link planted by an earlier run, or swapped in while we
work) must never be followed. So the destination root is opened once as a directory
descriptor, and every name below it is reached with ``*at`` calls and ``O_NOFOLLOW``
(one component at a time; a component that is a link or not a directory is refused):
no path string is ever resolved twice, so there is nothing to race (no check-then-use).

Files are written to a fresh temp file beside the target (``O_CREAT|O_EXCL|O_NOFOLLOW``),
capped at the declared size, given a mode masked to ``0o777 & ~umask`` (never setuid,
setgid or sticky), then renamed over the target. ``rename`` replaces a directory entry and
never writes into what the old entry pointed at, so a hard link or a link swapped in at
the last moment is replaced, not written through. A target that is anything but a
regular file (a directory, a symlink, a FIFO, a device, a socket) is refused with an
error: those are the user's, or planted, and aiva neither follows nor removes them.

The root itself is the caller's (a path the user named), so links in *its* path are
followed once, when it is opened; nothing below it is. Directory descriptors are kept
(a few dozen) between files: a directory renamed away and replaced by a link meanwhile
keeps receiving files where it now is, which is no more than a swap during one write
allows; the link is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiva.errors import HostFileError, ProtocolError

#: Bounds on a relative path from a sandbox: bytes in all, bytes per name, names deep.
MAX_PATH = 4096
MAX_NAME = 255
MAX_DEPTH = 256
#: Directory descriptors a DestDir keeps open between files.
DIR_CACHE = 32
#: Temp files beside a target while it is written (short: any target name fits beside it).
TEMP_PREFIX = ".aiva-"
_MAX_NS = (1 << 63) - 1
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def check_relpath(rel: object, *, what: str = "path") -> str:
    """``rel`` if it is a plain relative POSIX path, else a ProtocolError naming it.

    Plain: a non-empty str of at most MAX_PATH UTF-8 bytes and MAX_DEPTH names, no NUL,
    no leading '/', and no empty, '.' or '..' name (so no '//' and no trailing '/').
    """
    if not isinstance(rel, str):
        raise ProtocolError(f"bad {what} from the sandbox: {rel!r} is not a string")
    try:  # surrogateescape: a name of raw non-UTF-8 bytes is a valid POSIX name
        size = len(rel.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise ProtocolError(f"bad {what} from the sandbox: {rel!r} is not valid UTF-8") \
            from None
    if size > MAX_PATH:
        raise ProtocolError(f"bad {what} from the sandbox: {rel[:80]!r}... is longer than "
                            f"{MAX_PATH} bytes")
    if "\0" in rel:
        raise ProtocolError(f"bad {what} from the sandbox: {rel!r} holds a NUL byte")
    if rel.startswith("/"):
        raise ProtocolError(f"bad {what} from the sandbox: {rel!r} is absolute")
    names = rel.split("/")
    if len(names) > MAX_DEPTH:
        raise ProtocolError(f"bad {what} from the sandbox: {rel[:80]!r}... is more than "
                            f"{MAX_DEPTH} directories deep")
    for name in names:
        if name in ("", ".", ".."):
            part = f"a {name!r}" if name else "an empty"
            raise ProtocolError(f"bad {what} from the sandbox: {rel!r} has {part} component")
        if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise ProtocolError(f"bad {what} from the sandbox: a name in {rel[:80]!r} is "
                                f"longer than {MAX_NAME} bytes")
    return rel


def check_name(name: object, *, what: str = "file name") -> str:
    """A single path component (no '/'), checked like :func:`check_relpath`."""
    rel = check_relpath(name, what=what)
    if "/" in rel:
        raise ProtocolError(f"bad {what}: {rel!r} is not a single name")
    return rel


def umask() -> int:
    """The process umask, read without changing it (``os.umask`` is process-wide, so
    setting it to read it would race with every other thread creating files)."""
    with contextlib.suppress(OSError, ValueError), \
            open("/proc/self/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8) & 0o777
    old = os.umask(0o077)  # no /proc: the short window is the lesser evil
    os.umask(old)
    return old


def safe_mode(mode: int, mask: int | None = None) -> int:
    """Permission bits only (no setuid, setgid, sticky), less the umask."""
    return mode & 0o777 & ~(umask() if mask is None else mask)


@dataclass(frozen=True)
class FileMeta:
    """What an agent declared about a file it is about to send, checked."""

    size: int
    mode: int
    mtime_ns: int


def file_meta(meta: object, *, path: str) -> FileMeta:
    """Validate an ``fs.read`` header (non-negative ints in range) into a FileMeta."""
    if not isinstance(meta, dict):
        raise ProtocolError(f"the agent sent a bad header for {path}: not an object")
    values = []
    for key, limit in (("size", _MAX_NS), ("mode", 0o177777), ("mtime_ns", _MAX_NS)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
            raise ProtocolError(f"the agent sent a bad {key} for {path}: {value!r}")
        values.append(value)
    return FileMeta(*values)


@dataclass(frozen=True)
class Written:
    """A file :meth:`DestDir.write_file` put in place."""

    size: int
    sha256: str
    mtime_ns: int  # as the host filesystem stored it


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def close_stream(chunks: object) -> None:
    """Stop a stream we no longer want (closing the agent iterator cancels its channel)."""
    close = getattr(chunks, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


class DestDir:
    """A destination root held open as a directory descriptor; all work is relative to it.

    Use as a context manager, or call :meth:`close`. Relative paths given to it are
    checked with :func:`check_relpath` (a bad one is a ProtocolError).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.mask = umask()
        # directories opened so far, rel -> fd: a sync writes many files per directory
        self._dirs: OrderedDict[str, int] = OrderedDict()
        try:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise HostFileError(f"cannot open directory {self.root}: {exc.strerror}",
                                hint="check that it exists and is a directory") from exc

    def close(self) -> None:
        self._forget("")
        if self.fd >= 0:
            _close_quietly(self.fd)
            self.fd = -1

    def __enter__(self) -> DestDir:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ directories

    def _refuse(self, rel: str, why: str) -> HostFileError:
        return HostFileError(
            f"refusing to write {self.root / rel}: {why}",
            hint="aiva never writes through a link or over a non-file; move it away, or "
                 "exclude the path")

    def _open_child_dir(self, parent: int, name: str, rel: str, create: bool) -> int | None:
        """One component below ``parent``: opened without following a link, else made."""
        for _ in range(3):  # made or removed by someone else in between: look again
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    return None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise self._refuse(rel, f"{rel} is {_kind_at(parent, name)}, not a "
                                            "directory") from exc
                raise
            try:
                os.mkdir(name, 0o777, dir_fd=parent)  # the umask applies
            except FileExistsError:
                continue
        raise self._refuse(rel, f"{rel} keeps changing under us")

    def _dir(self, rel_dir: str, create: bool) -> int | None:
        """A borrowed descriptor for ``rel_dir`` (valid until the next call): from the
        cache, else opened one component at a time from the nearest cached ancestor."""
        if not rel_dir:
            return self.fd
        fd = self._dirs.get(rel_dir)
        if fd is not None:
            self._dirs.move_to_end(rel_dir)
            return fd
        names = check_relpath(rel_dir).split("/")
        start, fd = 0, self.fd
        for i in range(len(names) - 1, 0, -1):
            cached = self._dirs.get("/".join(names[:i]))
            if cached is not None:
                start, fd = i, cached
                break
        owned = -1
        try:
            for i in range(start, len(names)):
                child = self._open_child_dir(fd, names[i], "/".join(names[:i + 1]), create)
                if owned >= 0:
                    os.close(owned)
                    owned = -1
                if child is None:
                    return None
                fd = owned = child
        except BaseException:
            if owned >= 0:
                _close_quietly(owned)
            raise
        self._dirs[rel_dir] = fd
        while len(self._dirs) > DIR_CACHE:
            _close_quietly(self._dirs.popitem(last=False)[1])
        return fd

    def _forget(self, rel_dir: str) -> None:
        """Drop cached descriptors of ``rel_dir`` and below ('' is everything)."""
        for key in [k for k in self._dirs
                    if not rel_dir or k == rel_dir or k.startswith(rel_dir + "/")]:
            _close_quietly(self._dirs.pop(key))

    def open_dir(self, rel_dir: str, *, create: bool = False) -> int | None:
        """A new descriptor for ``rel_dir`` ('' is the root), each component opened with
        O_NOFOLLOW, missing ones made when ``create``; None when one is missing."""
        fd = self._dir(rel_dir, create)
        return None if fd is None else os.dup(fd)

    def _split(self, rel: str) -> tuple[str, str]:
        parent, _, name = check_relpath(rel).rpartition("/")
        return parent, name

    def free_bytes(self) -> int:
        """Space an unprivileged writer could still use on the root's filesystem."""
        st = os.fstatvfs(self.fd)
        return st.f_bavail * st.f_frsize

    def check_space(self, needed: int, *, what: str = "") -> None:
        """Refuse up front what cannot fit, so a huge (or sparse) file never fills the disk."""
        free = self.free_bytes()
        if needed > free:
            raise HostFileError(
                f"not enough space in {self.root} for {what or 'the files'}: "
                f"{_human(needed)} needed, {_human(free)} free",
                hint="free some space, or copy less (a path inside the sandbox, --exclude)")

    # ------------------------------------------------------------------ files

    def write_file(self, rel: str, chunks: Iterable[bytes], *, size: int, mode: int,
                   mtime_ns: int | None = None,
                   on_chunk: Callable[[int], Any] | None = None) -> Written:
        """Put exactly ``size`` bytes from ``chunks`` at ``rel`` (parents made as needed).

        More or fewer bytes than ``size`` is a ProtocolError and leaves nothing behind;
        the target is replaced only if it is a regular file (or absent).
        """
        parent_rel, name = self._split(rel)
        pfd = self._dir(parent_rel, True)
        assert pfd is not None
        return self._write_in(pfd, rel, name, chunks, size, mode, mtime_ns, on_chunk)

    def _write_in(self, pfd: int, rel: str, name: str, chunks: Iterable[bytes], size: int,
                  mode: int, mtime_ns: int | None,
                  on_chunk: Callable[[int], Any] | None) -> Written:
        self._check_target(pfd, rel, name)
        tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, _TEMP_FLAGS, 0o600, dir_fd=pfd)
        h, n = hashlib.sha256(), 0
        try:
            try:
                for chunk in chunks:
                    if n + len(chunk) > size:
                        raise ProtocolError(
                            f"the sandbox sent more than the {size} bytes it declared for {rel}",
                            hint="the file may have grown while it was read; try again")
                    _write_all(fd, chunk)
                    h.update(chunk)
                    n += len(chunk)
                    if on_chunk is not None:
                        on_chunk(len(chunk))
            finally:
                close_stream(chunks)
            if n != size:
                raise ProtocolError(
                    f"the sandbox sent {n} of the {size} bytes it declared for {rel}",
                    hint="the file may have shrunk while it was read; try again")
            os.fchmod(fd, safe_mode(mode, self.mask))
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            stored = os.fstat(fd).st_mtime_ns
            os.close(fd)
            fd = -1
            self._check_target(pfd, rel, name)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            if fd >= 0:
                _close_quietly(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise
        return Written(n, h.hexdigest(), stored)

    def _check_target(self, pfd: int, rel: str, name: str) -> None:
        """Refuse to replace anything but a regular file. The rename that follows never
        follows a link either way; this keeps the user's links, dirs and nodes intact."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise self._refuse(rel, f"{rel} is {_kind(st.st_mode)}")

    def open_file(self, rel: str) -> int | None:
        """A read descriptor for the regular file ``rel``, or None when it is missing or
        is not a regular file (a link is never followed, a FIFO never blocks)."""
        parent_rel, name = self._split(rel)
        try:
            pfd = self._dir(parent_rel, False)
        except HostFileError:
            return None
        if pfd is None:
            return None
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                return None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd

    def remove_file(self, rel: str) -> bool:
        """Unlink the regular file ``rel`` (never a link's target, never a directory), then
        the directories that leaves empty; False when there was no such file."""
        parent_rel, name = self._split(rel)
        try:
            pfd = self._dir(parent_rel, False)
        except HostFileError:
            return False
        if pfd is None:
            return False
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False  # not what the scan saw: someone else's, leave it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=pfd)  # unlink removes an entry, never follows
        self._prune(parent_rel)
        return True

    def _prune(self, rel_dir: str) -> None:
        """Remove ``rel_dir`` and its parents while they are empty (never the root)."""
        while rel_dir:
            parent, _, name = rel_dir.rpartition("/")
            try:
                pfd = self._dir(parent, False)
            except HostFileError:
                return
            if pfd is None:
                return
            try:
                os.rmdir(name, dir_fd=pfd)  # rmdir of a link fails (ENOTDIR): not followed
            except OSError:
                return
            self._forget(rel_dir)
            rel_dir = parent

    def walk_files(self, skip_dir: Callable[[str], bool], skip_file: Callable[[str], bool]
                   ) -> dict[str, os.stat_result]:
        """Regular files below the root: rel -> lstat. Links, FIFOs, devices and sockets
        are skipped, and no directory is entered through a link. An unreadable
        directory is an OSError (a skip would look like deletions)."""
        files: dict[str, os.stat_result] = {}
        self._walk(os.dup(self.fd), "", 0, skip_dir, skip_file, files)
        return files

    def _walk(self, fd: int, prefix: str, depth: int, skip_dir: Callable[[str], bool],
              skip_file: Callable[[str], bool], files: dict[str, os.stat_result]) -> None:
        try:
            if depth > MAX_DEPTH:
                raise HostFileError(f"{self.root / prefix} is more than {MAX_DEPTH} "
                                    "directories deep")
            subdirs: list[str] = []
            with os.scandir(fd) as it:
                for entry in it:  # the types come from the listing: no stat per entry
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if not skip_dir(rel):
                            subdirs.append(entry.name)
                    elif entry.is_file(follow_symlinks=False) and not skip_file(rel):
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):  # not swapped since the listing
                            files[rel] = st
            for name in subdirs:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        continue  # gone or swapped for a link since the listing
                    raise OSError(exc.errno, exc.strerror, str(self.root / prefix / name)
                                  ) from exc
                self._walk(child, f"{prefix}{name}/", depth + 1, skip_dir, skip_file, files)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _kind_at(dir_fd: int, name: str) -> str:
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return "something else"


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "not a regular file"  # pragma: no cover - every Linux type is listed


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def read_chunks(fd: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of an open descriptor, in chunks (the descriptor is left open)."""
    while True:
        data = os.read(fd, chunk)
        if not data:
            return
        yield data
