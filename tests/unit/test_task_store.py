"""The task queue: ranking, atomic claims, requeue, JSONL, budgets and the evaluator."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aiva.config import Config, TaskSettings
from aiva.engine.store import Store
from aiva.errors import InvalidValue
from aiva.models import Event
from aiva.tasks import evaluator
from aiva.tasks.budget import Budget
from aiva.tasks.models import Priority, Task, TaskNotFound, TaskState, TaskStateError
from aiva.tasks.store import TaskStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = TaskStore(tmp_path / "state.db")
    yield s
    s.close()


def _kinds(path: Path) -> list[tuple[str, dict[str, Any]]]:
    events = Store(path).events()
    return [(e.kind, e.data) for e in events]


# ---------------------------------------------------------------------- model


def test_ids_defaults_and_validation() -> None:
    t = Task(command=["echo", "hi"])
    assert t.id.startswith("t-") and len(t.id) == 10
    assert int(t.id[2:], 16) >= 0
    assert (t.state, t.priority, t.attempts, t.max_attempts) == (
        TaskState.queued, Priority.normal, 0, 3)
    assert t.kind == "echo hi" and Task(command=["x"], name="build").kind == "build"
    assert t.template_name() == "python" and Task(command=["x"], image="i").template_name() == "i"
    for bad in ({"command": []}, {"command": ["x"], "id": "t-XYZ"},
                {"command": ["x"], "priority": "urgent"}, {"command": ["x"], "nope": 1}):
        with pytest.raises(ValueError):
            Task.model_validate(bad)
    with pytest.raises(ValueError):
        t.state = "sideways"  # type: ignore[assignment]  # assignments are validated
    assert Task(command=["x"], priority=Priority.critical).rank() < t.rank()
    # times are UTC, whatever zone (or none) a JSON line gives
    naive = Task.model_validate_json('{"command": ["x"], "created_at": "2026-03-01T12:00:00"}')
    other = Task.model_validate_json(
        '{"command": ["x"], "created_at": "2026-03-01T14:00:00+02:00"}')
    assert naive.created_at == other.created_at == T0 and other.created_at.tzinfo == UTC


# ---------------------------------------------------------------------- queue


def test_rank_order_of_20_mixed_priority_tasks(store: TaskStore) -> None:
    rng = random.Random(6)
    prios = list(Priority)
    tasks = []
    for i in range(20):
        # some share a creation time: then the order they were added decides
        created = T0 + timedelta(seconds=i // 3)
        tasks.append(store.add(Task(command=["job", str(i)], priority=rng.choice(prios),
                                    created_at=created)))
    assert len({t.priority for t in tasks}) == 4
    want = [t.id for t in sorted(tasks, key=lambda t: t.rank())]  # stable: added order
    assert [t.id for t in store.list(TaskState.queued)] == want
    got = []
    while (t := store.claim_next()) is not None:
        assert t.state == TaskState.running and t.attempts == 1 and t.started_at
        got.append(t.id)
    assert got == want
    assert store.list(TaskState.queued) == []
    assert len(store.list("running")) == 20


def test_claim_next_is_atomic_under_threads(store: TaskStore) -> None:
    ids = {store.add(Task(command=["n", str(i)])).id for i in range(60)}
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        while (t := store.claim_next()) is not None:
            with lock:
                claimed.append(t.id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(claimed) == len(set(claimed)) == 60  # no task claimed twice
    assert set(claimed) == ids
    assert all(t.attempts == 1 and t.state == TaskState.running for t in store.list())


def test_claim_next_allow_and_claim(store: TaskStore) -> None:
    a = store.add(Task(command=["a"], priority=Priority.high))
    b = store.add(Task(command=["b"]))
    assert store.claim_next(allow=lambda t: t.id != a.id).id == b.id  # type: ignore[union-attr]
    assert store.claim(b.id) is None  # no longer queued
    assert store.claim(a.id).state == TaskState.running  # type: ignore[union-attr]
    assert store.claim_next() is None


def test_requeue_keeps_rank_then_gives_up(store: TaskStore) -> None:
    t = store.add(Task(command=["flaky"], priority=Priority.high, max_attempts=2))
    later = store.add(Task(command=["later"], priority=Priority.normal))
    first = store.claim_next()
    assert first is not None and first.id == t.id
    store.update(t.id, sandbox="pool-python-aaaa")
    back = store.requeue(t.id, "sandbox died")
    assert (back.state, back.attempts, back.sandbox, back.reason) == (
        TaskState.queued, 1, None, "sandbox died")
    again = store.claim_next()  # still ahead of the normal one
    assert again is not None and again.id == t.id and again.attempts == 2
    gone = store.requeue(t.id, "died again")
    assert gone.state == TaskState.failed and gone.finished_at is not None
    assert "gave up after 2 attempts" in (gone.reason or "")
    with pytest.raises(TaskStateError):
        store.requeue(t.id, "x")
    assert store.claim_next().id == later.id  # type: ignore[union-attr]
    kinds = [k for k, d in _kinds(store.path) if d.get("task") == t.id]
    assert kinds == ["task_queued", "task_started", "task_retried", "task_started",
                     "task_failed"]
    retried = next(d for k, d in _kinds(store.path) if k == "task_retried")
    assert retried["from"] == "pool-python-aaaa" and retried["attempt"] == 1


def test_update_cancel_decide(store: TaskStore) -> None:
    t = store.add(Task(command=["x"], approve=True))
    with pytest.raises(TypeError):
        store.update(t.id, colour="red")
    with pytest.raises(ValueError):
        store.update(t.id, state="nowhere")
    with pytest.raises(TaskNotFound):
        store.get("t-00000000")
    with pytest.raises(TaskStateError):
        store.decide(t.id, "approve")  # not awaiting approval
    store.claim_next()
    held = store.update(t.id, state=TaskState.awaiting_approval)
    assert held.finished_at is None
    with pytest.raises(InvalidValue):
        store.decide(t.id, "maybe")
    decided = store.decide(t.id, "reject", "wrong answer")
    assert decided.decision == "reject" and decided.reason == "rejected: wrong answer"
    assert decided.state == TaskState.awaiting_approval  # the runner acts on it
    with pytest.raises(TaskStateError):
        store.decide(t.id, "approve")
    done = store.update(t.id, state="rolled_back")
    assert done.finished_at is not None
    with pytest.raises(TaskStateError):
        store.cancel(t.id)
    running = store.add(Task(command=["y"]))
    store.claim_next()
    assert store.cancel(running.id).state == TaskState.cancelled


# ---------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path: Path, store: TaskStore) -> None:
    store.add(Task(command=["/bin/sh", "-c", "echo 'a b' | wc"], priority=Priority.low,
                   gate="pytest -q", metrics_file="m.json", approve=True, timeout=30,
                   workspace="/tmp/w", name="n"))
    store.add(Task(command=["python3", "-V"], image="aiva/python:latest", max_attempts=1))
    store.claim_next()
    text = store.export_jsonl()
    assert len(text.splitlines()) == 2
    other = TaskStore(tmp_path / "other.db")
    try:
        imported = other.import_jsonl(text)
        assert [t.id for t in imported] == [t.id for t in store.history()]
        assert other.export_jsonl() == text
        assert other.history() == store.history()
    finally:
        other.close()


@pytest.mark.parametrize(("lines", "where", "what"), [
    (['{"command": ["a"]}', "", "{not json"], "line 3", "not valid JSON"),
    (['{"command": ["a"]}', '{"command": ["b"], "priority": "urgent"}'], "line 2",
     "priority"),
    (['{"name": "x"}'], "line 1", "command"),
    (['{"command": ["a"], "colour": 1}'], "line 1", "colour"),
    (['{"id": "t-0000000a", "command": ["a"]}', '{"id": "t-0000000a", "command": ["b"]}'],
     "line 2", "also on line 1"),
    (['[1, 2]'], "line 1", ""),
])
def test_jsonl_bad_lines_name_the_line_and_add_nothing(
        store: TaskStore, lines: list[str], where: str, what: str) -> None:
    with pytest.raises(InvalidValue) as err:
        store.import_jsonl("\n".join(lines) + "\n")
    assert err.value.message.startswith(where + ":")
    assert what in err.value.message
    assert "\n" not in err.value.message
    assert store.history() == []


def test_jsonl_import_refuses_an_existing_id(store: TaskStore) -> None:
    t = store.add(Task(command=["a"]))
    with pytest.raises(InvalidValue, match=f"line 2: a task '{t.id}' already exists"):
        store.import_jsonl(['{"command": ["new"]}', t.model_dump_json()])
    assert [x.id for x in store.history()] == [t.id]


# ---------------------------------------------------------------------- budget


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def record_global(self, kind: str, **data: Any) -> Event:
        self.events.append((kind, data))
        return Event(kind=kind, data=data)


def _finished(store: TaskStore, cost: float, when: datetime, *, command: str = "job",
              state: TaskState = TaskState.succeeded, seconds: float = 10.0) -> Task:
    t = store.add(Task(command=[command], created_at=when - timedelta(seconds=seconds + 1)))
    return store.update(t.id, state=state, cost=cost, attempts=1,
                        started_at=when - timedelta(seconds=seconds), finished_at=when)


def _config(**kw: Any) -> Config:
    return Config(tasks=TaskSettings(**kw))


def test_budget_spend_caps_and_refusals(store: TaskStore) -> None:
    now = T0
    _finished(store, 0.30, now - timedelta(hours=1))
    _finished(store, 5.00, now - timedelta(days=1))  # yesterday: not today's spend
    running = store.add(Task(command=["long"]))
    store.claim_next()
    store.update(running.id, cost=0.20)
    rec = Recorder()
    budget = Budget(_config(daily_budget=1.0, task_budget=0.5), store, rec)
    assert budget.spent_today(now) == pytest.approx(0.5)
    assert budget.spent(store.get(running.id)) == pytest.approx(0.2)
    assert budget.estimate(Task(command=["job"])) == pytest.approx((0.30 + 5.0) / 2)
    assert budget.estimate(Task(command=["new"])) == 0.0

    ok, reason = budget.allow(Task(command=["new"]), now)
    assert ok and reason is None
    ok, reason = budget.allow(Task(command=["job"]), now)  # estimate 2.65 > task cap 0.5
    assert not ok and "tasks.task_budget" in (reason or "")
    assert rec.events[-1][0] == "budget_refused"

    # a task that already spent its cap (a retry) is refused too
    spent = Task(command=["new"], cost=0.6, attempts=1)
    assert budget.allow(spent, now)[0] is False

    # the daily cap: estimate pushes it over, then nothing at all once spent
    _finished(store, 0.2, now - timedelta(minutes=5), command="cheap")
    b2 = Budget(_config(daily_budget=1.0), store, rec)
    assert b2.allow(Task(command=["cheap"]), now) == (True, None)  # 0.7 + 0.2 <= 1
    _finished(store, 0.25, now - timedelta(minutes=1), command="cheap")
    ok, reason = b2.allow(Task(command=["cheap"]), now)  # 0.95 + 0.225 > 1
    assert not ok and "would exceed the daily budget" in (reason or "")
    _finished(store, 0.1, now, command="other")
    ok, reason = b2.allow(Task(command=["new"]), now)
    assert not ok and "daily budget is spent" in (reason or "")
    refused = [d for k, d in rec.events if k == "budget_refused"]
    assert all("task" in d and d["reason"] for d in refused) and len(refused) == 4
    assert budget.would_allow(Task(command=["new"]), now)[0] is False
    assert len([k for k, _ in rec.events if k == "budget_refused"]) == 4  # no new events

    # no caps: everything goes
    assert Budget(_config(), store, rec).allow(Task(command=["job"]), now) == (True, None)


def test_budget_alert_once_a_day(store: TaskStore, caplog: pytest.LogCaptureFixture) -> None:
    budget = Budget(_config(daily_budget=1.0, alert_at=0.8), store)  # events into the db
    _finished(store, 0.5, T0 - timedelta(hours=1))
    assert budget.check_alert(now=T0) is False  # 50% < 80%
    _finished(store, 0.35, T0 - timedelta(minutes=30))
    with caplog.at_level("WARNING", logger="aiva.tasks"):
        assert budget.allow(Task(command=["x"]), T0)[0] is True  # 0.85: alert, allowed
    assert "budget alert" in caplog.text
    assert budget.check_alert(now=T0) is False  # once a day
    assert budget.allow(Task(command=["x"]), T0 + timedelta(hours=2))[0] is True
    alerts = [d for k, d in _kinds(store.path) if k == "budget_alert"]
    assert len(alerts) == 1 and alerts[0]["spent_today"] == pytest.approx(0.85)
    assert "task" in alerts[0]
    # the next day starts at zero; past the threshold again, it alerts again
    day2 = T0 + timedelta(days=1)
    assert budget.check_alert(now=day2) is False
    _finished(store, 0.9, day2 - timedelta(minutes=1))
    assert budget.check_alert(now=day2) is True
    assert budget.check_alert(now=day2) is False
    # another process (another Budget on the same db) does not alert again that day
    assert Budget(_config(daily_budget=1.0), TaskStore(store.path)).check_alert(now=day2) \
        is False
    assert len([k for k, _ in _kinds(store.path) if k == "budget_alert"]) == 2


# ---------------------------------------------------------------------- evaluator


def test_percentile() -> None:
    assert evaluator.percentile([], 50) is None
    assert evaluator.percentile([7], 95) == 7
    assert evaluator.percentile([10, 20, 30, 40], 50) == 25
    assert evaluator.percentile([40, 10, 30, 20], 95) == pytest.approx(38.5)


def test_report_figures_on_a_known_set(store: TaskStore) -> None:
    for i, (secs, state) in enumerate([(10, TaskState.succeeded), (20, TaskState.succeeded),
                                       (30, TaskState.failed), (40, TaskState.succeeded)]):
        t = store.add(Task(command=["make", "test"], template="python"))
        store.update(t.id, state=state, cost=0.1, started_at=T0 + timedelta(minutes=i),
                     finished_at=T0 + timedelta(minutes=i, seconds=secs))
    t = store.add(Task(command=["lint"], name="lint", template="minimal"))
    store.update(t.id, state=TaskState.rolled_back, cost=0.05, started_at=T0,
                 finished_at=T0 + timedelta(seconds=5))
    store.add(Task(command=["lint"], name="lint"))  # queued: not counted
    c = store.add(Task(command=["lint"], name="lint"))
    store.cancel(c.id)  # cancelled: not counted

    rows = {r["key"]: r for r in evaluator.report(store, "task")}
    assert set(rows) == {"make test", "lint"}
    mt = rows["make test"]
    assert (mt["count"], mt["succeeded"], mt["success_rate"]) == (4, 3, 0.75)
    assert (mt["p50_seconds"], mt["p95_seconds"]) == (25, 38.5)
    assert mt["cost"] == pytest.approx(0.4)
    assert mt["cost_per_success"] == pytest.approx(0.4 / 3, abs=1e-6)
    lint = rows["lint"]
    assert (lint["count"], lint["success_rate"], lint["cost_per_success"]) == (1, 0.0, None)

    by_tpl = {r["key"]: r for r in evaluator.report(store, "template")}
    assert set(by_tpl) == {"python", "minimal"} and by_tpl["python"]["count"] == 4
    with pytest.raises(InvalidValue):
        evaluator.report(store, "colour")

    past = evaluator.history(store, Task(command=["make", "test"]))
    assert len(past) == 3 and all(p.state == TaskState.succeeded for p in past)
    assert past[0].finished_at > past[-1].finished_at  # type: ignore[operator]
    assert evaluator.history(store, Task(command=["make", "test"], template="minimal")) == []


def test_time_waiting_for_approval_is_not_the_tasks_duration(store: TaskStore) -> None:
    """An L2 task that ran 10 s and waited an hour for a person counts 10 s in the report."""
    from aiva.tasks import runner

    t = store.add(Task(command=["deploy"], name="l2", approve=True))
    store.claim(t.id)
    store.update(t.id, started_at=T0)
    held = runner._finish(store, store.get(t.id), TaskState.awaiting_approval)
    assert held.held_at is not None
    store.update(t.id, held_at=T0 + timedelta(seconds=10))  # it began waiting at +10 s
    back = runner._finish(store, store.get(t.id), TaskState.running)
    assert back.held_at is None and back.held_seconds > 3600  # waited until now
    store.update(t.id, held_seconds=3600.0)
    done = store.update(t.id, state=TaskState.succeeded,
                        finished_at=T0 + timedelta(seconds=3610))
    assert done.duration == 3610 and done.run_seconds == 10
    row = next(r for r in evaluator.report(store, "task") if r["key"] == "l2")
    assert (row["p50_seconds"], row["p95_seconds"]) == (10, 10)
