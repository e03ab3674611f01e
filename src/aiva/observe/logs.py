"""Per-sandbox command logs, and reading JSON-lines logs safely.

Command output: one JSON line per chunk in ``AIVA_HOME/logs/<id>/commands.jsonl``
(0600), flushed as it comes, so ``aiva logs -f`` in another process sees output while a
command still runs; merged with the engine's own log by time when shown. Each command
keeps at most ``limits.command_log`` bytes of output there; past that one ``cut`` line
says how much was dropped.

Reading: some logs lie where a sandbox writes (the guest's ``syslog.jsonl`` in its run
dir), so every log is opened the same careful way: ``O_NOFOLLOW`` (a planted link is not
followed), ``O_NONBLOCK`` (a FIFO cannot hang us), checked with ``fstat`` to be a
regular file, and read up to ``limits.log_read`` bytes (the newest ones). Anything else
in its place is skipped with a warning. Nothing here creates or touches a file it reads.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from aiva import paths
from aiva.backends.base import LogLine
from aiva.config import format_size, load_config, parse_size
from aiva.guard.private import open_private

log = logging.getLogger("aiva.logs")

_seq = itertools.count(1)
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
MAX_LINE = 1 << 20  # a longer line (no newline in sight) is dropped, not kept growing
_CHUNK = 1 << 20


def command_log_cap() -> int:
    return parse_size(load_config().limits.command_log)


def log_read_cap() -> int:
    return parse_size(load_config().limits.log_read)


class CommandLog:
    """Appends the output of one sandbox's commands; safe to share between threads.

    Output beyond ``cap`` bytes per command (stdout and stderr together) is dropped; when
    the command ends (its ``exit`` line) or the log is closed, one ``cut`` line says how
    many bytes were."""

    def __init__(self, sandbox_id: str, *, cap: int | None = None) -> None:
        self.path = paths.command_log(sandbox_id)
        self.cap = command_log_cap() if cap is None else cap
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._kept: dict[str, int] = {}  # bytes of output logged per command
        self._cut: dict[str, int] = {}  # bytes dropped per command

    def new_command(self) -> str:
        return f"{os.getpid()}-{next(_seq)}"

    def write(self, cmd: str, source: str, text: str) -> None:
        with self._lock:
            if source in ("stdout", "stderr"):
                text = self._within_cap(cmd, text)
                if not text:
                    return
            elif source == "exit":
                self._kept.pop(cmd, None)
                self._write_cut(cmd)
            self._append(cmd, source, text)

    def _within_cap(self, cmd: str, text: str) -> str:
        """What of ``text`` still fits under the command's cap; counts the rest as cut."""
        kept = self._kept.get(cmd, 0)
        size = len(text.encode("utf-8", "surrogateescape"))
        room = max(0, self.cap - kept)
        if size <= room:
            self._kept[cmd] = kept + size
            return text
        self._kept[cmd] = kept + room
        self._cut[cmd] = self._cut.get(cmd, 0) + size - room
        return text.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")

    def _write_cut(self, cmd: str) -> None:
        cut = self._cut.pop(cmd, 0)
        if cut:
            self._append(cmd, "cut", f"aiva: {cut} bytes ({format_size(cut)}) of this "
                         f"command's output were not logged: limits.command_log is "
                         f"{format_size(self.cap)}", n=cut)

    def _append(self, cmd: str, source: str, text: str, **extra: int) -> None:
        line = json.dumps({"t": time.time(), "c": cmd, "s": source, "d": text, **extra})
        if self._file is None:
            fd = open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        with self._lock:
            for cmd in list(self._cut):  # commands that never ended (background ones)
                self._write_cut(cmd)
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------------- reading


