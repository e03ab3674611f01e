"""The one interface every engine implements: lifecycle only.

What runs *inside* a sandbox (exec, files, metrics) is not here: it goes through the
in-sandbox agent, and a backend's only part in it is :meth:`Backend.connect_agent`, which
returns a byte stream to that agent. So exec and file code is written once, for all
engines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aiva.agent_client import Transport
from aiva.models import SandboxInfo, State
from aiva.observe.metrics import SandboxMetrics


@dataclass
class Observed:
    """What the engine reports about a sandbox, to reconcile with the stored state."""

    state: State | None  # None: the engine has no such sandbox any more
    reason: str | None = None
    exit_code: int | None = None


@dataclass
class LogLine:
    ts: datetime
    source: str  # "engine", "stdout", "stderr", "cmd", "exit", "syslog"
    text: str


class Backend(ABC):
    name: str

    @abstractmethod
    def check(self) -> None:
        """Raise ``BackendUnavailable`` (with a hint) unless the engine is installed and
        answering; cheap, used to pick an engine."""

    @abstractmethod
    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        """Make the sandbox's resources (not started); returns runtime facts to store."""

    @abstractmethod
    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        """Boot it and wait until its agent accepts connections."""

    @abstractmethod
    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None: ...

    @abstractmethod
    def pause(self, sb: SandboxInfo) -> None: ...

    @abstractmethod
    def resume(self, sb: SandboxInfo) -> None: ...

    @abstractmethod
    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        """Remove everything the sandbox owns; its data volume only if ``volumes``."""

    @abstractmethod
    def observe(self, sb: SandboxInfo) -> Observed: ...

    @abstractmethod
    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Transport: ...

    @abstractmethod
    def engine_logs(self, sb: SandboxInfo, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[LogLine]:
        """The engine's own log of the sandbox (container output, VM console)."""

    def syslog_path(self, sb: SandboxInfo) -> Path | None:
        """The host file (JSON lines) that the guest's syslog goes to, or None if this
        engine has no channel for it. The agent in the guest is the syslog daemon
        (``--syslog``) and writes the file, directly or through a virtio-serial port."""
        return None

    def guest_syslog(self, sb: SandboxInfo, *, tail: int | None = None) -> list[LogLine]:
        """The guest's syslog so far (the last ``tail`` lines), rotated part included;
        every line's source is "syslog", whatever the guest wrote into the file. The guest
        may put anything in its place: read through :func:`aiva.observe.logs.read_jsonl` (no link
        followed, no FIFO waited on, only a regular file, at most ``limits.log_read``)."""
        from aiva.observe.logs import read_jsonl  # aiva.observe.logs imports this module

        def last(path: Path, n: int | None) -> list[LogLine]:
            # one more: the last line may be half written (the guest is still at it)
            lines = read_jsonl(path, tail=n + 1 if n else None, source="syslog")
            return lines[-n:] if n else lines

        path = self.syslog_path(sb)
        if path is None:
            return []
        lines = last(path, tail)
        if not tail or len(lines) < tail:
            older = path.with_name(path.name + ".1")
            lines = last(older, tail - len(lines) if tail else None) + lines
        return lines

    def snapshot(self, sb: SandboxInfo, tag: str) -> dict[str, Any]:
        """Save the sandbox under ``tag``; returns what to remember (``memory``: whether
        processes come back alive on restore)."""
        raise NotImplementedError(f"the {self.name} backend cannot take snapshots")

    def restore(self, sb: SandboxInfo, tag: str, snap: dict[str, Any]) -> dict[str, Any]:
        """Put the sandbox back to ``tag`` in place; returns runtime facts to store."""
        raise NotImplementedError(f"the {self.name} backend cannot restore snapshots")

    def create_from_snapshot(self, sb: SandboxInfo, source: SandboxInfo, tag: str,
                             snap: dict[str, Any]) -> dict[str, Any]:
        """Like :meth:`create`, with the disk (and memory) of ``source`` at ``tag``."""
        raise NotImplementedError(f"the {self.name} backend cannot fork snapshots")

    def delete_snapshots(self, sb: SandboxInfo, snaps: list[dict[str, Any]]) -> None:
        """Remove what the snapshots hold outside the sandbox's own disk."""
        return None  # engines that keep snapshots inside the disk have nothing to do

    def metrics(self, sb: SandboxInfo) -> SandboxMetrics:
        """CPU, memory, disk and network I/O as the host measures them."""
        raise NotImplementedError(f"the {self.name} backend has no host metrics")

    def reap(self, live_ids: set[str]) -> list[str]:
        """Remove what sandboxes that no longer exist left behind after a crash (their
        host networking, for instance); returns the sandbox ids cleaned up."""
        return []

    def update_resources(self, sb: SandboxInfo) -> None:
        """Apply changed cpus / memory / pids limits; engines that cannot, say so."""
        raise NotImplementedError(f"the {self.name} backend cannot change limits live")
