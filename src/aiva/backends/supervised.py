"""What the microVM backends share: a VM directory, a supervisor process that owns the
VMM (``aiva.vm.supervisor``), and the agent socket and console log it serves.

QEMU and Firecracker differ in how they boot and save a VM, not in how aiva reaches it
once it runs, so that part lives here once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from aiva import paths
from aiva.agent_client import Transport, connect_unix
from aiva.backends.base import Backend, LogLine, Observed
from aiva.models import SandboxInfo, State
from aiva.observe.logs import follow_jsonl, read_jsonl

SOCKET_NAME = "agent.sock"
#: The guest's syslog on the host, in the run dir. The guest's agent writes it through a
#: virtio-serial port named ``aiva.syslog``, which QEMU appends to this file (see
#: ``QemuBackend.syslog_path``). Firecracker has no virtio-serial, so its VMs keep the
#: default ``syslog_path`` of None: no guest syslog there (a vsock stream could carry it).
SYSLOG_NAME = "syslog.jsonl"


def vm_dir(sb: SandboxInfo) -> Path:
    return paths.vm_dir(sb.id)


def pid_alive(pid: int | None, marker: str) -> bool:
    """True if ``pid`` runs and is ours (its command line names ``marker``)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker.encode() in cmdline


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def template_of(sb: SandboxInfo) -> str:
    """The template whose VM files a sandbox boots: ``aiva/python:latest`` -> ``python``."""
    if sb.spec.template:
        return sb.spec.template
    image = sb.spec.image
    if image.startswith("aiva/"):
        return image.removeprefix("aiva/").split(":")[0]
    return image


def hostname_of(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name)[:63]


class SupervisedVM(Backend):
    """A backend whose VMs run under ``aiva.vm.supervisor``."""

    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Transport:
        return connect_unix(str(paths.run_dir(sb.id) / SOCKET_NAME), timeout=timeout)

    def engine_logs(self, sb: SandboxInfo, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[LogLine]:
        path = vm_dir(sb) / "console.jsonl"
        yield from read_jsonl(path, tail=tail, source="engine")
        if follow:
            yield from follow_jsonl(path, source="engine")

    def _running(self, sb: SandboxInfo) -> bool:
        d = vm_dir(sb)
        return pid_alive(read_pid(d / "supervisor.pid"), str(d))

    def _observe_down(self, sb: SandboxInfo, vmm: str) -> Observed | None:
        """What a VM that is not running is: ended (and how), lost, or stopped."""
        d = vm_dir(sb)
        if (d / "exit.json").exists():
            info = json.loads((d / "exit.json").read_text())
            code = info.get("code")
            reason = info.get("reason") or f"the VM exited ({vmm} status {code})"
            return Observed(State.STOPPED, reason, 0 if code == 0 else (code or 1))
        if self._running(sb):
            return None
        if not d.exists():
            return Observed(None, "the VM's files were removed outside aiva")
        if sb.state in (State.STOPPED, State.CREATING):
            return Observed(State.STOPPED)
        return Observed(State.ERROR, "the VM's supervisor died without a word")

    def _why(self, sb: SandboxInfo) -> str:
        """The best one-line reason a VM did not come up: /init's own, else the VMM's."""
        errors = [ln.text for ln in self.engine_logs(sb, tail=20) if "AIVA-INIT-ERROR" in ln.text]
        try:
            log = (vm_dir(sb) / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            log = []
        return (errors or log or [""])[-1]
