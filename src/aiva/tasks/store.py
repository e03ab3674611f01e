"""Tasks in the state db (SQLite, WAL), beside the sandboxes, safe for several processes.

Every change is read-modify-write inside ``BEGIN IMMEDIATE``, so two schedulers (or the
CLI and the daemon) never claim the same task or overwrite each other's change. The row
keeps the whole model as JSON plus the columns the queue is ordered and filtered by.

The store records the events of the changes it makes itself: ``task_queued`` (add,
import), ``task_started`` (claim), ``task_retried`` (requeue), ``task_failed`` (requeue
past ``max_attempts``) and ``task_cancelled`` (cancel). Everything else (succeeded, gates,
rollbacks ...) is recorded by whoever decides it (the runner). Data always has ``task``.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from aiva import paths
from aiva.engine.store import SqliteFile, Store
from aiva.errors import InvalidValue
from aiva.models import Event, utcnow
from aiva.plugins import manager as plugins
from aiva.tasks.models import (
    FINISHED,
    PRIORITY_RANK,
    Decision,
    Task,
    TaskNotFound,
    TaskState,
    TaskStateError,
)

log = logging.getLogger("aiva.tasks")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    prio INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_queue ON tasks (state, prio, created_at, seq);
CREATE TABLE IF NOT EXISTS task_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_ORDER = "ORDER BY prio, created_at, seq"
Tasks = list[Task]  # `list` is a method of TaskStore


class TaskStore(SqliteFile):
    """``TaskStore()`` opens this ``AIVA_HOME``'s state db; ``path`` another one."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__(path or paths.state_db(), SCHEMA)
        self._events: Store | None = None
        self._events_lock = threading.Lock()

    def close(self) -> None:
        super().close()
        if self._events is not None:
            self._events.close()

    # ------------------------------------------------------------------ events

    def record(self, kind: str, **data: Any) -> Event:
        """An event not about one sandbox (``budget_alert``, ``task_queued`` ...) in the
        same stream as the engine's, handed to plugins like the engine's (never call it
        inside a transaction of this store)."""
        with self._events_lock:
            if self._events is None:
                self._events = Store(self.path)
        event = self._events.record(kind, None, **data)
        plugins.call_hook("on_event", event=event)
        return event

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _task(row: sqlite3.Row) -> Task:
        return Task.model_validate_json(row["data"])

    @staticmethod
    def _values(task: Task) -> tuple[Any, ...]:
        return (task.state.value, PRIORITY_RANK[task.priority], task.created_at.isoformat(),
                task.finished_at.isoformat() if task.finished_at else None,
                task.model_dump_json())

    def _insert(self, db: sqlite3.Connection, task: Task) -> None:
        try:
            db.execute("INSERT INTO tasks (state, prio, created_at, finished_at, data, id) "
                       "VALUES (?,?,?,?,?,?)", (*self._values(task), task.id))
        except sqlite3.IntegrityError as exc:
            raise InvalidValue(f"a task '{task.id}' already exists",
                               hint=f"see it with `aiva task show {task.id}`") from exc

    def _write(self, db: sqlite3.Connection, task: Task) -> None:
        db.execute("UPDATE tasks SET state=?, prio=?, created_at=?, finished_at=?, data=? "
                   "WHERE id=?", (*self._values(task), task.id))

    def _read(self, db: sqlite3.Connection, task_id: str) -> Task:
        row = db.execute("SELECT data FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise TaskNotFound(task_id)
        return self._task(row)

    # ------------------------------------------------------------------ api

    def add(self, task: Task) -> Task:
        """Store a new task (id unique); records ``task_queued`` if it is queued."""
        with self._tx() as db:
            self._insert(db, task)
        if task.state == TaskState.queued:
            self.record("task_queued", task=task.id, priority=task.priority.value,
                        command=task.command)
        return task

    def get(self, task_id: str) -> Task:
        return self._read(self._db, task_id)

    def find(self, task_id: str) -> Task | None:
        try:
            return self.get(task_id)
        except TaskNotFound:
            return None

    def list(self, state: TaskState | str | Iterable[TaskState | str] | None = None
             ) -> Tasks:
        """Tasks in queue order (priority, then oldest first); ``state``: one or several."""
        if state is None:
            rows = self._db.execute(f"SELECT data FROM tasks {_ORDER}").fetchall()
        else:
            states = [TaskState(state).value] if isinstance(state, str) else \
                [TaskState(s).value for s in state]
            rows = self._db.execute(
                f"SELECT data FROM tasks WHERE state IN ({','.join('?' * len(states))}) "
                f"{_ORDER}", states).fetchall()
        return [self._task(r) for r in rows]

    def history(self) -> Tasks:
        """Every task in the order it was added."""
        rows = self._db.execute("SELECT data FROM tasks ORDER BY seq").fetchall()
        return [self._task(r) for r in rows]

    def finished_since(self, since: datetime) -> Tasks:
        rows = self._db.execute("SELECT data FROM tasks WHERE finished_at >= ? ORDER BY seq",
                                (since.isoformat(),)).fetchall()
        return [self._task(r) for r in rows]

    def change(self, task_id: str, fn: Callable[[Task], None]) -> Task:
        """Read, change (``fn`` edits the task or raises) and write one task, atomically."""
        with self._tx() as db:
            task = self._read(db, task_id)
            fn(task)  # assignments are validated by the model
            self._write(db, task)
        return task

    def update(self, task_id: str, **fields: Any) -> Task:
        """Set fields (validated); a move to a finished state sets ``finished_at`` if unset."""
        unknown = set(fields) - set(Task.model_fields)
        if unknown:
            raise TypeError(f"Task has no field {', '.join(sorted(unknown))}")

        def edit(task: Task) -> None:
            for key, value in fields.items():
                setattr(task, key, value)
            if TaskState(task.state) in FINISHED and task.finished_at is None:
                task.finished_at = utcnow()

        return self.change(task_id, edit)

    def claim(self, task_id: str) -> Task | None:
        """This task, if still queued: -> running, attempts + 1, started_at now."""
        with self._tx() as db:
            task = self._read(db, task_id)
            if task.state != TaskState.queued:
                return None
            self._start(db, task)
        self._started(task)
        return task

    def claim_next(self, allow: Callable[[Task], bool] | None = None) -> Task | None:
        """Atomically take the best-ranked queued task (priority, then FIFO) and mark it
        running with attempts + 1. ``allow`` may pass over tasks (e.g. one whose
        template has no room); it runs inside the write transaction, so it must not write
        to this database (nor record events). None if nothing is (allowed to be) queued.
        """
        with self._tx() as db:
            rows = db.execute(f"SELECT data FROM tasks WHERE state = ? {_ORDER}",
                              (TaskState.queued.value,))
            task = None
            for row in rows:
                candidate = self._task(row)
                if allow is None or allow(candidate):
                    task = candidate
                    break
            rows.close()
            if task is None:
                return None
            self._start(db, task)
        self._started(task)
        return task

    def _start(self, db: sqlite3.Connection, task: Task) -> None:
        task.state = TaskState.running
        task.attempts += 1
        task.started_at = utcnow()
        task.finished_at = None
        task.exit_code = None
        self._write(db, task)

    def _started(self, task: Task) -> None:
        self.record("task_started", task=task.id, attempt=task.attempts)

    def requeue(self, task_id: str, reason: str) -> Task:
        """Put a running task back in the queue after its sandbox died (``task_retried``),
        keeping its rank; once it has had ``max_attempts`` attempts it fails instead
        (``task_failed``). Returns the task, so the caller sees which."""
        previous: dict[str, Any] = {}

        def back(task: Task) -> None:
            if task.state in FINISHED:
                raise TaskStateError(task.id, task.state.value, "requeue")
            previous["sandbox"] = task.sandbox
            task.reason = reason
            if task.attempts >= task.max_attempts:
                task.state = TaskState.failed
                task.reason = f"gave up after {task.attempts} attempts: {reason}"
                task.finished_at = utcnow()
            else:
                task.state = TaskState.queued
                task.sandbox = None
                task.started_at = None

        task = self.change(task_id, back)
        if task.state == TaskState.failed:
            self.record("task_failed", task=task.id, reason=task.reason,
                        attempts=task.attempts, sandbox=previous["sandbox"])
        else:
            self.record("task_retried", task=task.id, reason=reason, attempt=task.attempts,
                        **{"from": previous["sandbox"]})
        return task

    def cancel(self, task_id: str) -> Task:
        """Queued or awaiting approval: cancelled now. Running: marked cancelled, and
        the runner, which checks the state, stops it. Finished: refused."""

        def stop(task: Task) -> None:
            if task.state in FINISHED:
                raise TaskStateError(task.id, task.state.value, "cancel",
                                     hint="only queued, running or awaiting tasks can be "
                                          "cancelled")
            previous["state"] = task.state.value
            task.state = TaskState.cancelled
            task.reason = task.reason or "cancelled by a person"
            task.finished_at = utcnow()

        previous: dict[str, Any] = {}
        task = self.change(task_id, stop)
        self.record("task_cancelled", task=task.id, was=previous["state"])
        return task

    def decide(self, task_id: str, decision: str, reason: str | None = None) -> Task:
        """A person's approve/reject of a task awaiting approval; the runner acts on it."""
        if decision not in ("approve", "reject"):
            raise InvalidValue(f"'{decision}' is not a decision", hint="approve or reject")

        def set_decision(task: Task) -> None:
            if task.state != TaskState.awaiting_approval:
                raise TaskStateError(task.id, task.state.value, decision,
                                     hint="only a task awaiting approval can be approved "
                                          "or rejected")
            if task.decision is not None:
                done = {"approve": "approved", "reject": "rejected"}[task.decision]
                raise TaskStateError(task.id, f"already {done}", decision)
            task.decision = cast(Decision, decision)
            if decision == "reject":
                task.reason = f"rejected: {reason}" if reason else "rejected by a person"

        return self.change(task_id, set_decision)

    # ------------------------------------------------------------------ meta

    def once(self, key: str, value: str) -> bool:
        """Set ``key`` to ``value`` unless it already is; True if this call set it (so
        something happens once per value, e.g. once per day, across processes)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM task_meta WHERE key = ?", (key,)).fetchone()
            if row is not None and row["value"] == value:
                return False
            db.execute("INSERT OR REPLACE INTO task_meta VALUES (?, ?)", (key, value))
        return True

    # ------------------------------------------------------------------ JSONL

    def export_jsonl(self) -> str:
        """Every task, one JSON object (the model) per line, in the order added."""
        return "".join(t.model_dump_json() + "\n" for t in self.history())

    def import_jsonl(self, lines: str | Iterable[str]) -> Tasks:
        """Add the tasks of JSON lines (blank lines skipped). All lines are checked
        first: one bad line (or an id already stored) adds nothing and names the line."""
        if isinstance(lines, str):
            lines = lines.splitlines()
        tasks: builtins.list[tuple[int, Task]] = []
        seen: dict[str, int] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                task = Task.model_validate_json(line)
            except ValidationError as exc:
                raise InvalidValue(f"line {n}: {_first_error(exc)}",
                                   hint="one task per line, as `aiva task export` writes "
                                        "them (docs/TASKS.md)") from None
            if task.id in seen:
                raise InvalidValue(f"line {n}: task {task.id} is also on line {seen[task.id]}")
            seen[task.id] = n
            tasks.append((n, task))
        with self._tx() as db:
            for n, task in tasks:
                try:
                    self._insert(db, task)
                except InvalidValue as exc:
                    raise InvalidValue(f"line {n}: {exc.message}", hint=exc.hint) from None
        for _, task in tasks:
            if task.state == TaskState.queued:
                self.record("task_queued", task=task.id, priority=task.priority.value,
                            command=task.command, imported=True)
        return [t for _, t in tasks]


def _first_error(exc: ValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return str(exc)
    err = errs[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "json_invalid":
        return f"not valid JSON ({err.get('ctx', {}).get('error', msg)})"
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"
