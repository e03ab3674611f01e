"""Run one task in a sandbox of the warm pool: snapshot, push, command, gates, then keep
the result, roll it back, or hold it for a person.

``run_task`` is what a scheduler worker calls for a task it has claimed (state running):

1. claim a sandbox of the task's template from the pool;
2. snapshot it as ``pre-<task id>``;
3. push the workspace to ``/workspace/task``, run the command there (background exec,
   polled, so a cancel or a scheduler shutdown stops it);
4. gates: a non-zero exit fails the task; L0 (``gate``) and L1 (``metrics_file`` against
   history) roll it back when they fail (``aiva.tasks.gates``);
5. a failure restores ``pre-<id>`` (the snapshot is kept) and appends a lesson;
6. passed with ``approve``: awaiting_approval, the sandbox held until a decision
   (:func:`finish_decision`, driven by the scheduler);
7. passed: pull the workspace back, succeeded;
8. the sandbox goes back to the pool (reset to clean) unless held;
9. a sandbox that dies mid-run is destroyed, and the task goes on in another one
   (``task_retried`` names both) until ``max_attempts``.

The task's cost is the price of its sandbox (``cost`` table x CPUs and memory) for the
seconds it held it, summed over attempts.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiva.agent.protocol import FrameKind
from aiva.agent_client import ExecResult, ProcessHandle
from aiva.config import Config
from aiva.errors import (
    AgentError,
    AgentUnreachable,
    AivaError,
    BackendError,
    CommandTimeout,
    InvalidTransition,
    SandboxNotFound,
)
from aiva.models import State, utcnow
from aiva.observe.collector import GIB, price_for
from aiva.tasks import gates
from aiva.tasks.gates import WORKDIR
from aiva.tasks.models import FINISHED, Task, TaskState
from aiva.tasks.output import TaskOutput
from aiva.tasks.pool import PoolExhausted

if TYPE_CHECKING:
    from aiva.engine import Engine
    from aiva.tasks.store import TaskStore

log = logging.getLogger("aiva.tasks")

POLL = 0.5  # seconds between checks for a cancel while the command runs
#: What a dying sandbox raises at us: the agent link drops, the backend loses it.
_SANDBOX_ERRORS = (AgentError, BackendError, InvalidTransition, SandboxNotFound)


class LeaseLike(Protocol):
    name: str
    template: str


class PoolLike(Protocol):
    """What the runner needs of ``aiva.tasks.pool.WarmPool``."""

    def claim(self, template: str, timeout: float = ...) -> Any: ...
    def release(self, lease: Any, *, reset: bool = True) -> None: ...


class SandboxDied(Exception):
    """The attempt's sandbox stopped answering or stopped running."""


class Interrupted(Exception):
    """The task was cancelled, or the scheduler is shutting down."""


# ---------------------------------------------------------------------- helpers


def _event(engine: Engine, store: TaskStore, on: str | None, kind: str, task: Task,
           **data: Any) -> None:
    """A task event: about its sandbox ``on`` when it still exists, else a global one."""
    data = {"task": task.id, **data}
    try:
        if on is not None:
            engine.record(on, kind, **data)
            return
    except SandboxNotFound:
        pass
    store.record(kind, **data)


def _cost(engine: Engine, sandbox: str, seconds: float, config: Config) -> float:
    """The price of holding ``sandbox`` for ``seconds`` (0 if it is already gone)."""
    try:
        spec = engine.get(sandbox).spec
    except SandboxNotFound:
        return 0.0
    p = price_for(spec.backend, config)
    return seconds / 3600.0 * (spec.cpus * p.cpu_hour + spec.memory / GIB * p.gb_hour)


def _add_cost(engine: Engine, store: TaskStore, task: Task, sandbox: str, seconds: float,
              config: Config) -> Task:
    extra = _cost(engine, sandbox, seconds, config)
    return store.change(task.id, lambda t: setattr(t, "cost", round(t.cost + extra, 9)))


def _finish(store: TaskStore, task: Task, state: TaskState, **fields: Any) -> Task:
    """Move a running task to ``state`` unless someone cancelled it meanwhile."""

    def move(t: Task) -> None:
        if t.state in FINISHED:
            return  # cancelled under us: that word stands
        now = utcnow()
        if t.state == TaskState.awaiting_approval and t.held_at is not None:
            t.held_seconds += max(0.0, (now - t.held_at).total_seconds())
            t.held_at = None
        if state == TaskState.awaiting_approval:
            t.held_at = now
        t.state = state
        for key, value in fields.items():
            setattr(t, key, value)
        if state in FINISHED:
            t.finished_at = utcnow()

    return store.change(task.id, move)


