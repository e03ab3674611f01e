"""The daemon's background loops, written once: work every ``interval`` s until a stop.

The metrics sampler, the lifetimes pass and the task scheduler each run like this. Each
pass runs on a fresh daemon thread, watched from the event loop, so a slow or stuck
backend call neither blocks the loop nor holds up shutdown: once the stop event is set,
:meth:`Periodic.run` returns within a poll (``POLL`` s), whether or not the pass ended;
:attr:`Periodic.busy` says whether it still runs (and still uses what it was given).
A step that raises is logged, with its traceback, on its owner's logger, and the loop
goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: How often the event loop looks whether a pass has ended (or the stop event is set).
POLL = 0.05


@dataclass(frozen=True)
class Step:
    """One piece of a pass: ``fn``, logged as ``failed`` when it raises. With ``every``
    it runs only in the passes that begin at least ``every`` s after the last one it ran
    in (and in the first)."""

    fn: Callable[[], object]
    failed: str
    every: float | None = None


class Periodic:
    """Runs its steps, in order, on one thread per pass; a pass begins every
    ``interval`` s (or at once after one that took longer)."""

    def __init__(self, name: str, interval: float, steps: Sequence[Step],
                 log: logging.Logger) -> None:
        self.name = name  # the threads' name
        self.interval = interval
        self.steps = tuple(steps)
        self.log = log
        self._last: dict[int, float] = {}  # step index -> when its last pass began
        self._worker: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """A pass is still running (on after :meth:`run` returned, when stopped mid-pass)."""
        return self._worker is not None and self._worker.is_alive()

    def _due(self, began: float) -> list[Step]:
        due = []
        for i, step in enumerate(self.steps):
            last = self._last.get(i)
            if step.every is None or last is None or began - last >= step.every:
                due.append(step)
                self._last[i] = began
        return due

    def _pass(self, steps: list[Step]) -> None:
        for step in steps:
            try:
                step.fn()
            except Exception:
                self.log.exception(step.failed)

    async def run(self, stop: asyncio.Event) -> None:
        """Pass after pass until ``stop`` is set; returns within ``POLL`` s of it."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            self._worker = threading.Thread(target=self._pass, args=(self._due(began),),
                                            daemon=True, name=self.name)
            self._worker.start()
            while self._worker.is_alive() and not stop.is_set():
                await asyncio.sleep(POLL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(),
                                       max(0.0, self.interval - (loop.time() - began)))
