"""What this AIVA_HOME left behind that no sandbox owns, and how to remove it.

A sandbox removed without ``--volumes`` keeps its data (its Docker disk image, or an
older sandbox's data volume) so nothing is lost by accident; a fork can outlive the
snapshot image it was made from; a crash can leave a container, a network, a VM
directory or a run directory. ``aiva volume ls|rm`` gives kept data a life, ``aiva
prune [--dry-run]`` lists and removes all of it, and ``Engine.delete`` sweeps snapshot
images once the last sandbox that could use them is gone.

Only what carries both ``aiva.managed=true`` and this ``aiva.home`` label (Docker), or
lies under this AIVA_HOME and is named by a sandbox id, is ever touched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiva import paths
from aiva.errors import AivaError, BackendError
from aiva.network import egress
from aiva.paths import aiva_home

if TYPE_CHECKING:
    from aiva.engine import Engine

_ID = re.compile(r"^[0-9a-f][0-9a-f-]{7,63}$")
#: Kept data of a removed sandbox: what `aiva volume ls` shows
DATA_KINDS = ("disk", "volume")


@dataclass
class Leftover:
    kind: str  # disk, volume, snapshot volume, snapshot image, container, network, vm dir, run dir
    name: str  # what it is called where it lives
    sandbox_id: str | None = None
    sandbox: str | None = None  # the name its sandbox had, when known
    size: int | None = None
    remove: Callable[[], None] = field(default=lambda: None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "sandbox": self.sandbox,
                "sandbox_id": self.sandbox_id, "size": self.size}


def find(engine: Engine) -> list[Leftover]:
    """Everything of this AIVA_HOME no sandbox in the store owns (Docker parts only when
    Docker answers)."""
    live = {sb.id for sb in engine.store.all()}
    names = _names(engine)
    found = _files(live, names)
    client = _docker(engine)
    if client is not None:
        found += _docker_parts(engine, client, live, names)
    return found


def kept_data(engine: Engine, ref: str | None = None) -> list[Leftover]:
    """Kept data of removed sandboxes; ``ref``: only that sandbox's (name or id)."""
    out = [x for x in find(engine) if x.kind in DATA_KINDS]
    if ref is not None:
        out = [x for x in out if ref in (x.sandbox, x.sandbox_id, x.name)
               or ((x.sandbox_id or "").startswith(ref) and len(ref) >= 8)]
    return out


def sweep_snapshot_images(engine: Engine) -> list[str]:
    """Remove this home's snapshot images whose sandbox is gone and that no container
    uses any more (the last fork of them was just removed)."""
    client = _docker(engine)
    if client is None:
        return []
    live = {sb.id for sb in engine.store.all()}
    gone = []
    for item in _snapshot_images(client, live, {}):
        try:
            item.remove()
        except AivaError:
            continue
        gone.append(item.name)
    return gone


# ---------------------------------------------------------------------- files


def _files(live: set[str], names: dict[str, str]) -> list[Leftover]:
    out: list[Leftover] = []
    disks = paths.disks_dir()
    for d in _id_dirs(disks):
        if d.name not in live:
            out.append(Leftover("disk", str(d / "disk.img"), d.name, names.get(d.name),
                                _allocated(d / "disk.img"), _remove_disk(d.name)))
    for d in _id_dirs(paths.vms_dir()):
        if d.name not in live:
            out.append(Leftover("vm dir", str(d), d.name, names.get(d.name), _du(d),
                                _remove_vm_dir(d)))
    prefixes = {sid[:12] for sid in live}
    for d in _id_dirs(paths.run_root()):
        if d.name not in prefixes:
            sid = next((s for s in names if s.startswith(d.name)), None)
            out.append(Leftover("run dir", str(d), sid, names.get(sid or ""), None,
                                _remove_run_dir(d)))
    return out


def _id_dirs(root: Path) -> list[Path]:
    """Directories named like sandbox ids, never through a link."""
    try:
        entries = sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []
    except OSError:
        return []
    return [d for d in entries if _ID.match(d.name) and d.is_dir() and not d.is_symlink()]


def _remove_disk(sid: str) -> Callable[[], None]:
    def remove() -> None:
        from aiva.backends import docker_disk

        docker_disk.remove(sid)

    return remove


def _remove_vm_dir(d: Path) -> Callable[[], None]:
    def remove() -> None:
        from aiva.engine.lifetimes import _kill_ours

        for pid_file in ("qemu.pid", "supervisor.pid"):
            _kill_ours(d / pid_file, str(d))
        shutil.rmtree(d, ignore_errors=True)

    return remove


