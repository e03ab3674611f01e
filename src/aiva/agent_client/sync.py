"""Incremental sync between a local directory and a directory inside a sandbox.

Only changed files cross: size + mtime decide first, sha256 (hashed on each side, the
remote half in one batched agent request) breaks ties, so a touched-but-equal file costs
a hash, not a transfer. Two-way sync compares each side with the state of the last sync
(a JSON file), which is what tells "changed here" from "changed there" and a deletion
from a new file. Nothing is ever deleted unless ``delete=True``.

The sandbox is not trusted: every name from its walk is checked before use, and all local
reads and writes go through :class:`aiva.guard.files.DestDir` (relative to the local root's
descriptor, never through a link, sizes capped at what the agent declared, modes masked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pathspec

from aiva.agent_client import AgentClient
from aiva.errors import AivaError, InvalidValue, ProtocolError, SandboxFileNotFound, SyncError
from aiva.guard.files import (
    DestDir,
    Written,
    check_name,
    check_relpath,
    close_stream,
    file_meta,
    read_chunks,
)

Direction = Literal["both", "push", "pull"]
Prefer = Literal["local", "remote", "newer"]
Progress = Callable[[str, int, int], None]
State = dict[str, dict[str, Any]]
CHUNK = 1 << 20
HASH_BATCH = 5000  # paths per fs.hash request: keeps the request frame small
STATE_VERSION = 1
GITIGNORE_MAX = 4 << 20
_ENTRY_INTS = ("size", "local_mtime_ns", "remote_mtime_ns")


class Stat(NamedTuple):
    size: int
    mtime_ns: int
    mode: int


@dataclass
class SyncReport:
    """What a sync did (or, with ``dry_run``, would do); paths are relative to the roots."""

    pushed: list[str] = field(default_factory=list)
    pulled: list[str] = field(default_factory=list)
    deleted_local: list[str] = field(default_factory=list)
    deleted_remote: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    unchanged: int = 0
    duration: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        text = (f"pushed {len(self.pushed)} ({_human(self.bytes_sent)}), "
                f"pulled {len(self.pulled)} ({_human(self.bytes_received)}), "
                f"deleted {len(self.deleted_local)} local / {len(self.deleted_remote)} remote, "
                f"{len(self.conflicts)} conflicts, {self.unchanged} unchanged "
                f"in {self.duration:.2f}s")
        return ("dry run: " + text) if self.dry_run else text

    def crossings(self, limit: int = 5) -> list[str]:
        """What crossed, one line per direction: ``to the sandbox: a.py, b.py (+3 more)``."""
        lines = []
        for label, names in (("to the sandbox", self.pushed), ("to this machine", self.pulled),
                             ("deleted here", self.deleted_local),
                             ("deleted in the sandbox", self.deleted_remote)):
            if names:
                more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
                lines.append(f"{label}: {', '.join(names[:limit])}{more}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class _Filter:
    """Gitignore-style excludes; a file under an excluded directory is excluded too."""

    def __init__(self, patterns: Iterable[str], skip: set[str]) -> None:
        self.spec = pathspec.GitIgnoreSpec.from_lines(list(patterns))
        self.skip = skip
        self._dirs: dict[str, bool] = {}

    def dir_excluded(self, rel: str) -> bool:
        if rel not in self._dirs:
            parent = posixpath.dirname(rel)
            self._dirs[rel] = (bool(parent) and self.dir_excluded(parent)) or \
                self.spec.match_file(rel + "/")
        return self._dirs[rel]

    def excluded(self, rel: str) -> bool:
        parent = posixpath.dirname(rel)
        return rel in self.skip or (bool(parent) and self.dir_excluded(parent)) or \
            self.spec.match_file(rel)


#: Build litter no project wants carried either way: excluded unless ``litter=True`` (or a
#: ``!pattern`` in .gitignore or the excludes brings a name back).
LITTER = ("__pycache__/", "*.py[cod]", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
          ".hypothesis/", ".tox/", ".nox/", ".coverage", ".coverage.*", "*.egg-info/",
          ".ipynb_checkpoints/", ".DS_Store")


def _make_filter(root: Path, dest: DestDir | None, exclude: Iterable[str],
                 state_file: Path | None, *, litter: bool = False) -> _Filter:
    lines = [] if litter else list(LITTER)  # first: the project's own rules may undo them
    lines += _read_gitignore(dest) if dest is not None else []
    lines += exclude  # last, so a "!pattern" in .gitignore cannot undo an explicit exclude
    skip: set[str] = set()
    if state_file is not None:
        with contextlib.suppress(ValueError):  # ValueError: it lives outside the tree
            skip.add(state_file.resolve().relative_to(root.resolve()).as_posix())
    return _Filter(lines, skip)


def _read_gitignore(dest: DestDir) -> list[str]:
    """The root's .gitignore: a regular file (a link is not followed, a FIFO not waited
    on), at most GITIGNORE_MAX bytes read."""
    fd = dest.open_file(".gitignore")
    if fd is None:
        return []
    with os.fdopen(fd, "rb") as f:
        return f.read(GITIGNORE_MAX).decode(errors="replace").splitlines()


def _scan_local(dest: DestDir, flt: _Filter) -> dict[str, Stat]:
    """Regular files under the root (symlinks and special files skipped, like the agent;
    no directory entered through a link).

    An unreadable directory is an error, not a skip: skipping would read as deletions.
    """
    try:
        found = dest.walk_files(flt.dir_excluded, flt.excluded)
    except OSError as exc:
        raise SyncError(f"cannot read local directory {exc.filename or dest.root}: "
                        f"{exc.strerror or exc}") from exc
    return {rel: Stat(st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
            for rel, st in found.items()}


def _scan_remote(client: AgentClient, root: str, flt: _Filter) -> dict[str, Stat] | None:
    """The remote files, or None when the remote directory does not exist."""
    try:
        files, _ = client.walk(root)
    except SandboxFileNotFound:
        return None
    return {check_relpath(rel): _remote_stat(rel, v) for rel, v in files.items()
            if not flt.excluded(check_relpath(rel))}


def _remote_stat(rel: str, value: object) -> Stat:
    """A walk entry ``[size, mtime_ns, mode]``: three non-negative ints, or a ProtocolError."""
    if not isinstance(value, list | tuple) or len(value) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63
            for v in value):
        raise ProtocolError(f"bad file entry from the sandbox for {rel}: {value!r}")
    return Stat(*value)


def _load_state(path: Path | None, local: Path, remote: str) -> State:
    """The last sync's state; anything unreadable or for other roots counts as none."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("local") != str(local) or data.get("remote") != remote:
            return {}
        files = data["files"]
        return {rel: e for rel, e in files.items() if isinstance(e, dict) and _plain(rel)
                and all(isinstance(e.get(k), int) for k in _ENTRY_INTS)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _plain(rel: str) -> bool:
    try:
        check_relpath(rel)
    except ProtocolError:
        return False
    return True


def _save_state(path: Path, local: Path, remote: str, files: State) -> None:
    """Written to a fresh 0600 temp file (O_EXCL: a planted name is not written through),
    then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": STATE_VERSION, "local": str(local), "remote": remote, "files": files}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _in_sync(loc: Stat, rem: Stat, b: dict[str, Any] | None) -> bool:
    """Equal without hashing: same size and mtime, or both exactly as the last sync left them."""
    if loc.size != rem.size:
        return False
    return loc.mtime_ns == rem.mtime_ns or _matches_base(loc, rem, b)


def _matches_base(loc: Stat, rem: Stat, b: dict[str, Any] | None) -> bool:
    return b is not None and b["size"] == loc.size == rem.size \
        and b["local_mtime_ns"] == loc.mtime_ns and b["remote_mtime_ns"] == rem.mtime_ns


def _changed(st: Stat | None, b: dict[str, Any] | None, key: str) -> bool:
    if b is None or st is None:
        return st is not None or b is not None
    return bool(st.size != b["size"] or st.mtime_ns != b[key])


def _resolve(loc: Stat, rem: Stat, prefer: Prefer | None) -> str:
    if prefer == "local" or (prefer == "newer" and loc.mtime_ns > rem.mtime_ns):
        return "push"
    if prefer == "remote" or (prefer == "newer" and rem.mtime_ns > loc.mtime_ns):
        return "pull"
    return "conflict"


def _decide(loc: Stat | None, rem: Stat | None, b: dict[str, Any] | None, equal: bool,
            direction: Direction, delete: bool, prefer: Prefer | None) -> str | None:
    """One file's action: push, pull, del_local, del_remote, conflict, same or None."""
    if loc is not None and rem is not None:
        if equal or _in_sync(loc, rem, b):
            return "same"
        if direction != "both":
            return direction
        lc, rc = _changed(loc, b, "local_mtime_ns"), _changed(rem, b, "remote_mtime_ns")
        if lc != rc:
            return "push" if lc else "pull"
        return _resolve(loc, rem, prefer)
    if loc is not None:
        if direction == "pull":
            return "del_local" if delete else None
        gone = direction == "both" and not _changed(loc, b, "local_mtime_ns")
        return "del_local" if gone and delete else "push"
    if rem is not None:
        if direction == "push":
            return "del_remote" if delete else None
        gone = direction == "both" and not _changed(rem, b, "remote_mtime_ns")
        return "del_remote" if gone and delete else "pull"
    return None


class _Syncer:
    """Carries out a plan: keeps the report, the new state and the progress count."""

    def __init__(self, client: AgentClient, local: DestDir | None, remote: str, report: SyncReport,
                 progress: Progress | None, state: State) -> None:
        self.client, self._local, self.remote = client, local, remote
        self.report, self.progress, self.state = report, progress, state
        self.done = self.total = 0

    @property
    def local(self) -> DestDir:
        """The local root (absent only in a dry run, which touches nothing)."""
        assert self._local is not None
        return self._local

    def run(self, plan: dict[str, str | None], lf: dict[str, Stat], rf: dict[str, Stat],
            equal: dict[str, str]) -> None:
        """Act on each file; ``state`` keeps the old entry of a file left alone."""
        r = self.report
        lists = {"push": r.pushed, "pull": r.pulled, "del_local": r.deleted_local,
                 "del_remote": r.deleted_remote}
        self.total = sum(lf[p].size if a == "push" else rf[p].size
                         for p, a in plan.items() if a in ("push", "pull"))
        for rel, action in plan.items():
            if action == "same":
                r.unchanged += 1
                self.state[rel] = _same_entry(lf[rel], rf[rel], self.state.get(rel),
                                              equal.get(rel))
            elif action == "conflict":
                r.conflicts.append(rel)
            elif action is not None and r.dry_run:
                lists[action].append(rel)  # a dry run counts the bytes it would move
                r.bytes_sent += lf[rel].size if action == "push" else 0
                r.bytes_received += rf[rel].size if action == "pull" else 0
            elif action is not None and self._apply(action, rel):
                lists[action].append(rel)
            if rel not in lf and rel not in rf:
                self.state.pop(rel, None)  # gone from both sides: forget it

    def _apply(self, action: str, rel: str) -> bool:
        """One transfer or deletion; False when the source vanished since the scan."""
        ops = {"push": self._push, "pull": self._pull, "del_local": self._delete_local,
               "del_remote": self._delete_remote}
        try:
            entry = ops[action](rel)
        except ProtocolError as exc:  # the sandbox misbehaved: keep saying so
            raise ProtocolError(f"sync failed at {rel} ({action}): {exc}",
                                hint=exc.hint) from exc
        except AivaError as exc:
            raise SyncError(f"sync failed at {rel} ({action}): {exc}", hint=exc.hint) from exc
        except OSError as exc:
            raise SyncError(f"sync failed at {rel} ({action}): {exc}") from exc
        if entry is None:
            return False
        if entry:
            self.state[rel] = entry
        else:
            self.state.pop(rel, None)
        return True

    def _tick(self, phase: str, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(phase, self.done, self.total)

    def _push(self, rel: str) -> dict[str, Any] | None:
        """Read through a descriptor opened without following links (a link or FIFO
        swapped in since the scan counts as vanished); setuid/setgid bits stay home."""
        h = hashlib.sha256()
        fd = self.local.open_file(rel)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)

            def chunks() -> Iterator[bytes]:
                for chunk in read_chunks(fd, CHUNK):
                    h.update(chunk)
                    yield chunk
                    self._tick("push", len(chunk))

            n = self.client.write_file(posixpath.join(self.remote, rel), chunks(),
                                       mode=stat.S_IMODE(st.st_mode) & 0o777,
                                       mtime_ns=st.st_mtime_ns)
        finally:
            os.close(fd)
        self.report.bytes_sent += n
        return _entry(n, st.st_mtime_ns, st.st_mtime_ns, h.hexdigest())

    def _pull(self, rel: str) -> dict[str, Any] | None:
        """Exactly the declared bytes, into a temp file beside the target, then renamed:
        never half a file, never outside the root, never through a link."""
        try:
            got = receive(self.client, posixpath.join(self.remote, rel), self.local, rel,
                          on_chunk=lambda n: self._tick("pull", n))
        except SandboxFileNotFound:
            return None
        done, remote_ns = got
        self.report.bytes_received += done.size
        return _entry(done.size, done.mtime_ns, remote_ns, done.sha256)

    def _delete_local(self, rel: str) -> dict[str, Any]:
        self.local.remove_file(rel)  # relative to the root's descriptor, links never followed
        return {}

    def _delete_remote(self, rel: str) -> dict[str, Any]:
        with contextlib.suppress(SandboxFileNotFound):
            self.client.remove(posixpath.join(self.remote, rel))
        parent = posixpath.dirname(rel)
        while parent:  # non-recursive remove: fails (and stops) at a non-empty directory
            try:
                self.client.remove(posixpath.join(self.remote, parent))
            except AivaError:
                break
            parent = posixpath.dirname(parent)
        return {}


def receive(client: AgentClient, path: str, dest: DestDir, rel: str, *,
            on_chunk: Callable[[int], Any] | None = None) -> tuple[Written, int]:
    """Read the sandbox's ``path`` into ``rel`` under ``dest``: the header checked, the
    size checked against free space first, then exactly that many bytes, mode masked.
    Returns what was written and the remote mtime."""
    raw, chunks = client.read_stream(path)
    try:
        meta = file_meta(raw, path=path)
        dest.check_space(meta.size, what=rel)
    except BaseException:
        close_stream(chunks)
        raise
    done = dest.write_file(rel, chunks, size=meta.size, mode=meta.mode,
                           mtime_ns=meta.mtime_ns, on_chunk=on_chunk)
    return done, meta.mtime_ns


def pull_file(client: AgentClient, path: str, local: Path | str) -> Written:
    """One file out of the sandbox (``aiva cp NAME:FILE LOCAL``): into ``local`` if it is
    a directory (named by the remote base name), else as ``local``."""
    dest = Path(local)
    if dest.is_dir():
        parent, name = dest, posixpath.basename(path.rstrip("/"))
    else:
        parent, name = dest.parent, dest.name
    try:
        check_name(name)
    except AivaError:
        raise InvalidValue(f"cannot name a local file after {path!r}",
                           hint="give the local file name: aiva cp NAME:PATH ./FILE") from None
    with DestDir(parent) as out:
        return receive(client, path, out, name)[0]


def _entry(size: int, local_ns: int, remote_ns: int, sha: str | None) -> dict[str, Any]:
    return {"size": size, "local_mtime_ns": local_ns, "remote_mtime_ns": remote_ns, "sha256": sha}


def _equal_content(client: AgentClient, local: DestDir | None, remote: str, rels: list[str]
                   ) -> dict[str, str]:
    """Which same-size files with different mtimes hold the same bytes: relpath -> sha256."""
    equal: dict[str, str] = {}
    for i in range(0, len(rels), HASH_BATCH):
        batch = rels[i:i + HASH_BATCH]
        remote_hashes = client.hash_files(remote, batch)
        for rel in batch:
            fd = local.open_file(rel) if local is not None else None
            if fd is None:
                continue
            try:
                h = hashlib.sha256()
                for chunk in read_chunks(fd, CHUNK):
                    h.update(chunk)
                sha = h.hexdigest()
            except OSError:
                continue
            finally:
                os.close(fd)
            if remote_hashes.get(rel) == sha:
                equal[rel] = sha
    return equal


def sync(client: AgentClient, local: Path | str, remote: str, *,
         direction: Direction = "both", delete: bool = False, exclude: Iterable[str] = (),
         prefer: Prefer | None = None, state_file: Path | None = None,
         progress: Progress | None = None, dry_run: bool = False,
         litter: bool = False) -> SyncReport:
    """Bring ``local`` and the sandbox's ``remote`` directory in line; see the module doc.

    Conflicts (changed on both sides, content differs) are reported and left alone unless
    ``prefer`` picks a winner. A missing remote root is treated as a first sync, never as
    "every file was deleted"; a missing local one is an error unless pulling (a mistyped
    path must not make empty directories on both sides). Build litter (``LITTER``) stays
    where it is unless ``litter``. With ``dry_run`` nothing changes and the byte counts
    are planned ones.
    """
    started = time.monotonic()
    if direction not in ("both", "push", "pull") or prefer not in (None, "local", "remote",
                                                                   "newer"):
        raise SyncError(f"bad sync options: direction={direction!r}, prefer={prefer!r}")
    root = Path(local).expanduser().absolute()
    remote = posixpath.normpath(remote)
    if root.exists() and not root.is_dir():
        raise SyncError(f"local path {root} is not a directory")
    if direction == "push" and not root.is_dir():
        raise SyncError(f"nothing to push: local directory {root} does not exist",
                        hint="check the path, or pull into it first")
    if direction == "both" and not root.is_dir():
        raise SyncError(f"local directory {root} does not exist",
                        hint="check the path; to copy the sandbox's directory here, use "
                             "`aiva data NAME pull REMOTE LOCAL`")
    base = _load_state(state_file, root, remote)
    with contextlib.ExitStack() as stack:
        dest = stack.enter_context(DestDir(root)) if root.is_dir() else None
        flt = _make_filter(root, dest, exclude, state_file, litter=litter)
        local_files = _scan_local(dest, flt) if dest is not None else None
        remote_files = _scan_remote(client, remote, flt)
        if remote_files is None and direction == "pull":
            raise SyncError(f"nothing to pull: {remote} does not exist in {client.label}")
        if local_files is None or remote_files is None:
            base = {}
        lf, rf = local_files or {}, remote_files or {}
        paths = sorted((set(lf) | set(rf) | set(base)) - {p for p in base if flt.excluded(p)})
        candidates = [p for p in paths if p in lf and p in rf and lf[p].size == rf[p].size
                      and not _in_sync(lf[p], rf[p], base.get(p))]
        equal = _equal_content(client, dest, remote, candidates)
        plan = {p: _decide(lf.get(p), rf.get(p), base.get(p), p in equal, direction, delete,
                           prefer)
                for p in paths}
        report = SyncReport(dry_run=dry_run)
        state = {p: e for p, e in base.items() if p in paths}
        if dry_run:
            _Syncer(client, dest, remote, report, progress, state).run(plan, lf, rf, equal)
            report.duration = time.monotonic() - started
            return report
        if remote_files is None:
            try:
                client.mkdir(remote)
            except AivaError as exc:
                raise SyncError(f"cannot create {remote} in {client.label}: {exc}") from exc
        if dest is None:
            root.mkdir(parents=True, exist_ok=True)
            dest = stack.enter_context(DestDir(root))
        _check_space(dest, sum(rf[p].size for p, a in plan.items() if a == "pull"), client)
        try:
            _Syncer(client, dest, remote, report, progress, state).run(plan, lf, rf, equal)
        finally:  # what was done so far is remembered, so a rerun does not redo or misread it
            if state_file is not None:
                _save_state(state_file, root, remote, state)
    report.duration = time.monotonic() - started
    return report


def _check_space(dest: DestDir, needed: int, client: AgentClient) -> None:
    """All the pulls together must fit before the first byte lands (a sparse 1 TB file in
    the sandbox is 1 TB here)."""
    try:
        dest.check_space(needed, what=f"the files to pull from {client.label}")
    except AivaError as exc:
        raise SyncError(str(exc), hint=exc.hint) from exc


def _same_entry(loc: Stat, rem: Stat, b: dict[str, Any] | None, sha: str | None
                ) -> dict[str, Any]:
    """State for a file equal on both sides: a fresh hash, else the base's if still valid."""
    if sha is None and b is not None and _matches_base(loc, rem, b):
        sha = b.get("sha256")
    return _entry(loc.size, loc.mtime_ns, rem.mtime_ns, sha)


def push(client: AgentClient, local: Path | str, remote: str, *, delete: bool = False,
         exclude: Iterable[str] = (), state_file: Path | None = None,
         progress: Progress | None = None, dry_run: bool = False,
         litter: bool = False) -> SyncReport:
    """Make ``remote`` match ``local`` (only changed files cross)."""
    return sync(client, local, remote, direction="push", delete=delete, exclude=exclude,
                state_file=state_file, progress=progress, dry_run=dry_run, litter=litter)


def pull(client: AgentClient, local: Path | str, remote: str, *, delete: bool = False,
         exclude: Iterable[str] = (), state_file: Path | None = None,
         progress: Progress | None = None, dry_run: bool = False,
         litter: bool = False) -> SyncReport:
    """Make ``local`` match ``remote`` (only changed files cross)."""
    return sync(client, local, remote, direction="pull", delete=delete, exclude=exclude,
                state_file=state_file, progress=progress, dry_run=dry_run, litter=litter)
