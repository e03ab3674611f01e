"""The task pool end to end on real Docker: the scheduler, the warm pool, the runner and
its gates, with real sandboxes. Most tests run the scheduler in-process (the daemon only
calls the same ``tick``); the last one goes through a real daemon and the CLI.

Every sandbox made here (pool ones included) is removed in ``finally``, the pool's
template is drained so no later daemon keeps it warm, and no task is left queued.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from aiva.config import BackendPrice, Config, Cost, PoolSettings, TaskSettings
from aiva.models import State
from aiva.tasks import gates
from aiva.tasks.models import Priority, Task, TaskState
from aiva.tasks.pool import LABEL, WarmPool
from aiva.tasks.scheduler import Scheduler
from aiva.tasks.store import TaskStore

pytestmark = pytest.mark.docker

TEMPLATE = "python"
AIVA = [sys.executable, "-m", "aiva.cli.main"]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def config_for(engine: Any, *, warm: int, max_: int, concurrency: int,
               daily_budget: float | None = None, cpu_hour: float = 0.0) -> Config:
    cfg: Config = engine.config.model_copy(deep=True)
    cfg.tasks = TaskSettings(concurrency=concurrency, daily_budget=daily_budget)
    cfg.pool = PoolSettings(min_warm=warm, max=max_, cpus=1, memory="512MB",
                            claim_timeout=60)
    cfg.cost = Cost(docker=BackendPrice(cpu_hour=cpu_hour))
    return cfg


def pool_sandboxes(engine: Any) -> list[str]:
    """Pool sandboxes, and those retired from the pool (a rolled-back task's, kept)."""
    return [sb.name for sb in engine.list_all(reconcile=False)
            if LABEL in sb.spec.labels or "aiva.retired_from_pool" in sb.spec.labels]


def clean_up(engine: Any, store: TaskStore, pool: WarmPool | None) -> None:
    """Cancel what is still queued or held, stop keeping the template warm, and remove
    every pool sandbox."""
    for t in store.list([TaskState.queued, TaskState.awaiting_approval, TaskState.running]):
        try:
            store.cancel(t.id)
        except Exception as exc:
            print(f"cannot cancel {t.id}: {exc}")
    if pool is not None:
        try:
            pool.drain(TEMPLATE)
        except Exception as exc:
            print(f"drain failed: {exc}")
    for name in pool_sandboxes(engine):
        try:
            engine.delete(name, volumes=True)
        except Exception as exc:
            print(f"cleanup of {name} failed: {exc}")


@contextmanager
def scheduling(engine: Any, config: Config, wrap: Callable[[WarmPool], Any] | None = None
               ) -> Iterator[tuple[Scheduler, WarmPool, TaskStore]]:
    """A warm pool (``min_warm`` ready) and a scheduler over it; tick it with
    :func:`ticking`, once the tasks are queued. ``wrap``: the pool as the scheduler sees
    it."""
    store = TaskStore()
    pool = WarmPool(engine, config.pool)
    sched = Scheduler(engine, wrap(pool) if wrap else pool, store, config)
    try:
        pool.warm(TEMPLATE)  # like `aiva pool warm`: min_warm ready before the tasks
        yield sched, pool, store
    finally:
        sched.close(30)
        clean_up(engine, store, pool)
        pool.close()
        store.close()


@contextmanager
def ticking(sched: Scheduler, tick: float = 0.1) -> Iterator[None]:
    halt = threading.Event()

    def loop() -> None:
        while not halt.is_set():
            sched.tick()
            halt.wait(tick)

    thread = threading.Thread(target=loop, daemon=True, name="tick")
    thread.start()
    try:
        yield
    finally:
        halt.set()
        thread.join(10)


def events_of(engine: Any, kind: str, task_id: str, after: int = 0) -> list[Any]:
    return [e for e in engine.store.events(after=after)
            if e.kind == kind and e.data.get("task") == task_id]


def last_event_id(engine: Any) -> int:
    evs = engine.store.events(limit=1)
    return evs[-1].id if evs else 0


def finished(store: TaskStore, ids: list[str]) -> bool:
    return all(store.get(i).state in (TaskState.succeeded, TaskState.failed,
                                      TaskState.rolled_back, TaskState.cancelled)
               for i in ids)


def shell(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


# ---------------------------------------------------------------------- tests


def test_twenty_tasks_run_in_priority_order_on_a_pool_of_three(engine: Any) -> None:
    cfg = config_for(engine, warm=3, max_=3, concurrency=3)
    rng = random.Random(6)
    with scheduling(engine, cfg) as (sched, _pool, store):
        assert len(pool_sandboxes(engine)) == 3
        tasks = [store.add(Task(command=shell(f"sleep 0.3; echo {i}"), name=f"prio-{i}",
                                priority=rng.choice(list(Priority))))
                 for i in range(20)]
        ids = [t.id for t in tasks]
        began = time.monotonic()
        with ticking(sched):
            wait_for(lambda: finished(store, ids), 120, "20 tasks to finish", step=0.2)
        took = time.monotonic() - began
        done = [store.get(i) for i in ids]
        assert all(t.state == TaskState.succeeded for t in done), \
            [(t.id, t.state, t.reason) for t in done if t.state != TaskState.succeeded]

        by_rank = sorted(done, key=lambda t: t.rank())
        rank_pos = {t.id: n for n, t in enumerate(by_rank)}
        # claimed strictly by rank: priority, then first come first served
        assert sched.started == [t.id for t in by_rank]
        # and started (sandbox in hand) in that order within the concurrency limit
        by_start = sorted(done, key=lambda t: t.started_at or datetime.max)
        for pos, t in enumerate(by_start):
            assert rank_pos[t.id] < pos + cfg.tasks.concurrency, (pos, t.priority)
        # never two tasks on one sandbox, never more than 3 at once (a sweep over the
        # spans: +1 at each start, -1 at each end, ends first at equal times)
        spans = [(t.started_at, t.finished_at, t.sandbox) for t in done]
        points = []
        for s1, e1, b1 in spans:
            assert s1 is not None and e1 is not None and b1
            points += [(s1, 1), (e1, -1)]
            same = [(s2, e2) for s2, e2, b2 in spans if b2 == b1]
            assert len(same) == 1 or all(not (s2 < e1 and s1 < e2)  # type: ignore[operator]
                                         for s2, e2 in same if (s2, e2) != (s1, e1)), b1
        now = peak = 0
        for _, step in sorted(points):
            now += step
            peak = max(peak, now)
        assert peak <= cfg.tasks.concurrency
        print(f"\n20 tasks on a pool of 3: {took:.1f} s, "
              f"{len({t.sandbox for t in done})} sandboxes used")


def test_a_sandbox_killed_mid_task_is_retried_elsewhere(engine: Any, docker_ok: Any,
                                                        tmp_path: Path) -> None:
    cfg = config_for(engine, warm=2, max_=3, concurrency=1)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "input.txt").write_text("hello\n")
    with scheduling(engine, cfg) as (sched, _pool, store):
        mark = last_event_id(engine)
        task = store.add(Task(
            command=shell("touch /tmp/started; sleep 3; tr a-z A-Z < input.txt > out.txt"),
            workspace=str(ws), max_attempts=3))
        with ticking(sched):
            def first_sandbox() -> str | None:
                t = store.get(task.id)
                if t.state != TaskState.running or not t.sandbox:
                    return None
                try:
                    r = engine.exec(t.sandbox, "test -f /tmp/started")
                except Exception:
                    return None
                return t.sandbox if r.exit_code == 0 else None

            victim = wait_for(first_sandbox, 60, "the command to start")
            cid = engine.get(victim).runtime["container_id"]
            killer = threading.Thread(target=lambda: docker_ok.containers.get(cid).kill())
            killer.start()
            killer.join(30)
            wait_for(lambda: finished(store, [task.id]), 90, "the retried task")
        done = store.get(task.id)
        assert done.state == TaskState.succeeded, done.reason
        assert done.attempts == 2
        assert done.sandbox != victim
        retried = events_of(engine, "task_retried", task.id, mark)
        assert len(retried) == 1
        assert retried[0].data["from"] == victim and retried[0].data["to"] == done.sandbox
        assert (ws / "out.txt").read_text() == "HELLO\n"
        assert not engine.exists(victim)  # a dead sandbox is destroyed, never reused


class SpyPool:
    """The real pool, watched: what a file of the sandbox holds when it is handed out
    and when it comes back (after the runner's rollback, before the pool resets it)."""

    def __init__(self, pool: WarmPool, engine: Any, path: str) -> None:
        self.pool, self.engine, self.path = pool, engine, path
        self.at_claim: dict[str, str] = {}
        self.at_release: dict[str, dict[str, Any]] = {}

    def claim(self, template: str, timeout: float = 60.0) -> Any:
        lease = self.pool.claim(template, timeout=timeout)
        self.at_claim[lease.name] = self.engine.read_file(lease.name, self.path).decode()
        return lease

    def release(self, lease: Any, *, reset: bool = True) -> None:
        name = lease.name
        ls = self.engine.exec(name, "ls /workspace")
        self.at_release[name] = {
            "file": self.engine.read_file(name, self.path).decode(),
            "workspace": ls.stdout.split(),
            "snapshots": [s["tag"] for s in self.engine.snapshots(name)],
        }
        self.pool.release(lease, reset=reset)

    def keep(self, lease: Any) -> None:
        self.pool.keep(lease)

    def retire(self, lease: Any, *, reason: str) -> None:
        self.pool.retire(lease, reason=reason)


def test_a_failed_gate_rolls_back_and_records_the_lesson(engine: Any, tmp_path: Path) -> None:
    cfg = config_for(engine, warm=1, max_=2, concurrency=1)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "app.py").write_text("ANSWER = 42\n")
    (ws / "test_app.py").write_text("import app\nassert app.ANSWER == 42, app.ANSWER\n")
    lessons_before = len(gates.read_lessons())
    spies: list[SpyPool] = []

    def spy_on(pool: WarmPool) -> SpyPool:
        spies.append(SpyPool(pool, engine, "/root/.profile"))
        return spies[0]

    with scheduling(engine, cfg, wrap=spy_on) as (sched, _pool, store):
        spy = spies[0]
        mark = last_event_id(engine)
        task = store.add(Task(
            command=shell("echo 'ANSWER = 41' > app.py; echo broken >> /root/.profile; "
                          "echo edited app.py; echo warned >&2"),
            workspace=str(ws), gate="python3 test_app.py"))
        with ticking(sched):
            wait_for(lambda: finished(store, [task.id]), 60, "the gated task")
        done = store.get(task.id)
        assert done.state == TaskState.rolled_back, (done.state, done.reason)
        assert done.exit_code == 0
        assert "python3 test_app.py" in (done.reason or "")
        assert [e.data["gate"] for e in events_of(engine, "gate_failed", task.id, mark)] \
            == ["L0"]
        assert events_of(engine, "task_rolled_back", task.id, mark)
        # the sandbox left the pool, stopped, with the pre-task snapshot kept; started
        # again it is as it was before the task
        name = done.sandbox or ""
        kept = wait_for(lambda: (sb if (sb := engine.get(name)).state == State.STOPPED
                                 else None), 30, "the sandbox to be retired")
        assert LABEL not in kept.spec.labels
        assert f"pre-{task.id}" in [s["tag"] for s in engine.snapshots(name)]
        assert name not in spy.at_release  # never given back to the pool
        engine.start(name)
        assert engine.read_file(name, "/root/.profile").decode() == spy.at_claim[name]
        assert "task" not in engine.exec(name, "ls /workspace").stdout.split()
        # on the host: nothing pulled back
        assert (ws / "app.py").read_text() == "ANSWER = 42\n"
        lessons = gates.read_lessons()
        assert len(lessons) == lessons_before + 1
        lesson = lessons[-1]
        assert lesson["task"] == task.id and lesson["gate"] == "L0"
        assert lesson["command"] == task.command and lesson["reason"] == done.reason
        assert lesson["time"] and lesson["sandbox"] == name
        assert isinstance(json.loads(gates.lessons_path().read_text()), list)
        # the task's output is the task's: the command's and the gate's, with exit codes
        r = subprocess.run([*AIVA, "task", "logs", task.id], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert "edited app.py" in r.stdout and "warned" in r.stderr
        assert "(gate) python3 test_app.py" in r.stdout and "exit 0" in r.stdout
        assert "AssertionError: 41" in r.stderr and "exit 1" in r.stdout
        r = subprocess.run([*AIVA, "task", "show", task.id], capture_output=True, text=True,
                           timeout=60)
        assert "kept sandbox" in r.stdout and f"aiva start {name}" in r.stdout


def test_an_l2_task_waits_for_approval(engine: Any, tmp_path: Path) -> None:
    cfg = config_for(engine, warm=2, max_=3, concurrency=2)
    ws_ok, ws_no = tmp_path / "ok", tmp_path / "no"
    for ws in (ws_ok, ws_no):
        ws.mkdir()
        (ws / "in.txt").write_text("data\n")
    with scheduling(engine, cfg) as (sched, _pool, store):
        ok = store.add(Task(command=shell("echo result > out.txt"), workspace=str(ws_ok),
                            approve=True, gate="test -f out.txt"))
        no = store.add(Task(command=shell("echo result > out.txt"), workspace=str(ws_no),
                            approve=True, name="l2-reject"))
        lessons_before = len(gates.read_lessons())
        with ticking(sched):
            wait_for(lambda: all(store.get(i).state == TaskState.awaiting_approval
                                 for i in (ok.id, no.id)), 60, "both to await approval")
            held = {i: store.get(i).sandbox for i in (ok.id, no.id)}
            # held: the sandbox stays busy, nothing is pulled back, several ticks on
            t_end = time.monotonic() + 1.0
            wait_for(lambda: time.monotonic() > t_end, 2, "a second of ticks")
            for i, name in held.items():
                assert store.get(i).state == TaskState.awaiting_approval
                assert name and engine.exists(name)
                assert engine.get(name).runtime["pool_busy"]["kept"] is True
            assert not (ws_ok / "out.txt").exists()

            store.decide(ok.id, "approve")
            store.decide(no.id, "reject", "not what we wanted")
            wait_for(lambda: finished(store, [ok.id, no.id]), 60, "the decisions")
            wait_for(sched.idle, 30, "the finishing workers")
        assert store.get(ok.id).state == TaskState.succeeded
        assert (ws_ok / "out.txt").read_text() == "result\n"
        from aiva.tasks.output import output_path
        assert output_path(ok.id).is_file()  # kept with the task, not in its sandbox
        r = subprocess.run([*AIVA, "task", "logs", ok.id], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "echo result > out.txt" in r.stdout, r.stderr
        assert "(gate) test -f out.txt" in r.stdout and r.stdout.count("exit 0") == 2
        rejected = store.get(no.id)
        assert rejected.state == TaskState.rolled_back
        assert rejected.reason == "rejected: not what we wanted"
        assert not (ws_no / "out.txt").exists()
        lessons = gates.read_lessons()[lessons_before:]
        assert [(x["task"], x["gate"]) for x in lessons] == [(no.id, "L2")]
        for name in held.values():  # given back: busy no more (or replaced)
            assert not engine.exists(name or "") or \
                not engine.get(name or "").runtime.get("pool_busy")


def test_the_budget_cap_stops_new_work(engine: Any) -> None:
    # 1 CPU at 3600 per CPU-hour: one currency unit per second a sandbox is held
    cfg = config_for(engine, warm=1, max_=2, concurrency=1, daily_budget=0.5,
                     cpu_hour=3600.0)
    with scheduling(engine, cfg) as (sched, _pool, store):
        mark = last_event_id(engine)
        first = store.add(Task(command=shell("sleep 1"), name="budget-first"))
        second = store.add(Task(command=["true"], name="budget-second"))
        with ticking(sched):
            wait_for(lambda: finished(store, [first.id]), 60, "the first task")
            wait_for(lambda: events_of(engine, "budget_refused", second.id, mark), 10,
                     "the refusal of the second")
            t_end = time.monotonic() + 1.0
            wait_for(lambda: time.monotonic() > t_end, 2, "a second of ticks")
        spent = store.get(first.id)
        assert spent.state == TaskState.succeeded
        assert spent.cost >= 1.0  # > 1 s held at 1 per second
        waiting = store.get(second.id)
        assert waiting.state == TaskState.queued and waiting.attempts == 0
        assert second.id not in sched.started
        refusals = events_of(engine, "budget_refused", second.id, mark)
        assert len(refusals) == 1  # once, not every tick
        assert "daily budget" in refusals[0].data["reason"]


# ---------------------------------------------------------------------- daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_daemon_runs_a_task_added_with_the_cli(engine: Any, tmp_path: Path) -> None:
    from aiva.daemon import control

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "n.txt").write_text("20\n")
    env = {**os.environ, "AIVA_NO_DAEMON": "1"}
    store = TaskStore()
    pids: list[int] = []
    try:
        info = control.start(_free_port(), timeout=60)
        pids.append(int(info["pid"]))
        r = subprocess.run([*AIVA, "task", "add", "--workspace", str(ws), "--gate",
                            "grep -q 22 n.txt", "--", "/bin/sh", "-c",
                            "echo $(( $(cat n.txt) + 2 )) > n.txt"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        task_id = r.stdout.strip().splitlines()[0]
        wait_for(lambda: finished(store, [task_id]), 90, "the daemon to run the task",
                 step=0.2)
        done = store.get(task_id)
        assert done.state == TaskState.succeeded, done.reason
        assert (ws / "n.txt").read_text() == "22\n"
        assert events_of(engine, "task_succeeded", task_id)
        assert events_of(engine, "gate_passed", task_id)
    finally:
        pool = WarmPool(engine)
        try:
            pool.drain(TEMPLATE)  # the daemon keeps it warm no more
        except Exception as exc:
            print(f"drain failed: {exc}")
        control.stop()
        for pid in pids:
            if control.is_daemon(pid):
                os.kill(pid, 9)
        clean_up(engine, store, pool)
        pool.close()
        store.close()
