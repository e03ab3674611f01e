"""Per-sandbox command logs: every command's stdout and stderr, kept on the host.

One JSON line per chunk in ``AIVA_HOME/logs/<id>/commands.jsonl``, flushed as it comes,
so ``aiva logs -f`` in another process sees output while a command still runs; merged
with the engine's own log by time when shown.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from aiva import paths
from aiva.backends.base import LogLine

_seq = itertools.count(1)


class CommandLog:
    """Appends the output of one sandbox's commands; safe to share between threads."""

    def __init__(self, sandbox_id: str) -> None:
        self.path = paths.logs_dir(sandbox_id) / "commands.jsonl"
        self._file: IO[str] | None = None
        self._lock = threading.Lock()

    def new_command(self) -> str:
        return f"{os.getpid()}-{next(_seq)}"

    def write(self, cmd: str, source: str, text: str) -> None:
        line = json.dumps({"t": time.time(), "c": cmd, "s": source, "d": text}) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _parse(line: str, source: str | None = None) -> LogLine | None:
    try:
        rec = json.loads(line)
        return LogLine(datetime.fromtimestamp(rec["t"], UTC), source or rec["s"], rec["d"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: Path, *, tail: int | None = None, source: str | None = None
               ) -> list[LogLine]:
    """Lines of a JSON-lines log ({"t", "s", "d"}); ``source`` overrides each line's own.
    ``tail=0`` is none of them (a follow that starts now), ``None`` all of them."""
    try:
        with path.open(encoding="utf-8") as f:
            lines: Iterable[str] = deque(f, maxlen=tail) if tail is not None else f.readlines()
    except FileNotFoundError:
        return []
    return [rec for rec in (_parse(line, source) for line in lines) if rec is not None]


def follow_jsonl(path: Path, *, source: str | None = None, poll: float = 0.1
                 ) -> Iterator[LogLine]:
    """New lines as they are appended (``tail -f``), forever; the caller stops iterating."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(exist_ok=True)
    with path.open(encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        partial = ""
        while True:
            chunk = f.readline()
            if not chunk:
                time.sleep(poll)
                continue
            partial += chunk
            if partial.endswith("\n"):
                rec = _parse(partial, source)
                partial = ""
                if rec is not None:
                    yield rec


def read_command_log(sandbox_id: str, *, tail: int | None = None) -> list[LogLine]:
    return read_jsonl(log_path(sandbox_id), tail=tail)


def follow_command_log(sandbox_id: str) -> Iterator[LogLine]:
    return follow_jsonl(log_path(sandbox_id))


def merge(*sources: Iterable[LogLine], tail: int | None = None) -> list[LogLine]:
    merged = list(heapq.merge(*(sorted(s, key=_key) for s in sources), key=_key))
    return merged[-tail:] if tail else merged


def _key(line: LogLine) -> datetime:
    return line.ts


def log_path(sandbox_id: str) -> Path:
    return paths.logs_dir(sandbox_id) / "commands.jsonl"
