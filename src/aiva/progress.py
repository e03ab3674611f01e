"""Progress of long work deep inside the engine (a microVM's kernel, initramfs and system
image built the first time one starts), told to whoever started it.

The CLI wraps a command in :func:`reporting` with its spinner's update; code far below
calls :func:`say` without knowing who listens. Nobody listening costs nothing. It is a
context variable, so threads and concurrent requests in the daemon do not mix their
messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_listener: ContextVar[Callable[[str], None] | None] = ContextVar("aiva_progress", default=None)


@contextmanager
def reporting(listener: Callable[[str], None]) -> Iterator[None]:
    """Send what :func:`say` is told, within this block, to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def say(message: str) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(message)
