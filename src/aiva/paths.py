"""Where aiva keeps things under ``AIVA_HOME``, in one place."""

from __future__ import annotations

import hashlib
import os
import py_compile
import secrets
import shutil
import sys
from pathlib import Path

from aiva.config import aiva_home
from aiva.guard.private import ensure_home

AGENT_FILES = ("__main__.py", "protocol.py", "server.py")


def state_db() -> Path:
    return aiva_home() / "state.db"


def logs_dir(sandbox_id: str) -> Path:
    return aiva_home() / "logs" / sandbox_id


def run_dir(sandbox_id: str) -> Path:
    """Per-sandbox sockets; short, because a Unix socket path must fit in 108 bytes."""
    return aiva_home() / "run" / sandbox_id[:12]


def lock_path(name: str) -> Path:
    """A sandbox's lifecycle lock, named by a hash of its (already checked) name, so no
    name ever becomes a path."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return aiva_home() / "run" / "locks" / f"{digest}.lock"


def cache_dir() -> Path:
    return aiva_home() / "cache"


def sync_state(sandbox_id: str, local: Path, remote: str) -> Path:
    key = hashlib.sha256(f"{local.resolve()}\0{remote}".encode()).hexdigest()[:16]
    return aiva_home() / "sync" / sandbox_id / f"{key}.json"


def _precompile(source: Path) -> None:
    """Bytecode next to the agent, checked by hash, not mtime (copies get new mtimes):
    a sandbox whose python3 matches ours skips compiling it, which under TCG saves
    seconds of boot; any other python3 ignores these files."""
    py_compile.compile(str(source), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def agent_bundle_files(bundle: Path) -> list[str]:
    """Every file of the bundle, relative to it (sources and bytecode)."""
    return sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())


def agent_bundle() -> Path:
    """A copy of the in-sandbox agent under AIVA_HOME, named by its content hash.

    Sandboxes mount or copy this directory; a new aiva version gets a new directory, so a
    running sandbox never sees its agent change under it.
    """
    src = Path(__file__).parent / "agent"
    digest = hashlib.sha256()
    for name in AGENT_FILES:
        digest.update((src / name).read_bytes())
    digest.update(f"{sys.version_info[:2]}".encode())  # the bytecode is ours
    dest = ensure_home() / "agent" / digest.hexdigest()[:12]
    if not (dest / AGENT_FILES[-1]).exists():
        # unique per call, not per process: threads of one process race here too
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o755)  # public code, mounted read-only: any guest user may read it
        for name in AGENT_FILES:
            shutil.copy2(src / name, tmp / name)
            _precompile(tmp / name)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
