"""Checks for every JSON answer of the in-sandbox agent, before the host uses it.

The agent runs inside the sandbox, beside the code it contains, so anything it says may be
a lie: a path with ``..``, a mode with setuid, a string where a number belongs. Each check
here returns clean, typed values or raises :class:`ProtocolError` naming what was wrong;
callers never see a KeyError, TypeError or ValueError from a reply.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from aiva.errors import ProtocolError

MAX_PID = (1 << 31) - 1
MAX_INT = (1 << 63) - 1
MAX_MODE = 0o7777
MAX_PATH = 4096  # bytes of one relative path (PATH_MAX)
MAX_NAME = 255  # bytes of one path component (NAME_MAX)
MAX_ERROR_TEXT = 4096  # characters of an agent's error message kept
ENTRY_TYPES = frozenset({"dir", "file", "symlink", "other"})


def fail(what: str, why: str) -> ProtocolError:
    return ProtocolError(f"the sandbox agent sent a bad {what}: {why}",
                         hint="the agent may have been replaced by code in the sandbox; "
                              "restart the sandbox, or recreate it if this persists")


def json_object(payload: bytes, what: str) -> dict[str, Any]:
    """A control payload as a JSON object."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise fail(what, "not valid JSON") from None
    if not isinstance(obj, dict):
        raise fail(what, f"a JSON {type(obj).__name__}, not an object")
    return obj


def integer(obj: dict[str, Any], key: str, what: str, *, lo: int = 0, hi: int = MAX_INT
            ) -> int:
    value = obj.get(key)
    if type(value) is not int:  # bool is an int subclass: refused too
        raise fail(what, f"{key!r} must be an integer, not {_show(value)}")
    if not lo <= value <= hi:
        raise fail(what, f"{key!r} = {value} is outside {lo}..{hi}")
    return value


def number(obj: dict[str, Any], key: str, what: str, *, lo: float = 0.0) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise fail(what, f"{key!r} must be a number, not {_show(value)}")
    out = float(value)
    if not math.isfinite(out) or out < lo:
        raise fail(what, f"{key!r} = {value} is not a finite number >= {lo}")
    return out


def boolean(obj: dict[str, Any], key: str, what: str) -> bool:
    value = obj.get(key)
    if type(value) is not bool:
        raise fail(what, f"{key!r} must be true or false, not {_show(value)}")
    return value


