"""What a task printed, kept with the task, not in its sandbox.

A pool sandbox serves one task and is then recreated (or, after a rollback, retired), so
its command log is not where a task's output can live. Each task gets
``AIVA_HOME/tasks/<id>/output.jsonl``: the command, its stdout and stderr, its exit code,
and the same for the L0 gate, one JSON line per chunk, capped per task so a chatty task
cannot fill the disk. ``aiva task logs ID`` reads it, also long after the sandbox is gone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO

from aiva import paths
from aiva.backends.base import LogLine
from aiva.observe.logs import read_jsonl

CAP = 4 << 20  # bytes of output kept per task; a line says what was cut after that


def output_path(task_id: str) -> Path:
    """The task's output file; ``task_id`` is a validated task id (``t-`` + 8 hex)."""
    return paths.task_output(task_id)


class TaskOutput:
    """Appends one task's output (thread-safe: a background command's drain thread and
    the runner both write)."""

    def __init__(self, task_id: str, cap: int = CAP) -> None:
        self.path = output_path(task_id)
        self.cap = cap
        self.written = 0
        self.cut = 0
        self._lock = threading.Lock()
        self._file: IO[str] | None = None

    def write(self, source: str, text: str) -> None:
        with self._lock:
            if self.written >= self.cap:
                self.cut += len(text)
                return
            text = text[: self.cap - self.written]
            self.written += len(text)
            self._line(source, text)

    def _line(self, source: str, text: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._file.write(json.dumps({"t": time.time(), "s": source, "d": text}) + "\n")
        self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self.cut:
                self._line("aiva", f"output cut: {self.cut} more characters were not kept "
                                   f"(the cap is {self.cap} per task)")
                self.cut = 0
            if self._file is not None:
                self._file.close()
                self._file = None


def read_task_output(task_id: str) -> list[LogLine] | None:
    """The task's output so far, or None when it has no output file (never ran, or ran
    before outputs were kept with tasks)."""
    path = output_path(task_id)
    if not path.is_file():
        return None
    return read_jsonl(path)