def _remove_run_dir(d: Path) -> Callable[[], None]:
    def remove() -> None:
        if os.path.ismount(d):  # a Docker sandbox's run dir is a tmpfs of its own
            proc = subprocess.run(["umount", str(d)], capture_output=True, text=True,
                                  timeout=30)
            if proc.returncode != 0 and os.path.ismount(d):
                raise BackendError(f"cannot unmount {d}: {proc.stderr.strip()}")
        shutil.rmtree(d, ignore_errors=True)

    return remove


def _allocated(path: Path) -> int | None:
    """Bytes a (sparse) file really takes on the host."""
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except OSError:
        return None


def _du(d: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


# ---------------------------------------------------------------------- Docker


def _docker(engine: Engine) -> Any:
    try:
        return engine.backend("docker").client  # type: ignore[attr-defined]
    except AivaError:
        return None


def _ours(labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return labels.get("aiva.managed") == "true" and labels.get("aiva.home") == str(aiva_home())


def _filters() -> dict[str, list[str]]:
    return {"label": ["aiva.managed=true", f"aiva.home={aiva_home()}"]}


def _docker_parts(engine: Engine, client: Any, live: set[str], names: dict[str, str]
                  ) -> list[Leftover]:
    import docker

    out: list[Leftover] = []
    for c in client.containers.list(all=True, filters=_filters()):
        sid = c.labels.get("aiva.sandbox_id")
        if _ours(c.labels) and sid not in live:
            out.append(Leftover("container", c.name, sid, c.labels.get("aiva.name"), None,
                                _call(functools.partial(c.remove, force=True))))
    for v in client.volumes.list(filters=_filters()):
        labels = v.attrs.get("Labels") or {}
        sid = labels.get("aiva.sandbox_id")
        if not _ours(labels) or sid in live:
            continue
        kind = "snapshot volume" if labels.get("aiva.snapshot") else "volume"
        out.append(Leftover(kind, v.name, sid, labels.get("aiva.name") or names.get(sid or ""),
                            None, _call(functools.partial(v.remove, force=True))))
    out += _snapshot_images(client, live, names)
    for n in client.networks.list(filters=_filters()):
        labels = n.attrs.get("Labels") or {}
        sid = labels.get("aiva.sandbox_id")
        if _ours(labels) and sid not in live:
            def drop(n: Any = n, sid: str | None = sid) -> None:
                if sid and os.geteuid() == 0:
                    egress.remove_docker(sid)
                with contextlib.suppress(docker.errors.NotFound):
                    n.remove()

            out.append(Leftover("network", n.name, sid, labels.get("aiva.name"), None,
                                _call(drop)))
    return out


def _snapshot_images(client: Any, live: set[str], names: dict[str, str]) -> list[Leftover]:
    """Snapshot images of this home whose sandbox is gone and no container uses."""
    images = [i for i in client.images.list(filters={"label": [
        "aiva.managed=true", f"aiva.home={aiva_home()}", "aiva.snapshot"]})
        if _ours(i.labels) and (i.labels or {}).get("aiva.sandbox_id") not in live]
    if not images:
        return []
    used = {c.attrs.get("Image") for c in client.containers.list(all=True)}
    out = []
    for img in images:
        if img.id in used:
            continue  # a fork still runs on it: it goes with that fork
        labels = img.labels or {}
        sid = labels.get("aiva.sandbox_id")
        tag = (img.tags or [img.short_id])[0]
        out.append(Leftover("snapshot image", tag, sid, labels.get("aiva.name")
                            or names.get(sid or ""), int(img.attrs.get("Size") or 0),
                            _call(functools.partial(client.images.remove, img.id, force=True))))
    return out


def _call(fn: Callable[[], Any]) -> Callable[[], None]:
    """Docker's own errors as one BackendError; a thing already gone is no error."""

    def run() -> None:
        import docker

        try:
            fn()
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker could not remove it: {exc.explanation or exc}") from exc

    return run


def _names(engine: Engine) -> dict[str, str]:
    """Sandbox id -> the name it had, from the event log (it outlives the sandbox)."""
    out: dict[str, str] = {}
    for ev in engine.store.events():
        if ev.sandbox_id and ev.sandbox:
            out[ev.sandbox_id] = ev.sandbox
    return out


def run_dir_of(sandbox_id: str) -> Path:
    return paths.run_dir(sandbox_id)