def text(obj: dict[str, Any], key: str, what: str, *, limit: int | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise fail(what, f"{key!r} must be a string, not {_show(value)}")
    return value if limit is None else value[:limit]


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


# --------------------------------------------------------------------------- exec


def started(obj: dict[str, Any]) -> int:
    """The pid in exec's first EVENT."""
    return integer(obj, "started", "exec start", lo=1, hi=MAX_PID)


def exec_result(obj: dict[str, Any], what: str = "exec result") -> dict[str, Any]:
    """exit_code, duration, timed_out, pid of a RESULT (exec or proc.wait)."""
    return {
        "exit_code": integer(obj, "exit_code", what, lo=-255, hi=255),
        "duration": number(obj, "duration", what),
        "timed_out": boolean(obj, "timed_out", what),
        "pid": integer(obj, "pid", what, lo=1, hi=MAX_PID),
    }


def wait_result(obj: dict[str, Any]) -> dict[str, Any]:
    """proc.wait: the exec result plus the output the agent kept."""
    out = exec_result(obj, "proc.wait result")
    out["stdout"] = text(obj, "stdout", "proc.wait result")
    out["stderr"] = text(obj, "stderr", "proc.wait result")
    return out


def processes(obj: dict[str, Any], max_entries: int) -> list[dict[str, Any]]:
    """proc.list: pid and exit_code (None while running) of each process the agent knows."""
    what = "process list"
    items = obj.get("procs")
    if not isinstance(items, list) or len(items) > max_entries:
        raise fail(what, f"'procs' must be a list of at most {max_entries} processes")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise fail(what, f"an entry must be an object, not {_show(item)}")
        code = item.get("exit_code")
        out.append({
            "pid": integer(item, "pid", what, lo=1, hi=MAX_PID),
            "exit_code": None if code is None else integer(item, "exit_code", what,
                                                           lo=-255, hi=255),
            "background": bool(item.get("background")),
        })
    return out


# --------------------------------------------------------------------------- files


def file_meta(obj: dict[str, Any]) -> dict[str, int]:
    """fs.read's EVENT: what the file is before its bytes come."""
    what = "file read header"
    return {"size": integer(obj, "size", what), "mode": integer(obj, "mode", what, hi=MAX_MODE),
            "mtime_ns": integer(obj, "mtime_ns", what)}


def rel_path(rel: Any, what: str) -> str:
    """A relative POSIX path that stays below its root: no '', '.', '..' components, no
    leading '/', no NUL or backslash, no component or whole longer than the OS allows."""
    if not isinstance(rel, str):
        raise fail(what, f"a path must be a string, not {_show(rel)}")
    try:
        size = len(rel.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise fail(what, f"path {rel[:80]!r} is not encodable") from None
    if not rel or size > MAX_PATH:
        raise fail(what, f"path of {size} bytes")
    if "\0" in rel or "\\" in rel:
        raise fail(what, f"path {rel[:80]!r} holds a NUL or a backslash")
    if rel.startswith("/"):
        raise fail(what, f"path {rel[:80]!r} is absolute")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise fail(what, f"path {rel[:80]!r} has a {part or 'empty'!r} component")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise fail(what, f"path {rel[:80]!r} has a component over {MAX_NAME} bytes")
    return rel


def name(value: Any, what: str) -> str:
    """One directory entry's name: a single path component."""
    out = rel_path(value, what)
    if "/" in out:
        raise fail(what, f"entry name {out[:80]!r} holds a '/'")
    return out


class WalkCollector:
    """Gathers fs.walk batches, checking each, and bounds what one walk may hold."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.files: dict[str, list[int]] = {}
        self.dirs: list[str] = []
        self._dirset: set[str] = set()
        self._cost = 0

    def _charge(self, n: int) -> None:
        self._cost += max(1, n)  # an empty batch costs one too: no answering forever
        if self._cost > self.max_entries:
            raise ProtocolError(
                f"the sandbox's walk exceeds {self.max_entries} entries",
                hint="sync a smaller directory, or raise limits.walk_entries in config.yaml")

    def batch(self, obj: dict[str, Any]) -> None:
        what = "walk batch"
        files = obj.get("files", {})
        dirs = obj.get("dirs", [])
        if not isinstance(files, dict) or not isinstance(dirs, list):
            raise fail(what, "'files' must be an object and 'dirs' a list")
        self._charge(len(files) + len(dirs))
        for rel, info in files.items():
            rel_path(rel, what)
            if rel in self.files:
                raise fail(what, f"file {rel[:80]!r} listed twice")
            if (not isinstance(info, list) or len(info) != 3
                    or any(type(x) is not int or x < 0 or x > MAX_INT for x in info)
                    or info[2] > MAX_MODE):
                raise fail(what, f"file {rel[:80]!r}: [size, mtime_ns, mode] must be "
                                 f"non-negative integers (mode <= 0o7777), not {_show(info)}")
            self.files[rel] = list(info)
        for rel in dirs:
            rel_path(rel, what)
            if rel in self._dirset:
                raise fail(what, f"directory {rel[:80]!r} listed twice")
            self._dirset.add(rel)
            self.dirs.append(rel)

    def result(self, obj: dict[str, Any]) -> tuple[dict[str, list[int]], list[str]]:
        """The walk, once its RESULT came: no entry below a file, none both file and dir."""
        what = "walk"
        count = obj.get("count", len(self.files))
        if type(count) is not int or count != len(self.files):
            raise fail(what, f"it counted {_show(count)} files but sent {len(self.files)}")
        for rel in _chain(self.files, self.dirs):
            if rel in self.files and rel in self._dirset:
                raise fail(what, f"{rel[:80]!r} is listed as a file and a directory")
            parts = rel.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in self.files:
                    raise fail(what, f"{rel[:80]!r} lies below a file")
        return self.files, self.dirs


def _chain(*groups: Iterable[str]) -> Iterable[str]:
    for g in groups:
        yield from g


def hashes(obj: dict[str, Any], asked: list[str]) -> dict[str, str | None]:
    what = "hash answer"
    got = obj.get("hashes")
    if not isinstance(got, dict):
        raise fail(what, "'hashes' must be an object")
    wanted = set(asked)
    out: dict[str, str | None] = {}
    for rel, digest in got.items():
        if rel not in wanted:
            raise fail(what, f"a hash for {str(rel)[:80]!r}, which was not asked for")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64
                                       and all(c in "0123456789abcdef" for c in digest)):
            raise fail(what, f"the hash of {rel[:80]!r} is not a sha256 hex digest")
        out[rel] = digest
    return out


def stat_entry(obj: Any, what: str = "stat answer", *, in_list: bool = False
               ) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise fail(what, f"an entry must be an object, not {_show(obj)}")
    kind = obj.get("type")
    if kind not in ENTRY_TYPES:
        raise fail(what, f"'type' = {_show(kind)} is not one of {sorted(ENTRY_TYPES)}")
    entry_name = name(obj.get("name"), what) if in_list else text(obj, "name", what)
    return {
        "name": entry_name,
        "path": text(obj, "path", what),
        "type": kind,
        "size": integer(obj, "size", what),
        "mode": integer(obj, "mode", what, hi=MAX_MODE),
        "mtime": number(obj, "mtime", what, lo=-math.inf),
        "mtime_ns": integer(obj, "mtime_ns", what, lo=-MAX_INT),
        "uid": integer(obj, "uid", what, hi=(1 << 32) - 1),
        "gid": integer(obj, "gid", what, hi=(1 << 32) - 1),
    }


def entries(obj: dict[str, Any], max_entries: int) -> list[dict[str, Any]]:
    what = "directory listing"
    items = obj.get("entries")
    if not isinstance(items, list):
        raise fail(what, "'entries' must be a list")
    if len(items) > max_entries:
        raise fail(what, f"{len(items)} entries, more than the {max_entries} allowed")
    out = [stat_entry(e, what, in_list=True) for e in items]
    if len({e["name"] for e in out}) != len(out):
        raise fail(what, "a name listed twice")
    return out


def written(obj: dict[str, Any]) -> int:
    return integer(obj, "bytes", "write answer")


# --------------------------------------------------------------------------- system


def ping(obj: dict[str, Any]) -> dict[str, Any]:
    what = "ping answer"
    return {"version": text(obj, "version", what, limit=64),
            "pid": integer(obj, "pid", what, lo=1, hi=MAX_PID),
            "python": text(obj, "python", what, limit=64),
            "uid": integer(obj, "uid", what, hi=(1 << 32) - 1)}


def metrics(obj: dict[str, Any]) -> dict[str, Any]:
    """sys.metrics: each part is optional (a guest may lack /proc), but typed if there."""
    what = "metrics answer"
    out: dict[str, Any] = {}
    if "memory" in obj:
        mem = obj["memory"]
        if not isinstance(mem, dict):
            raise fail(what, "'memory' must be an object")
        out["memory"] = {k: integer(mem, k, what, lo=-MAX_INT) for k in mem
                         if k in ("total", "available", "used", "cache")}
    if "cpu_jiffies" in obj:
        jiffies = obj["cpu_jiffies"]
        if (not isinstance(jiffies, list) or len(jiffies) > 64
                or any(type(x) is not int or x < 0 for x in jiffies)):
            raise fail(what, "'cpu_jiffies' must be a list of non-negative integers")
        out["cpu_jiffies"] = list(jiffies)
    if "uptime" in obj:
        out["uptime"] = number(obj, "uptime", what)
    if "loadavg" in obj:
        load = obj["loadavg"]
        if (not isinstance(load, list) or len(load) > 3
                or any(type(x) not in (int, float) or not math.isfinite(x) for x in load)):
            raise fail(what, "'loadavg' must be up to three numbers")
        out["loadavg"] = [float(x) for x in load]
    if "error" in obj:
        out["error"] = text(obj, "error", what, limit=MAX_ERROR_TEXT)
    return out


def error(obj: dict[str, Any]) -> tuple[str, str]:
    """(kind, message) of an ERROR payload."""
    what = "error report"
    kind = obj.get("kind", "Error")
    message = obj.get("message", "")
    if not isinstance(kind, str) or not kind.isidentifier() or len(kind) > 100:
        raise fail(what, f"'kind' = {_show(kind)} is not an exception name")
    if not isinstance(message, str):
        raise fail(what, f"'message' must be a string, not {_show(message)}")
    # shown to a person: no escape sequences that could dress up or hide a terminal line
    message = "".join(c if c.isprintable() or c in "\n\t" else "?"
                      for c in message[:MAX_ERROR_TEXT])
    return kind, message
