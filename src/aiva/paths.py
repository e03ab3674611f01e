"""Where aiva keeps things under ``AIVA_HOME``, in one place.

Every file and directory aiva makes below the home is named here, so one read shows the
home's whole layout and no module spells a path of its own. Stdlib only, and it imports
nothing of aiva: every other module may build on it (``guard.private`` keeps these paths
private; ``agent_client.bundle`` writes the agent's copy under :func:`agent_dir`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def aiva_home() -> Path:
    """``$AIVA_HOME``, default ``~/.aiva``: one variable moves everything aiva keeps."""
    return Path(os.environ.get("AIVA_HOME") or Path.home() / ".aiva").expanduser()


def config_path() -> Path:
    return aiva_home() / "config.yaml"


def state_db() -> Path:
    return aiva_home() / "state.db"


def events_jsonl() -> Path:
    """The built-in event log plugin's JSONL copy of the event stream."""
    return aiva_home() / "events.jsonl"


def aiva_log() -> Path:
    """aiva's own log (warnings and errors of every aiva process of this home)."""
    return aiva_home() / "aiva.log"


def lessons_json() -> Path:
    """What the task gates learned, kept across tasks."""
    return aiva_home() / "lessons.json"


def agent_dir() -> Path:
    """The agent bundles, one per content hash; public (see ``guard.private``)."""
    return aiva_home() / "agent"


# ---------------------------------------------------------------------- per sandbox


def logs_root() -> Path:
    return aiva_home() / "logs"


def logs_dir(sandbox_id: str) -> Path:
    return logs_root() / sandbox_id


def command_log(sandbox_id: str) -> Path:
    """The sandbox's command output, one JSON line per chunk."""
    return logs_dir(sandbox_id) / "commands.jsonl"


def sync_dir(sandbox_id: str) -> Path:
    return aiva_home() / "sync" / sandbox_id


def sync_state(sandbox_id: str, local: Path, remote: str) -> Path:
    """The base state of one local/remote pair that ``aiva sync`` compares with."""
    key = hashlib.sha256(f"{local.resolve()}\0{remote}".encode()).hexdigest()[:16]
    return sync_dir(sandbox_id) / f"{key}.json"


def vms_dir() -> Path:
    return aiva_home() / "vms"


def vm_dir(sandbox_id: str) -> Path:
    """A VM's disks, pid files and console."""
    return vms_dir() / sandbox_id


def jail_dir() -> Path:
    """The Firecracker jailer's chroot base."""
    return aiva_home() / "jail"


def disks_dir() -> Path:
    """Docker sandboxes' disk images, one directory per sandbox."""
    return aiva_home() / "disks"


def desktops_dir() -> Path:
    return aiva_home() / "desktops"


def desktop_password(sandbox_id: str) -> Path:
    return desktops_dir() / f"{sandbox_id}.password"


def task_output(task_id: str) -> Path:
    """A task's output; ``task_id`` is a validated task id (``t-`` + 8 hex)."""
    return aiva_home() / "tasks" / task_id / "output.jsonl"


# ---------------------------------------------------------------------- run/


def run_root() -> Path:
    """Sockets, locks and leases: what only matters while things run."""
    return aiva_home() / "run"


def run_dir(sandbox_id: str) -> Path:
    """Per-sandbox sockets; short, because a Unix socket path must fit in 108 bytes."""
    return run_root() / sandbox_id[:12]


def locks_dir() -> Path:
    return run_root() / "locks"


def lock_path(name: str) -> Path:
    """A sandbox's lifecycle lock, named by a hash of its (already checked) name, so no
    name ever becomes a path."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    return locks_dir() / f"{digest}.lock"


def pool_lock(template_slug: str) -> Path:
    """The warm pool's lock of one template; ``template_slug`` is safe as a file name."""
    return locks_dir() / "pool" / f"{template_slug}.lock"


def net_dir() -> Path:
    """VM networking's leases and state."""
    return run_root() / "net"


# ---------------------------------------------------------------------- daemon


def daemon_socket() -> Path:
    return aiva_home() / "daemon.sock"


def daemon_token() -> Path:
    return aiva_home() / "daemon.token"


def mcp_token() -> Path:
    return aiva_home() / "mcp.token"


def daemon_pid() -> Path:
    return aiva_home() / "daemon.pid"


def daemon_state() -> Path:
    return aiva_home() / "daemon.json"


def daemon_log() -> Path:
    return aiva_home() / "daemon.log"


def daemon_lock() -> Path:
    """Held by the running daemon for its whole life: one daemon per home."""
    return aiva_home() / "daemon.lock"


# ---------------------------------------------------------------------- cache/


def cache_dir() -> Path:
    """Public artifacts (see ``guard.private``)."""
    return aiva_home() / "cache"


def images_cache() -> Path:
    """Template rootfs tarballs, named by their cache key."""
    return cache_dir() / "images"


def python_check_cache() -> Path:
    """Each image's python3 version (or none), probed once per image id."""
    return cache_dir() / "python-check.json"


def vm_cache() -> Path:
    """Initramfs images and what else the VM backends build once."""
    return cache_dir() / "vm"


def accel_cache() -> Path:
    """Whether KVM worked for a kernel, so ``auto`` does not probe each start."""
    return vm_cache() / "accel.json"


def kernel_cache() -> Path:
    return vm_cache() / "kernel"
