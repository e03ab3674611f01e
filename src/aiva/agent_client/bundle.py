"""The in-sandbox agent as the host ships it: a copy under AIVA_HOME, named by content.

Sandboxes mount or copy this directory; a new aiva version gets a new directory, so a
running sandbox never sees its agent change under it. It lives here, not in
:mod:`aiva.paths`, because it writes files: it makes the home private first
(:mod:`aiva.guard.private`, which itself builds on :mod:`aiva.paths`).
"""

from __future__ import annotations

import hashlib
import os
import py_compile
import secrets
import shutil
import sys
from pathlib import Path

from aiva import paths
from aiva.guard.private import ensure_home

AGENT_FILES = ("__main__.py", "protocol.py", "server.py")


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
    """The bundle of this aiva's agent, made on first use (safe from many threads and
    processes at once)."""
    src = Path(__file__).parent.parent / "agent"
    digest = hashlib.sha256()
    for name in AGENT_FILES:
        digest.update((src / name).read_bytes())
    digest.update(f"{sys.version_info[:2]}".encode())  # the bytecode is ours
    ensure_home()
    dest = paths.agent_dir() / digest.hexdigest()[:12]
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
