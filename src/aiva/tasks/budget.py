"""What tasks may spend: ``tasks.daily_budget`` per UTC day and ``tasks.task_budget`` per
task, in the currency of the ``cost`` price table (a task's ``cost`` is the price of its
sandbox for the seconds it ran, set by the runner).

Alerts are an event and a log line: ``budget_alert`` once per UTC day when the day's spend
passes ``tasks.alert_at`` of the daily budget (once across every aiva process: the day is
claimed in the state db), and ``budget_refused`` each time a task is refused.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time
from statistics import fmean
from typing import Any, Protocol

from aiva.config import Config, load_config
from aiva.models import Event, utcnow
from aiva.tasks import evaluator
from aiva.tasks.models import Task, TaskState
from aiva.tasks.store import TaskStore

log = logging.getLogger("aiva.tasks")

ALERT_KEY = "budget_alert_day"


class GlobalRecorder(Protocol):
    def record_global(self, kind: str, **data: Any) -> Event: ...


def day_start(now: datetime | None = None) -> datetime:
    """Midnight (UTC) of the day of ``now``."""
    now = (now or utcnow()).astimezone(UTC)
    return datetime.combine(now.date(), time(), tzinfo=UTC)


class Budget:
    def __init__(self, config: Config | None, store: TaskStore,
                 engine: GlobalRecorder | None = None) -> None:
        self.config = config if config is not None else load_config()
        self.settings = self.config.tasks
        self.currency = self.config.cost.currency
        self.store = store
        self.engine = engine

    # ------------------------------------------------------------------ figures

    def spent(self, task: Task) -> float:
        return task.cost

    def spent_today(self, now: datetime | None = None) -> float:
        """Cost of the tasks finished today (UTC) and of those running (or held)."""
        finished = self.store.finished_since(day_start(now))
        active = self.store.list([TaskState.running, TaskState.awaiting_approval])
        seen = {t.id for t in finished}
        return sum(t.cost for t in finished) + sum(t.cost for t in active if t.id not in seen)

    def estimate(self, task: Task) -> float:
        """What the task will likely cost: the mean of its kind's last successes (0 with
        no history, so a new kind is never refused for its estimate)."""
        past = evaluator.history(self.store, task, default=self.settings.default_template)
        return fmean(t.cost for t in past) if past else 0.0

    # ------------------------------------------------------------------ decisions

    def would_allow(self, task: Task, now: datetime | None = None) -> tuple[bool, str | None]:
        """The answer of :meth:`allow`, without events (safe inside a transaction)."""
        return self._verdict(task, self.spent_today(now))

    def _verdict(self, task: Task, spent: float) -> tuple[bool, str | None]:
        cur, cap, daily = self.currency, self.settings.task_budget, self.settings.daily_budget
        est = self.estimate(task)
        if cap is not None:
            if task.cost >= cap and task.attempts:
                return False, (f"task {task.id} has cost {task.cost:.4g} {cur}, its cap "
                               f"(tasks.task_budget) is {cap:g} {cur}")
            if est > cap:
                return False, (f"task {task.id} is estimated at {est:.4g} {cur} (its kind's "
                               f"recent successes), over tasks.task_budget {cap:g} {cur}")
        if daily is not None:
            if spent >= daily:
                return False, (f"the daily budget is spent: {spent:.4g} of {daily:g} {cur} "
                               "today (tasks.daily_budget)")
            if spent + est > daily:
                return False, (f"task {task.id} would exceed the daily budget: {spent:.4g} "
                               f"spent + {est:.4g} estimated > {daily:g} {cur} "
                               "(tasks.daily_budget)")
        return True, None

    def allow(self, task: Task, now: datetime | None = None) -> tuple[bool, str | None]:
        """May this task run (or be queued) now? ``(False, reason)`` records
        ``budget_refused``; either way a ``budget_alert`` is raised if due."""
        spent = self.spent_today(now)
        ok, reason = self._verdict(task, spent)
        self.check_alert(task, spent=spent, now=now)
        if not ok:
            log.info("budget refused task %s: %s", task.id, reason)
            self._event("budget_refused", task=task.id, reason=reason,
                        spent_today=round(spent, 6), daily_budget=self.settings.daily_budget,
                        task_budget=self.settings.task_budget, currency=self.currency)
        return ok, reason

    def check_alert(self, task: Task | None = None, *, spent: float | None = None,
                    now: datetime | None = None) -> bool:
        """``budget_alert`` (event + warning) the first time today the spend passes
        ``tasks.alert_at`` of the daily budget; True if this call raised it."""
        daily = self.settings.daily_budget
        if not daily:
            return False
        spent = self.spent_today(now) if spent is None else spent
        threshold = self.settings.alert_at * daily
        if spent < threshold:
            return False
        if not self.store.once(ALERT_KEY, day_start(now).date().isoformat()):
            return False
        log.warning("task budget alert: %.4g of %g %s spent today (%.0f%%, alert at %.0f%%)",
                    spent, daily, self.currency, 100 * spent / daily,
                    100 * self.settings.alert_at)
        self._event("budget_alert", task=task.id if task else None,
                    spent_today=round(spent, 6), daily_budget=daily,
                    alert_at=self.settings.alert_at, currency=self.currency)
        return True

    def _event(self, kind: str, **data: Any) -> None:
        if self.engine is not None and hasattr(self.engine, "record_global"):
            self.engine.record_global(kind, **data)
        else:
            self.store.record(kind, **data)