def open_regular(path: Path, *, quiet: bool = False) -> tuple[int, os.stat_result] | None:
    """A read-only descriptor of ``path`` if it is a regular file (not through a link,
    never blocking on a FIFO), with its ``fstat``; None if missing or anything else (a
    warning says what was skipped, unless ``quiet``)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not quiet:
            why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            log.warning("not reading %s: %s", path, why)
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if not quiet:
            log.warning("not reading %s: not a regular file (%s)", path, _kind(st.st_mode))
        return None
    return fd, st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return f"mode {mode:o}"


def read_tail_bytes(path: Path, cap: int | None = None) -> bytes | None:
    """The last ``cap`` bytes (``limits.log_read``) of a regular file, starting at a line
    boundary when cut; None when there is no such file."""
    opened = open_regular(path)
    if opened is None:
        return None
    fd, st = opened
    cap = log_read_cap() if cap is None else cap
    try:
        start = max(0, st.st_size - cap)
        if start:
            log.warning("%s holds %s: reading only its last %s (limits.log_read)", path,
                        format_size(st.st_size), format_size(cap))
        parts: list[bytes] = []
        got = 0
        while got < cap:
            chunk = os.pread(fd, min(_CHUNK, cap - got), start + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(parts)
    if start:
        data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
    return data


def _parse(line: str, source: str | None = None) -> LogLine | None:
    """One log record; anything malformed (wrong types, a time out of range) is None."""
    try:
        rec = json.loads(line)
        t, text = rec["t"], rec["d"]
        src = source or rec["s"]
        if isinstance(t, bool) or not isinstance(t, int | float) \
                or not isinstance(text, str) or not isinstance(src, str):
            return None
        return LogLine(datetime.fromtimestamp(t, UTC), src, text)
    except (ValueError, KeyError, TypeError, OverflowError, OSError):
        return None


def read_jsonl(path: Path, *, tail: int | None = None, source: str | None = None,
               cap: int | None = None) -> list[LogLine]:
    """Lines of a JSON-lines log ({"t", "s", "d"}); ``source`` overrides each line's own.
    ``tail=0`` is none of them (a follow that starts now), ``None`` all of them. Reads
    at most ``cap`` bytes (default ``limits.log_read``), the newest."""
    if tail == 0:
        return []
    data = read_tail_bytes(path, cap)
    if not data:
        return []
    lines: Iterable[str] = data.decode("utf-8", "replace").splitlines()
    if tail is not None:
        lines = deque(lines, maxlen=tail)
    return [rec for rec in (_parse(line, source) for line in lines) if rec is not None]


def follow_jsonl(path: Path, *, source: str | None = None, poll: float = 0.1
                 ) -> Iterator[LogLine]:
    """New lines as they are appended (``tail -F``), forever; the caller stops iterating.

    Never creates the file. A file there now is followed from its end; one that appears
    later, or replaces it (the agent's rotation to ``.1``, a truncation), from its start,
    after the rest of the old one. A link, FIFO or anything not a regular file in its
    place is skipped with one warning, and watched until a regular file is back."""
    reader = _Follower(path, source)
    try:
        while True:
            got = reader.poll()
            yield from got
            if not got:
                time.sleep(poll)
    finally:
        reader.close()


class _Follower:
    def __init__(self, path: Path, source: str | None) -> None:
        self.path, self.source = path, source
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.pos = 0
        self.partial = b""
        self.skipping = False  # inside an overlong line: drop until its newline
        self.warned: str | None = None  # the trouble last warned about
        self.first = True
        self._open()

    def _open(self) -> None:
        opened = open_regular(self.path, quiet=True)
        if opened is None:
            self._note_trouble()
            self.first = False
            return
        self.fd, st = opened
        self.ident = (st.st_dev, st.st_ino)
        self.pos = st.st_size if self.first else 0  # a file there at the start: from now
        self.first = False
        self.partial, self.skipping, self.warned = b"", False, None

    def _note_trouble(self) -> None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return  # missing: wait quietly
        why = "a symbolic link" if stat.S_ISLNK(st.st_mode) else \
            f"not a regular file ({_kind(st.st_mode)})"
        if why != self.warned:
            log.warning("not following %s: %s", self.path, why)
            self.warned = why

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.ident = None, None

    def poll(self) -> list[LogLine]:
        if self.fd is None:
            self._open()
            if self.fd is None:
                return []
        out = self._read()
        if out:
            return out
        # nothing new: is the path still this file?
        try:
            st = os.stat(self.path, follow_symlinks=False)
            same = (st.st_dev, st.st_ino) == self.ident and stat.S_ISREG(st.st_mode)
        except OSError:
            same = False
        if not same:  # rotated, replaced or gone: the rest of the old one, then the new
            out = self._read()
            self.close()
            return out
        if st.st_size < self.pos:  # truncated in place
            self.pos, self.partial, self.skipping = 0, b"", False
        return []

    def _read(self) -> list[LogLine]:
        assert self.fd is not None
        try:
            data = os.pread(self.fd, _CHUNK, self.pos)
        except OSError:
            return []
        self.pos += len(data)
        out: list[LogLine] = []
        *lines, rest = (self.partial + data).split(b"\n")
        for raw in lines:
            if self.skipping:
                self.skipping = False
                continue
            rec = _parse(raw.decode("utf-8", "replace"), self.source)
            if rec is not None:
                out.append(rec)
        if len(rest) > MAX_LINE:
            rest, self.skipping = b"", True
        self.partial = rest
        return out


def read_command_log(sandbox_id: str, *, tail: int | None = None) -> list[LogLine]:
    return read_jsonl(log_path(sandbox_id), tail=tail)


def follow_command_log(sandbox_id: str) -> Iterator[LogLine]:
    return follow_jsonl(log_path(sandbox_id))


def merge(*sources: Iterable[LogLine], tail: int | None = None) -> list[LogLine]:
    merged = list(heapq.merge(*(sorted(s, key=_key) for s in sources), key=_key))
    return merged[-tail:] if tail else merged


def _key(line: LogLine) -> datetime:
    return line.ts


def log_path(sandbox_id: str) -> Path:
    return paths.command_log(sandbox_id)
