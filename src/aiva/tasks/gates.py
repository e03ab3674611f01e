"""The gates a finished task passes before its result counts, and the lessons of those
that did not.

- **L0**: the task's ``gate``, a shell command run in the sandbox after the task (in its
  workspace); exit code 0 passes.
- **L1**: the numbers the task wrote to its ``metrics_file``, compared with the history of
  the same kind of task (same name or command, same template): a metric that falls more
  than ``tasks.regression_threshold`` below the best of the recent successes fails, and
  so does a run more than twice as long as their median.
- **L2**: a person's approve or reject (``aiva task approve|reject``), handled by the
  runner and the scheduler.

A task rolled back by a gate (or rejected, or failed) leaves a lesson in
``AIVA_HOME/lessons.json``: a JSON array, rewritten atomically under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiva import paths
from aiva.errors import AivaError
from aiva.guard.private import open_private
from aiva.models import utcnow

if TYPE_CHECKING:
    from aiva.engine import Engine
    from aiva.tasks.models import Task
    from aiva.tasks.store import TaskStore

WORKDIR = "/workspace/task"
#: A metric whose name holds one of these counts lower as better (tests_failed, errors ...).
LOWER_IS_BETTER = ("fail", "error", "time", "duration", "latency", "loss", "warning")
HISTORY = 10  # successes L1 compares with
MIN_RUNS_FOR_DURATION = 3  # the duration check needs this many successes
DURATION_SLACK = 1.0  # seconds a run may exceed 2x the median by before it counts


@dataclass
class GateResult:
    passed: bool
    gate: str  # "L0" or "L1"
    reason: str | None = None
    metrics: dict[str, float] | None = None


# ---------------------------------------------------------------------- L0


def run_l0(engine: Engine, sandbox: str, gate: str, *, timeout: float | None = None,
           record: Callable[[str, str], None] | None = None) -> GateResult:
    """The gate command through ``/bin/sh -c`` in the task's workspace; ``record(source,
    text)`` keeps what it printed with the task (sources ``gate``, ``gate-stdout``,
    ``gate-stderr``, ``gate-exit``)."""
    if record is not None:
        record("gate", gate)
    res = engine.exec(sandbox, gate, cwd=WORKDIR, timeout=timeout)
    exit_code = getattr(res, "exit_code", 0)
    if record is not None:
        for stream in ("stdout", "stderr"):
            if text := getattr(res, stream, ""):
                record(f"gate-{stream}", text)
        record("gate-exit", str(exit_code))
    if exit_code == 0:
        return GateResult(True, "L0")
    out = (getattr(res, "stderr", "") or getattr(res, "stdout", "") or "").strip()
    tail = out.splitlines()[-1][:200] if out else ""
    timed_out = " (timed out)" if getattr(res, "timed_out", False) else ""
    return GateResult(False, "L0", f"gate `{gate}` exited {exit_code}{timed_out}"
                      + (f": {tail}" if tail else ""))


# ---------------------------------------------------------------------- L1


def read_metrics(engine: Engine, sandbox: str, metrics_file: str) -> dict[str, float]:
    """The numeric values of the task's metrics JSON (an object); others are ignored.
    A missing or unreadable file raises ``ValueError`` naming it."""
    path = metrics_file if metrics_file.startswith("/") else f"{WORKDIR}/{metrics_file}"
    try:
        raw = engine.read_file(sandbox, path)
    except FileNotFoundError:
        raise ValueError(f"the task wrote no metrics file {path}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise ValueError(f"the metrics file {path} is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"the metrics file {path} is not a JSON object")
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def lower_is_better(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in LOWER_IS_BETTER)


def compare(metrics: Mapping[str, float], duration: float | None,
            history: Sequence[tuple[Mapping[str, float], float | None]], threshold: float
            ) -> str | None:
    """Why this run regressed against ``history`` (recent successes: their metrics and
    durations), or None. Pure: the runner and the unit tests call it alike."""
    for name, value in sorted(metrics.items()):
        past = [m[name] for m, _ in history if name in m]
        if not past:
            continue
        if lower_is_better(name):
            best = min(past)
            limit = best * (1 + threshold) if best > 0 else best
            if value > limit:
                return (f"{name} rose to {value:g} from the best {best:g} of the last "
                        f"{len(past)} successes (more than {threshold:.0%})")
        else:
            best = max(past)
            limit = best * (1 - threshold) if best > 0 else best
            if value < limit:
                return (f"{name} fell to {value:g} from the best {best:g} of the last "
                        f"{len(past)} successes (more than {threshold:.0%})")
    durations = [d for _, d in history if d is not None]
    if duration is not None and len(durations) >= MIN_RUNS_FOR_DURATION:
        median = statistics.median(durations)
        if duration > 2 * median and duration - median > DURATION_SLACK:
            return (f"took {duration:.1f} s, more than twice the median {median:.1f} s of "
                    f"the last {len(durations)} successes")
    return None


def history(store: TaskStore, task: Task, default_template: str = "python",
            limit: int = HISTORY) -> list[tuple[dict[str, float], float | None]]:
    """The newest successes of the same kind of task on the same template: their metrics
    (``Task.metrics`` where the model has it) and durations."""
    from aiva.tasks import evaluator

    return [(dict(getattr(t, "metrics", None) or {}), t.duration)
            for t in evaluator.history(store, task, limit, default=default_template)]


def run_l1(engine: Engine, store: TaskStore, task: Task, sandbox: str, *, duration: float,
           threshold: float, default_template: str = "python") -> GateResult:
    assert task.metrics_file is not None
    try:
        metrics = read_metrics(engine, sandbox, task.metrics_file)
    except (ValueError, AivaError) as exc:
        return GateResult(False, "L1", str(exc))
    reason = compare(metrics, duration, history(store, task, default_template), threshold)
    return GateResult(reason is None, "L1", reason, metrics)


# ---------------------------------------------------------------------- lessons


def lessons_path() -> Path:
    return paths.lessons_json()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = open_private(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT)
    with os.fdopen(fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_lessons(path: Path | None = None) -> list[dict[str, Any]]:
    path = path or lessons_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        return []
    return [x for x in data if isinstance(x, dict)] if isinstance(data, list) else []


def add_lesson(task: Task, reason: str, gate: str | None, *, path: Path | None = None,
               **extra: Any) -> dict[str, Any]:
    """Append ``{task, time, reason, gate, command}`` to the lessons file: read, append,
    write a temp file, rename, all under a lock, so concurrent workers lose nothing. An
    unreadable file is kept aside as ``lessons.json.bad`` rather than overwritten."""
    path = path or lessons_path()
    entry: dict[str, Any] = {"task": task.id, "time": utcnow().isoformat(), "reason": reason,
                             "gate": gate, "command": list(task.command), **extra}
    with _locked(path):
        lessons: list[Any] = []
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, list):
                    raise ValueError("not an array")
                lessons = loaded
            except ValueError:
                os.replace(path, path.with_name(path.name + ".bad"))
        lessons.append(entry)
        _write_atomic(path, lessons)
    return entry


def _write_atomic(path: Path, data: Iterable[Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(list(data), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
