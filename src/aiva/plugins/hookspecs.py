"""The hooks a plugin may implement, and the markers to implement them with.

This module imports nothing from aiva at run time, so a plugin (or a tool that lists
hooks) can import it without loading the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from aiva.models import Event, SandboxInfo

PROJECT = "aiva"
ENTRY_POINT_GROUP = "aiva.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class AivaSpecs:
    """The hooks a plugin may implement; all are notifications and return nothing."""

    @hookspec
    def on_vm_create(self, sandbox: SandboxInfo) -> None:
        """A sandbox was created (its container or VM disks exist); it may not run yet."""

    @hookspec
    def on_vm_start(self, sandbox: SandboxInfo) -> None:
        """A sandbox booted and its agent answers: it is ``running``."""

    @hookspec
    def on_vm_stop(self, sandbox: SandboxInfo) -> None:
        """A sandbox was stopped through aiva and is now ``stopped``."""

    @hookspec
    def on_vm_delete(self, sandbox: SandboxInfo) -> None:
        """A sandbox was deleted; ``sandbox`` is its last known state."""

    @hookspec
    def on_command(
        self, sandbox: SandboxInfo, argv: list[str], exit_code: int, duration: float
    ) -> None:
        """A foreground command finished in ``sandbox`` (duration in seconds)."""

    @hookspec
    def on_event(self, event: Event) -> None:
        """An event was written to the event store (every kind, in order, with its id)."""
