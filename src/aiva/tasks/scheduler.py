"""The task scheduler: which queued task runs next, and where.

:meth:`Scheduler.tick` is one pass, cheap when there is nothing to do (a couple of
indexed queries), so the daemon runs it every second (:func:`run_scheduler`, beside the
sampler and the lifetimes loop) and a test or a script can run it in-process:

1. tasks held for a person whose decision came (or that were cancelled) are finished in
   a worker (``runner.finish_decision``), which gives their sandbox back;
2. while fewer than ``tasks.concurrency`` tasks run, the best-ranked queued task the
   budget allows (priority, then first come first served; ``TaskStore.claim_next``) is
   claimed and run in a worker thread (``runner.run_task``);
3. a task the budget refuses stays queued; ``budget_refused`` is recorded once per task
   and reason, not every tick.

A task never shares a sandbox: each worker holds its own pool lease, and the scheduler
refuses a lease on a sandbox another of its workers holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from aiva.config import Config
from aiva.errors import AivaError
from aiva.periodic import Periodic, Step
from aiva.tasks import runner
from aiva.tasks.budget import Budget
from aiva.tasks.models import FINISHED, Task, TaskState
from aiva.tasks.pool import Lease, WarmPool
from aiva.tasks.store import TaskStore

if TYPE_CHECKING:
    from aiva.engine import Engine

log = logging.getLogger("aiva.tasks")


class _Guard:
    """The pool as a worker sees it: a sandbox another worker holds is never handed out."""

    def __init__(self, pool: runner.PoolLike, busy: set[str], lock: threading.Lock) -> None:
        self.pool, self.busy, self.lock = pool, busy, lock

    def claim(self, template: str, timeout: float = 60.0) -> Any:
        lease = self.pool.claim(template, timeout=timeout)
        with self.lock:
            if lease.name in self.busy:
                raise AivaError(f"the pool handed out {lease.name}, which another task holds")
            self.busy.add(lease.name)
        return lease

    def release(self, lease: Any, *, reset: bool = True) -> None:
        try:
            self.pool.release(lease, reset=reset)
        finally:
            with self.lock:
                self.busy.discard(lease.name)

    def keep(self, lease: Any) -> None:
        keep = getattr(self.pool, "keep", None)
        if keep is not None:
            keep(lease)

    def retire(self, lease: Any, *, reason: str) -> None:
        try:
            retire = getattr(self.pool, "retire", None)
            if retire is not None:
                retire(lease, reason=reason)
            else:
                self.pool.release(lease, reset=True)
        finally:
            with self.lock:
                self.busy.discard(lease.name)


class Scheduler:
    def __init__(self, engine: Engine, pool: runner.PoolLike, store: TaskStore | None = None,
                 config: Config | None = None) -> None:
        self.engine = engine
        self.pool = pool
        self.store = store or TaskStore()
        self.config = config or engine.config
        self.budget = Budget(self.config, self.store)
        self.stop = threading.Event()
        self.started: list[str] = []  # task ids in the order this scheduler claimed them
        self._lock = threading.Lock()
        self._busy: set[str] = set()
        self._guard = _Guard(pool, self._busy, self._lock)
        self._workers: dict[str, threading.Thread] = {}
        self._finishing: dict[str, threading.Thread] = {}
        self._held: dict[str, Any] = {}
        self._refused: dict[str, str | None] = {}
        self._recovered = False

    @property
    def concurrency(self) -> int:
        return int(self.config.tasks.concurrency)

    def running(self) -> int:
        with self._lock:
            return sum(1 for t in self._workers.values() if t.is_alive())

    def idle(self) -> bool:
        """No worker of this scheduler is running or finishing a task."""
        with self._lock:
            return not any(t.is_alive() for t in (*self._workers.values(),
                                                  *self._finishing.values()))

    # ------------------------------------------------------------------ the pass

    def tick(self) -> list[str]:
        """One pass (see the module doc); the ids of the tasks it started."""
        if self.stop.is_set():
            return []
        if not self._recovered:
            self._recover()
            self._recovered = True
        self._reap()
        self._decisions()
        started: list[str] = []
        while not self.stop.is_set() and self.running() < self.concurrency:
            task = self.store.claim_next(allow=self._allowed)
            if task is None:
                break
            self.started.append(task.id)
            started.append(task.id)
            self._spawn(self._workers, task.id, self._run, task)
        self._refusals()
        with contextlib.suppress(Exception):
            self.budget.check_alert()
        return started

    def _allowed(self, task: Task) -> bool:
        """Inside claim_next's transaction: no events, no writes."""
        return self.budget.would_allow(task)[0]

    def _refusals(self) -> None:
        """``budget_refused`` once per queued task and reason."""
        if self.config.tasks.daily_budget is None and self.config.tasks.task_budget is None:
            return
        for task in self.store.list(TaskState.queued):
            ok, reason = self.budget.would_allow(task)
            if ok:
                self._refused.pop(task.id, None)
            elif self._refused.get(task.id, "") != reason:
                self._refused[task.id] = reason
                self.budget.allow(task)  # records the refusal and says why in the log

    def _spawn(self, table: dict[str, threading.Thread], task_id: str, fn: Any,
               *args: Any) -> None:
        worker = threading.Thread(target=fn, args=args, daemon=True,
                                  name=f"aiva-task-{task_id}")
        with self._lock:
            table[task_id] = worker
        worker.start()

    def _reap(self) -> None:
        with self._lock:
            for table in (self._workers, self._finishing):
                for tid in [tid for tid, t in table.items() if not t.is_alive()]:
                    del table[tid]

    # ------------------------------------------------------------------ workers

    def _run(self, task: Task) -> None:
        try:
            runner.run_task(self.engine, self._guard, self.store, task, config=self.config,
                            stop=self.stop, on_hold=self._hold)
        except Exception as exc:  # a bug or a surprise: the task must not stay running
            log.exception("task %s failed in its worker", task.id)
            with contextlib.suppress(Exception):
                self._fail(task.id, f"internal error: {type(exc).__name__}: {exc}")

    def _fail(self, task_id: str, reason: str) -> None:
        def fail(t: Task) -> None:
            if t.state not in FINISHED:
                t.state = TaskState.failed
                t.reason = reason
        task = self.store.change(task_id, fail)
        self.store.record("task_failed", task=task.id, reason=reason)

    def _hold(self, task: Task, lease: Any) -> None:
        with self._lock:
            self._held[task.id] = lease

    def _decisions(self) -> None:
        """Finish held tasks that have a decision, or were cancelled while held."""
        waiting = {t.id: t for t in self.store.list(TaskState.awaiting_approval)}
        with self._lock:
            held = dict(self._held)
            busy = set(self._finishing)
        for tid, lease in held.items():
            if tid not in waiting and tid not in busy:
                task = self.store.find(tid)
                if task is None or task.state in FINISHED:  # cancelled while held
                    self._finish(tid, task, lease)
        for tid, task in waiting.items():
            if task.decision is None or tid in busy:
                continue
            lease = held.get(tid)
            if lease is None:  # held by an earlier scheduler (the daemon restarted)
                if not task.sandbox or not self.engine.exists(task.sandbox):
                    self._fail(tid, "its held sandbox is gone")
                    continue
                lease = Lease(task.sandbox,
                              task.template_name(self.config.tasks.default_template))
                with self._lock:
                    self._busy.add(lease.name)
            self._finish(tid, task, lease)

    def _finish(self, tid: str, task: Task | None, lease: Any) -> None:
        def work() -> None:
            try:
                if task is None:
                    self._guard.release(lease, reset=True)
                else:
                    runner.finish_decision(self.engine, self._guard, self.store, task, lease,
                                           config=self.config)
            except Exception:
                log.exception("finishing task %s failed", tid)
            finally:
                with self._lock:
                    self._held.pop(tid, None)

        self._spawn(self._finishing, tid, work)

    def _recover(self) -> None:
        """Tasks left running by an earlier scheduler (a daemon killed or restarted) have
        no worker: back to the queue (``store.requeue``: it counts the attempt), and the
        sandbox they ran in, dirty, is destroyed."""
        for task in self.store.list(TaskState.running):
            with self._lock:
                if task.id in self._workers:
                    continue
            sandbox = task.sandbox
            try:
                self.store.requeue(task.id, "its scheduler stopped while it ran")
            except AivaError as exc:
                log.warning("cannot requeue task %s: %s", task.id, exc)
                continue
            if sandbox and self.engine.exists(sandbox):
                lease = Lease(sandbox,
                              task.template_name(self.config.tasks.default_template))
                with contextlib.suppress(Exception):
                    self.pool.release(lease, reset=False)

    # ------------------------------------------------------------------ lifetime

    def close(self, timeout: float = 30.0) -> None:
        """Stop starting tasks; running commands are killed and their tasks queued again
        (the attempt not counted); wait up to ``timeout`` for the workers."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            workers = [*self._workers.values(), *self._finishing.values()]
        for t in workers:
            t.join(max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


# ---------------------------------------------------------------------- the daemon loop


async def run_scheduler(engine: Engine, stop_event: asyncio.Event | None = None, *,
                        interval: float = 1.0, maintain_every: float = 5.0) -> None:
    """The daemon's loop: a pool and a scheduler over the daemon's engine; ``tick`` every
    ``interval`` s and the pool's ``maintain`` every ``maintain_every`` s, on threads of
    their own so neither blocks the event loop. At the end, running tasks are put back
    in the queue (their commands killed)."""
    stop_event = stop_event or asyncio.Event()
    try:
        pool = WarmPool(engine)
        scheduler = Scheduler(engine, pool, config=engine.config)
    except Exception:  # the daemon serves on without tasks, and says why
        log.exception("the task scheduler cannot start")
        return
    steps = [Step(scheduler.tick, "scheduler tick failed"),
             Step(pool.maintain, "pool maintain failed", every=maintain_every)]
    try:
        await Periodic("aiva-scheduler", interval, steps, log).run(stop_event)
    finally:
        await asyncio.to_thread(scheduler.close, 15.0)
        await asyncio.to_thread(pool.close)
