"""aiva's own plugins. They use the public hooks, so they double as working examples.

- ``aiva.eventlog``: every event, as one JSON line, appended to ``AIVA_HOME/events.jsonl``
  (the export the data collector reads; ``Event.model_validate_json`` reads a line back).
- ``aiva.lifecycle_log``: sandbox lifecycle on the ``aiva`` Python logger.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from aiva import paths
from aiva.guard.private import open_private
from aiva.models import Event, SandboxInfo
from aiva.plugins.hookspecs import hookimpl


def events_path() -> Path:
    return paths.events_jsonl()


class EventLog:
    """Append-only JSONL of the event stream, safe for several aiva processes at once.

    Each line is one ``write`` on an ``O_APPEND`` descriptor, so lines from concurrent
    writers never interleave, and nothing sits in a buffer if the process dies. Lines
    follow the order hooks ran in; sort by ``id`` for the store's order.
    """

    @hookimpl
    def on_event(self, event: Event) -> None:
        line = (event.model_dump_json() + "\n").encode()
        path = events_path()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except FileNotFoundError:
            fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


class LifecycleLog:
    """Lifecycle at INFO, commands at DEBUG, for whoever configures ``logging``."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("aiva")

    @hookimpl
    def on_vm_create(self, sandbox: SandboxInfo) -> None:
        self.log.info("sandbox %s (%s) created on %s", sandbox.name, sandbox.short_id,
                      sandbox.spec.backend)

    @hookimpl
    def on_vm_start(self, sandbox: SandboxInfo) -> None:
        self.log.info("sandbox %s (%s) started", sandbox.name, sandbox.short_id)

    @hookimpl
    def on_vm_stop(self, sandbox: SandboxInfo) -> None:
        self.log.info("sandbox %s (%s) stopped", sandbox.name, sandbox.short_id)

    @hookimpl
    def on_vm_delete(self, sandbox: SandboxInfo) -> None:
        self.log.info("sandbox %s (%s) deleted", sandbox.name, sandbox.short_id)

    @hookimpl
    def on_command(self, sandbox: SandboxInfo, argv: list[str], exit_code: int,
                   duration: float) -> None:
        self.log.debug("sandbox %s: %s exited %d after %.3fs", sandbox.name, argv, exit_code,
                       duration)


#: Registered, under these names, before any entry-point plugin.
PLUGINS: dict[str, object] = {
    "aiva.eventlog": EventLog(),
    "aiva.lifecycle_log": LifecycleLog(),
}
