"""A task: one command to run in a sandbox of the pool, with its gates and its outcome.

The model's JSON (``Task.model_dump_json()``) is also the line format of
``aiva task import|export`` (docs/TASKS.md).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiva.errors import AivaError
from aiva.models import utcnow

TASK_ID = r"^t-[0-9a-f]{8}$"


def new_task_id() -> str:
    return f"t-{secrets.token_hex(4)}"


class Priority(StrEnum):
    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"

    @property
    def rank(self) -> int:
        """0 for critical ... 3 for low: lower runs first."""
        return PRIORITY_RANK[self]


PRIORITY_RANK: dict[Priority, int] = {Priority.critical: 0, Priority.high: 1,
                                      Priority.normal: 2, Priority.low: 3}


class TaskState(StrEnum):
    queued = "queued"
    running = "running"
    awaiting_approval = "awaiting_approval"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    rolled_back = "rolled_back"


#: States a task never leaves.
FINISHED: frozenset[TaskState] = frozenset({TaskState.succeeded, TaskState.failed,
                                            TaskState.cancelled, TaskState.rolled_back})
#: Finished states that count as an outcome of running (cancelled ones do not).
OUTCOMES: frozenset[TaskState] = frozenset({TaskState.succeeded, TaskState.failed,
                                            TaskState.rolled_back})

Decision = Literal["approve", "reject"]


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    id: str = Field(default_factory=new_task_id, pattern=TASK_ID)  # "t-" + 8 hex
    name: str | None = None  # groups tasks in `aiva eval report` (default: the command)
    priority: Priority = Priority.normal
    command: list[str] = Field(min_length=1)  # argv; a shell string is ["/bin/sh", "-c", s]
    template: str | None = None  # default: tasks.default_template ("python")
    image: str | None = None
    workspace: str | None = None  # host dir: pushed to /workspace/task, pulled back after
    gate: str | None = None  # L0: shell command run after the task; exit 0 = pass
    metrics_file: str | None = None  # L1: JSON the task writes (relative to /workspace/task)
    approve: bool = False  # L2: hold for a person after the gates pass
    max_attempts: int = Field(default=3, ge=1)  # retries when the sandbox dies mid-run
    timeout: float | None = Field(default=None, gt=0)  # seconds for the command
    state: TaskState = TaskState.queued
    attempts: int = Field(default=0, ge=0)
    sandbox: str | None = None  # the sandbox of the current/last attempt
    exit_code: int | None = None
    reason: str | None = None  # why it failed / was rolled back / refused / rejected
    decision: Decision | None = None  # a person's answer while awaiting_approval
    metrics: dict[str, float] | None = None  # what the L1 gate read from metrics_file
    cost: float = Field(default=0.0, ge=0)  # price table x running seconds
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    held_at: datetime | None = None  # when it began to wait for a person (L2)
    held_seconds: float = Field(default=0.0, ge=0)  # time spent waiting for a person

    @field_validator("created_at", "started_at", "finished_at", "held_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """Times are kept in UTC (a time without a zone is taken as UTC)."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def rank(self) -> tuple[int, datetime]:
        """Sort key of the queue: priority first, then first come first served."""
        return PRIORITY_RANK[self.priority], self.created_at

    @property
    def kind(self) -> str:
        """What `aiva eval report` groups by: the name, else the command joined."""
        return self.name or " ".join(self.command)

    def template_name(self, default: str = "python") -> str:
        return self.template or self.image or default

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish, once finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())

    @property
    def run_seconds(self) -> float | None:
        """The duration less the time it waited for a person: what the task itself took
        (an evaluator's p95 must not count how long an approval took)."""
        d = self.duration
        return None if d is None else max(0.0, d - self.held_seconds)


class TaskNotFound(AivaError, LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task '{task_id}'",
                         hint="list tasks with `aiva task ls`")
        self.task_id = task_id


class TaskStateError(AivaError):
    """An operation the task's state does not allow (cancel a finished task ...)."""

    def __init__(self, task_id: str, state: str, action: str, hint: str | None = None) -> None:
        super().__init__(f"cannot {action} task {task_id}: it is {state}", hint=hint)
        self.task_id = task_id
        self.state = state
        self.action = action


class BudgetExceeded(AivaError):
    """A task refused by the budget (``tasks.daily_budget`` / ``tasks.task_budget``)."""