def _dead(engine: Engine, sandbox: str, exc: BaseException) -> bool:
    """Did ``exc`` come from the sandbox dying (rather than from the task)?"""
    if isinstance(exc, AgentUnreachable | SandboxNotFound):
        return True
    try:
        sb = engine.reconcile(engine.get(sandbox))
    except SandboxNotFound:
        return True
    except AivaError:
        return True
    return sb.state != State.RUNNING


def _tail(text: str, n: int = 200) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:n] if lines else ""


def _settings(config: Config) -> tuple[str, float, float]:
    tasks, pool = config.tasks, getattr(config, "pool", None)
    return (tasks.default_template, float(tasks.regression_threshold),
            float(getattr(pool, "claim_timeout", 60.0)))


# ---------------------------------------------------------------------- run


def run_task(engine: Engine, pool: PoolLike, store: TaskStore, task: Task, *,
             config: Config | None = None, stop: threading.Event | None = None,
             on_hold: Callable[[Task, Any], None] | None = None) -> Task:
    """Run a claimed (running) task to its end, or to awaiting_approval; returns it.

    ``stop`` set: the command is killed and the task goes back to the queue, its
    attempt not counted. ``on_hold(task, lease)`` is told of a sandbox held for a person.
    """
    config = config or engine.config
    default_template, _, claim_timeout = _settings(config)
    template = task.template_name(default_template)
    previous: str | None = None
    while True:
        try:
            lease = pool.claim(template, timeout=claim_timeout)
        except PoolExhausted as exc:
            return _back_to_queue(store, task, f"no pool sandbox: {exc}")
        except AivaError as exc:  # the pool cannot make a sandbox of this template
            task = _finish(store, task, TaskState.failed, reason=f"no sandbox: {exc}")
            _event(engine, store, None, "task_failed", task, reason=task.reason)
            return task
        began = time.monotonic()
        task = store.update(task.id, sandbox=lease.name, started_at=utcnow())
        if previous is not None:
            _event(engine, store, lease.name, "task_retried", task, attempt=task.attempts,
                   reason=task.reason, **{"from": previous, "to": lease.name})
        try:
            return _attempt(engine, pool, store, task, lease, config, stop, on_hold, began)
        except SandboxDied as died:
            reason = f"sandbox {lease.name} died: {died}"
            log.warning("task %s: %s", task.id, reason)
            task = _add_cost(engine, store, task, lease.name, time.monotonic() - began, config)
            _release(pool, lease, reset=False)
            if task.state in FINISHED:
                return task
            if task.attempts >= task.max_attempts:
                task = _finish(store, task, TaskState.failed,
                               reason=f"gave up after {task.attempts} attempts: {reason}")
                _event(engine, store, None, "task_failed", task, reason=task.reason,
                       attempts=task.attempts, sandbox=lease.name)
                return task
            task = store.update(task.id, attempts=task.attempts + 1, reason=reason)
            previous = lease.name


def _back_to_queue(store: TaskStore, task: Task, reason: str) -> Task:
    """Not the task's fault (no sandbox free, shutting down): queued again, the attempt
    not counted."""

    def back(t: Task) -> None:
        if t.state != TaskState.running:
            return
        t.state = TaskState.queued
        t.attempts = max(0, t.attempts - 1)
        t.started_at = None
        t.sandbox = None
        t.reason = reason

    return store.change(task.id, back)


def _retire(pool: PoolLike, lease: Any, task: Task) -> None:
    """A rolled-back task's sandbox leaves the pool, stopped, with ``pre-<id>`` kept for
    debugging (its name is in the lesson); a pool without ``retire`` resets it."""
    retire = getattr(pool, "retire", None)
    if retire is None:
        _release(pool, lease, reset=True)
        return
    try:
        retire(lease, reason=f"task {task.id} {task.state}: snapshot pre-{task.id} kept")
    except AivaError as exc:
        log.warning("cannot retire %s: %s", getattr(lease, "name", lease), exc)


def _release(pool: PoolLike, lease: Any, *, reset: bool) -> None:
    try:
        pool.release(lease, reset=reset)
    except Exception as exc:  # the pool's maintain() replaces what it could not reset
        log.warning("cannot release %s: %s", getattr(lease, "name", lease), exc)


