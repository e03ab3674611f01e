"""A tiny aiva plugin, installed for tests by putting this directory on sys.path."""

from __future__ import annotations

from aiva.models import Event
from aiva.plugins import hookimpl

seen: list[Event] = []


@hookimpl
def on_event(event: Event) -> None:
    seen.append(event)
