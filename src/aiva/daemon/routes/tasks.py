"""The task queue over HTTP, for the dashboard's Tasks view: list and show tasks,
approve / reject (L2) and cancel them, and ``evaluator.report``.

Thin calls into :class:`~aiva.tasks.store.TaskStore`, exactly as ``aiva task ...``
(``cli/task_cmd.py``) makes them, so the errors are the same: an unknown id is a
``TaskNotFound`` (404), a state that does not allow the action a ``TaskStateError``
(409), both through the app's ``AivaError`` handler. Each call opens the state db on its
worker thread and closes it again, like the CLI. The daemon's scheduler acts on a
decision at its next tick.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, Field

from aiva.daemon import wire
from aiva.daemon.app import Eng
from aiva.daemon.bridge import run_sync
from aiva.engine import Engine
from aiva.tasks.models import Task, TaskState
from aiva.tasks.store import TaskStore

router = APIRouter(tags=["tasks"])
T = TypeVar("T")


class RejectBody(BaseModel):
    reason: str | None = Field(None, description="why (kept as a lesson)")


class EvalRow(BaseModel):
    """One row of ``aiva eval report``: a kind of task, or a template."""

    key: str
    count: int
    succeeded: int
    success_rate: float | None
    p50_seconds: float | None
    p95_seconds: float | None
    cost: float
    cost_per_success: float | None


def _with_store(fn: Callable[[TaskStore], T]) -> T:
    store = TaskStore()
    try:
        return fn(store)
    finally:
        store.close()


@router.get(f"{wire.API}/tasks")
async def list_tasks(state: Annotated[TaskState | None, Query(description="only this state")]
                     = None) -> list[Task]:
    """Every task (or those in ``state``), newest first."""

    def build(store: TaskStore) -> list[Task]:
        tasks = store.list(state)
        tasks.sort(key=lambda t: t.created_at, reverse=True)
        return tasks

    return await run_sync(_with_store, build)


@router.get(f"{wire.API}/tasks/{{task_id}}")
async def get_task(task_id: str) -> Task:
    return await run_sync(_with_store, lambda s: s.get(task_id))


@router.post(f"{wire.API}/tasks/{{task_id}}/approve")
async def approve_task(task_id: str) -> Task:
    """A task awaiting approval: the runner keeps its result (``aiva task approve``)."""
    return await run_sync(_with_store, lambda s: s.decide(task_id, "approve"))


@router.post(f"{wire.API}/tasks/{{task_id}}/reject")
async def reject_task(task_id: str, body: Annotated[RejectBody | None, Body()] = None
                      ) -> Task:
    """A task awaiting approval: the runner rolls it back (``aiva task reject``)."""
    reason = body.reason if body is not None else None
    return await run_sync(_with_store, lambda s: s.decide(task_id, "reject", reason or None))


@router.post(f"{wire.API}/tasks/{{task_id}}/cancel")
async def cancel_task(task_id: str) -> Task:
    """Queued or held: cancelled now; running: its runner stops it (``aiva task cancel``)."""
    return await run_sync(_with_store, lambda s: s.cancel(task_id))


@router.get(f"{wire.API}/eval")
async def eval_report(by: Literal["task", "template"] = "task", eng: Engine = Eng
                      ) -> list[EvalRow]:
    """``aiva eval report``: per kind of task or per template, the finished runs."""
    from aiva.tasks import evaluator

    default = eng.config.tasks.default_template
    rows = await run_sync(_with_store, lambda s: evaluator.report(s, by, default=default))
    return [EvalRow(**r) for r in rows]