def _attempt(engine: Engine, pool: PoolLike, store: TaskStore, task: Task, lease: Any,
             config: Config, stop: threading.Event | None,
             on_hold: Callable[[Task, Any], None] | None, began: float) -> Task:
    name: str = lease.name
    default_template, threshold, _ = _settings(config)
    release, reset = True, True
    try:
        try:
            engine.snapshot(name, f"pre-{task.id}")
            engine.mkdir(name, WORKDIR)
            if task.workspace:
                engine.sync(name, task.workspace, WORKDIR, direction="push")
            result = _run_command(engine, store, task, name, stop)
            task = store.update(task.id, exit_code=result.exit_code)
            if result.exit_code != 0:
                why = f"exit code {result.exit_code}" + \
                    (" (timed out)" if result.timed_out else "")
                tail = _tail(result.stderr or result.stdout)
                # a plain failure: the lesson is written, the sandbox reset (only a
                # gate's rollback keeps its sandbox and snapshot for debugging)
                return _roll_back(engine, store, task, name, TaskState.failed, gate=None,
                                  reason=why + (f": {tail}" if tail else ""), config=config,
                                  began=began)
            for check in _gates(engine, store, task, name, threshold, default_template):
                if not check.passed:
                    _event(engine, store, name, "gate_failed", task, gate=check.gate,
                           reason=check.reason)
                    task = _roll_back(engine, store, task, name, TaskState.rolled_back,
                                      gate=check.gate, reason=str(check.reason),
                                      config=config, began=began)
                    release = False
                    _retire(pool, lease, task)
                    return task
                if check.metrics is not None and "metrics" in Task.model_fields:
                    task = store.update(task.id, metrics=check.metrics)
                _event(engine, store, name, "gate_passed", task, gate=check.gate)
            task = _add_cost(engine, store, task, name, time.monotonic() - began, config)
            if task.approve:
                task = _finish(store, task, TaskState.awaiting_approval)
                if task.state == TaskState.awaiting_approval:
                    release = False
                    keep = getattr(pool, "keep", None)
                    if keep is not None:  # held across a daemon restart too
                        keep(lease)
                    _event(engine, store, name, "task_awaiting_approval", task)
                    if on_hold is not None:
                        on_hold(task, lease)
                return task
            return _succeed(engine, store, task, name)
        except (AivaError, OSError) as exc:
            if isinstance(exc, _SANDBOX_ERRORS) and _dead(engine, name, exc):
                release = False  # the caller destroys it
                raise SandboxDied(str(exc)) from exc
            task = _add_cost(engine, store, task, name, time.monotonic() - began, config)
            task = _finish(store, task, TaskState.failed, reason=f"{type(exc).__name__}: {exc}")
            _event(engine, store, name, "task_failed", task, reason=task.reason)
            return task
        except Interrupted as why:
            task = _add_cost(engine, store, task, name, time.monotonic() - began, config)
            if store.get(task.id).state == TaskState.cancelled:
                return store.get(task.id)
            return _back_to_queue(store, task, str(why))
    finally:
        if release:
            _release(pool, lease, reset=reset)


def _run_command(engine: Engine, store: TaskStore, task: Task, name: str,
                 stop: threading.Event | None) -> ExecResult:
    """The command in the background, waited for in steps: between them a cancel (the
    task's state in the store) or a shutdown (``stop``) kills it. What it prints is
    kept with the task (``TaskOutput``), not only in the sandbox's log."""
    if store.get(task.id).state != TaskState.running:
        raise Interrupted("cancelled before the command started")
    out = TaskOutput(task.id)
    out.write("cmd", shlex.join(task.command) + f"   (attempt {task.attempts}, in {name})")
    decoders = {FrameKind.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
                FrameKind.STDERR: codecs.getincrementaldecoder("utf-8")("replace")}

    def keep(kind: int, data: bytes) -> None:
        if text := decoders[kind].decode(data):
            out.write("stderr" if kind == FrameKind.STDERR else "stdout", text)

    try:
        handle = engine.exec(name, task.command, cwd=WORKDIR, timeout=task.timeout,
                             background=True, on_bytes=keep)
        assert isinstance(handle, ProcessHandle)
        while True:
            try:
                result = handle.wait(timeout=POLL)
            except CommandTimeout:
                _check_interrupt(store, task, stop, handle, out)
                continue
            out.write("exit", str(result.exit_code)
                      + (" (timed out)" if result.timed_out else ""))
            return result
    finally:
        out.close()


