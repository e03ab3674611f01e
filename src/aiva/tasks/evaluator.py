"""How tasks did: per kind of task (its ``name``, else its command) or per template, the
count, success rate, duration p50/p95, cost and cost per success (``aiva eval report``).

Only tasks that ran to an outcome count (succeeded, failed, rolled back); queued, running,
held and cancelled ones do not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

from aiva.errors import InvalidValue
from aiva.tasks.models import OUTCOMES, Task, TaskState
from aiva.tasks.store import TaskStore

By = Literal["task", "template"]


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the closest ranks; None if empty."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def key_of(task: Task, by: str, default: str = "python") -> str:
    if by == "task":
        return task.kind
    if by == "template":
        return task.template_name(default)
    raise InvalidValue(f"cannot report by '{by}'", hint="use --by task or --by template")


def summarize(key: str, tasks: list[Task]) -> dict[str, Any]:
    ok = [t for t in tasks if t.state == TaskState.succeeded]
    durations = [d for t in tasks if (d := t.run_seconds) is not None]  # without L2 waits
    cost = sum(t.cost for t in tasks)
    p50, p95 = percentile(durations, 50), percentile(durations, 95)
    return {
        "key": key,
        "count": len(tasks),
        "succeeded": len(ok),
        "success_rate": round(len(ok) / len(tasks), 4) if tasks else None,
        "p50_seconds": None if p50 is None else round(p50, 3),
        "p95_seconds": None if p95 is None else round(p95, 3),
        "cost": round(cost, 6),
        "cost_per_success": round(cost / len(ok), 6) if ok else None,
    }


def report(store: TaskStore, by: str = "task", *, default: str = "python"
           ) -> list[dict[str, Any]]:
    """One row per kind (``by="task"``) or template, in the order first seen."""
    groups: dict[str, list[Task]] = {}
    for task in store.history():
        key = key_of(task, by, default)  # checks ``by`` even with no tasks
        if task.state in OUTCOMES:
            groups.setdefault(key, []).append(task)
    if not groups:
        key_of(Task(command=["true"]), by, default)
    return [summarize(key, tasks) for key, tasks in groups.items()]


def history(store: TaskStore, task: Task, limit: int = 10, *, default: str = "python"
            ) -> list[Task]:
    """The last ``limit`` successes of the same kind on the same template, newest first
    (not ``task`` itself): what a new run is compared with (L1 gate, cost estimate)."""
    kind, template = task.kind, task.template_name(default)
    same = [t for t in store.list(TaskState.succeeded)
            if t.id != task.id and t.kind == kind and t.template_name(default) == template]
    same.sort(key=lambda t: t.finished_at or t.created_at, reverse=True)
    return same[:limit]
