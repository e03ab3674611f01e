"""The L1 comparison, the lessons file and the scheduler's bookkeeping, without Docker
(the real runs are in tests/integration/test_tasks.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aiva.config import Config, TaskSettings
from aiva.tasks import gates, runner
from aiva.tasks.models import Priority, Task, TaskState
from aiva.tasks.scheduler import Scheduler
from aiva.tasks.store import TaskStore


def test_a_metric_that_drops_past_the_threshold_fails() -> None:
    hist = [({"tests_passed": 10.0}, 1.0), ({"tests_passed": 12.0}, 1.0)]
    assert gates.compare({"tests_passed": 11.0}, 1.0, hist, 0.1) is None  # 8% below best
    why = gates.compare({"tests_passed": 10.0}, 1.0, hist, 0.1)
    assert why is not None and "tests_passed fell to 10 from the best 12" in why
    assert gates.compare({"tests_passed": 1.0}, 1.0, [], 0.1) is None  # no history: pass
    assert gates.compare({"other": 1.0}, 1.0, hist, 0.1) is None


def test_lower_is_better_metrics_and_duration() -> None:
    hist = [({"tests_failed": 0.0}, 2.0), ({"tests_failed": 1.0}, 2.0), ({}, 2.0)]
    assert gates.compare({"tests_failed": 0.0}, 2.0, hist, 0.1) is None
    assert "tests_failed rose" in (gates.compare({"tests_failed": 1.0}, 2.0, hist, 0.1) or "")
    assert gates.compare({}, 4.5, hist, 0.1) is not None  # > 2x the median, by > 1 s
    assert gates.compare({}, 3.9, hist, 0.1) is None
    assert gates.compare({}, 100.0, hist[:2], 0.1) is None  # too few runs to judge time


def test_lessons_are_appended_atomically_by_many_writers(tmp_path: Path) -> None:
    path = tmp_path / "lessons.json"
    task = Task(command=["false"])
    threads = [threading.Thread(target=gates.add_lesson, args=(task, f"r{i}", "L0"),
                                kwargs={"path": path}) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads(path.read_text())
    assert sorted(x["reason"] for x in data) == sorted(f"r{i}" for i in range(20))
    assert set(data[0]) >= {"task", "time", "reason", "gate", "command"}
    path.write_text("{not json")
    gates.add_lesson(task, "after", None, path=path)
    assert [x["reason"] for x in json.loads(path.read_text())] == ["after"]
    assert (tmp_path / "lessons.json.bad").read_text() == "{not json"


class FakeEngine:
    def __init__(self) -> None:
        self.config = Config(tasks=TaskSettings(concurrency=2))

    def exists(self, name: str) -> bool:
        return False


def test_the_scheduler_claims_by_rank_within_its_concurrency(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TaskStore(tmp_path / "state.db")
    gate = threading.Event()
    running: list[str] = []
    peak = [0]
    lock = threading.Lock()

    def fake_run(engine: Any, pool: Any, st: TaskStore, task: Task, **kw: Any) -> Task:
        with lock:
            running.append(task.id)
            peak[0] = max(peak[0], len(running))
        gate.wait(5)
        with lock:
            running.remove(task.id)
        return st.update(task.id, state=TaskState.succeeded)

    monkeypatch.setattr(runner, "run_task", fake_run)
    eng = FakeEngine()
    sched = Scheduler(eng, pool=object(), store=store, config=eng.config)  # type: ignore
    prios = [Priority.low, Priority.critical, Priority.normal, Priority.high, Priority.low]
    ids = [store.add(Task(command=["true"], priority=p)).id for p in prios]
    first = sched.tick()
    assert first == [ids[1], ids[3]]  # critical, then high; two at once
    assert sched.tick() == []  # full
    gate.set()
    deadline = time.monotonic() + 5
    while len(sched.started) < 5 and time.monotonic() < deadline:
        sched.tick()
        time.sleep(0.01)
    assert sched.started == [ids[1], ids[3], ids[2], ids[0], ids[4]]
    assert sched.wait_idle(5)
    assert peak[0] <= 2
    sched.close()
    store.close()