def _check_interrupt(store: TaskStore, task: Task, stop: threading.Event | None,
                     handle: ProcessHandle, out: TaskOutput) -> None:
    """Between two waits: a cancel or a shutdown kills the command."""
    why = None
    if store.get(task.id).state == TaskState.cancelled:
        why = "cancelled"
    elif stop is not None and stop.is_set():
        why = "the scheduler stopped"
    if why is not None:
        with contextlib.suppress(AivaError):
            handle.kill()
        with contextlib.suppress(AivaError):
            handle.wait(timeout=5)
        out.write("exit", f"killed: {why}")
        raise Interrupted(why)


def _gates(engine: Engine, store: TaskStore, task: Task, name: str, threshold: float,
           default_template: str) -> Any:
    """The gates the task asks for, one result at a time (stop at the first failure)."""
    if task.gate:
        out = TaskOutput(task.id)
        try:
            yield gates.run_l0(engine, name, task.gate, timeout=task.timeout,
                               record=out.write)
        finally:
            out.close()
    if task.metrics_file:
        now = utcnow()
        duration = (now - task.started_at).total_seconds() if task.started_at else None
        yield gates.run_l1(engine, store, task, name, duration=duration or 0.0,
                           threshold=threshold, default_template=default_template)


def _roll_back(engine: Engine, store: TaskStore, task: Task, name: str, state: TaskState, *,
               gate: str | None, reason: str, config: Config, began: float) -> Task:
    """Put the sandbox back to ``pre-<id>`` (kept), write the lesson, end the task."""
    engine.restore(name, f"pre-{task.id}")
    gates.add_lesson(task, reason, gate, sandbox=name, snapshot=f"pre-{task.id}")
    task = _add_cost(engine, store, task, name, time.monotonic() - began, config)
    task = _finish(store, task, state, reason=reason)
    kind = "task_rolled_back" if state == TaskState.rolled_back else "task_failed"
    _event(engine, store, name, kind, task, reason=reason, gate=gate,
           snapshot=f"pre-{task.id}", exit_code=task.exit_code)
    return task


def _succeed(engine: Engine, store: TaskStore, task: Task, name: str, **data: Any) -> Task:
    if task.workspace:
        Path(task.workspace).mkdir(parents=True, exist_ok=True)
        engine.sync(name, task.workspace, WORKDIR, direction="pull")
    task = _finish(store, task, TaskState.succeeded, reason=None)
    if task.state == TaskState.succeeded:
        _event(engine, store, name, "task_succeeded", task, exit_code=task.exit_code,
               cost=task.cost, attempts=task.attempts, **data)
    return task


# ---------------------------------------------------------------------- L2


def finish_decision(engine: Engine, pool: PoolLike, store: TaskStore, task: Task, lease: Any,
                    *, config: Config | None = None) -> Task:
    """End a task held for a person, now that ``task.decision`` is set (or it was
    cancelled): approve -> results pulled, succeeded; reject -> ``pre-<id>`` restored, a
    lesson, rolled_back. The held sandbox goes back to the pool either way."""
    config = config or engine.config
    name: str = lease.name
    task = store.get(task.id)
    if task.state == TaskState.awaiting_approval and task.decision is None:
        return task  # still waiting: the sandbox stays held
    began = time.monotonic()
    reset, retired = True, False
    try:
        if task.state != TaskState.awaiting_approval:
            return task  # cancelled (or finished elsewhere): only the sandbox to give back
        try:
            if task.decision == "approve":
                task = _finish(store, task, TaskState.running)  # back from the hold
                return _succeed(engine, store, task, name, approved=True)
            task = _finish(store, task, TaskState.running)  # rejected
            reason = task.reason or "rejected by a person"
            task = _roll_back(engine, store, task, name, TaskState.rolled_back, gate="L2",
                              reason=reason, config=config, began=began)
            retired = True
            _retire(pool, lease, task)
            return task
        except _SANDBOX_ERRORS as exc:
            reset = not _dead(engine, name, exc)
            task = _finish(store, task, TaskState.failed,
                           reason=f"while finishing the {task.decision}: {exc}")
            _event(engine, store, None, "task_failed", task, reason=task.reason)
            return task
    finally:
        if not retired:
            _release(pool, lease, reset=reset)
