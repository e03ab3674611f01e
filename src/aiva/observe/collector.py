"""The DataCollector (seed 003 phase 5): metrics history, cost, one query over every log,
and the event stream for whoever wants it.

It reads what aiva already writes (events in the state db, command logs, engine logs,
``AIVA_HOME/aiva.log``) and adds one thing: a ``metrics`` table of samples, because a
sandbox's figures are only measurable while it runs. The daemon samples every
``collector.interval`` seconds through :func:`run_sampler`; everything else works
without a daemon.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from aiva import paths
from aiva.backends.base import LogLine
from aiva.config import load_config
from aiva.errors import AivaError
from aiva.guard.private import make_private_file
from aiva.models import Event, SandboxInfo, State
from aiva.observe.logquery import LogEntry, aiva_log_path, log_handler, query_logs, read_aiva_log
from aiva.observe.metrics import SandboxMetrics
from aiva.periodic import Periodic, Step

__all__ = ["Collector", "EngineLike", "EventSource", "LogEntry", "Measurer", "Price",
           "aiva_log_path", "as_sample", "cost_of", "costs", "export_jsonl", "follow_events",
           "log_handler", "price_for", "query_logs", "read_aiva_log", "reconciled",
           "run_sampler", "running_seconds"]

log = logging.getLogger("aiva.collector")

COLUMNS = ("ts", "sandbox_id", "cpu_percent", "mem_used", "mem_total", "disk_read",
           "disk_write", "net_rx", "net_tx", "uptime")
SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    ts REAL NOT NULL, sandbox_id TEXT NOT NULL, cpu_percent REAL NOT NULL,
    mem_used INTEGER NOT NULL, mem_total INTEGER NOT NULL, disk_read INTEGER NOT NULL,
    disk_write INTEGER NOT NULL, net_rx INTEGER NOT NULL, net_tx INTEGER NOT NULL,
    uptime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_sandbox ON metrics (sandbox_id, ts);
CREATE INDEX IF NOT EXISTS metrics_ts ON metrics (ts);
"""
#: Events that start or end a billed (running) stretch; ``reconciled`` says its state.
OPENS, CLOSES = {"started", "resumed"}, {"stopped", "paused", "deleted", "error"}
LIFECYCLE = OPENS | CLOSES | {"reconciled"}
GIB = float(1 << 30)


class EventSource(Protocol):
    def events(self, *, sandbox_id: str | None = None, after: int = 0,
               limit: int | None = None) -> list[Event]: ...


class Measurer(Protocol):
    def metrics(self, name: str) -> SandboxMetrics: ...


class EngineLike(Protocol):
    """What the collector needs of an engine: the in-process one or the daemon's client."""

    @property
    def store(self) -> EventSource: ...
    def list_all(self, *, reconcile: bool = True) -> list[SandboxInfo]: ...
    def get(self, name: str) -> SandboxInfo: ...
    def reconcile(self, sb: SandboxInfo) -> SandboxInfo: ...
    def metrics(self, name: str) -> SandboxMetrics: ...
    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]: ...


# --------------------------------------------------------------------------- metrics


class Collector:
    """Samples in the state db through a connection of its own: the Store's connections
    are private and per thread, and its schema stays its own business."""

    def __init__(self, store: EventSource | Path | None = None) -> None:
        path = store if isinstance(store, Path) else getattr(store, "path", None)
        self.path: Path = path if isinstance(path, Path) else paths.state_db()
        make_private_file(self.path)  # 0600; -wal, -shm: its mode
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def sample(self, engine: Measurer, boxes: list[SandboxInfo], *, timeout: float = 30.0
               ) -> dict[str, SandboxMetrics]:
        """Measure ``boxes`` at once (Docker takes ~1 s per answer) and store the samples.
        A sandbox that fails or does not answer within ``timeout`` is logged and skipped,
        so it never costs the others their sample."""
        got: dict[str, SandboxMetrics] = {}

        def one(sb: SandboxInfo) -> None:
            try:
                got[sb.id] = engine.metrics(sb.name)
            except Exception as exc:
                log.warning("cannot sample %s: %s", sb.name, exc)

        threads = [threading.Thread(target=one, args=(sb,), daemon=True,
                                    name=f"aiva-sample-{sb.short_id}") for sb in boxes]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t, sb in zip(threads, boxes, strict=True):
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s gave no metrics within %.0f s; skipped", sb.name, timeout)
        done = {sb.id: got[sb.id] for sb, t in zip(boxes, threads, strict=True)
                if sb.id in got and not t.is_alive()}
        with self._lock:
            self._db.executemany(f"INSERT INTO metrics VALUES ({','.join('?' * 10)})",
                                 [_row(sid, m) for sid, m in done.items()])
        return done

    def sample_all(self, engine: EngineLike) -> int:
        """One sample of every running sandbox (as stored: reconciling is not our job)."""
        boxes = [sb for sb in engine.list_all(reconcile=False) if sb.state == State.RUNNING]
        return len(self.sample(engine, boxes)) if boxes else 0

    def prune(self, retention_seconds: float) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM metrics WHERE ts < ?",
                                   (time.time() - retention_seconds,))
        return cur.rowcount

    def history(self, sandbox_id: str, since: datetime | float | None = None,
                limit: int | None = None) -> list[dict[str, Any]]:
        """Samples oldest first; ``limit`` keeps the newest."""
        sql = f"SELECT {','.join(COLUMNS)} FROM metrics WHERE sandbox_id = ? AND ts >= ? " \
              "ORDER BY ts DESC"
        args: list[Any] = [sandbox_id, _epoch(since) if since is not None else 0.0]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [dict(zip(COLUMNS, r, strict=True)) for r in reversed(self._query(sql, args))]

    def latest(self, max_age: float) -> dict[str, dict[str, Any]]:
        """Each sandbox's newest sample, if younger than ``max_age`` seconds."""
        rows = self._query(f"SELECT {','.join(COLUMNS)}, max(ts) FROM metrics WHERE ts >= ? "
                           "GROUP BY sandbox_id", (time.time() - max_age,))
        return {r[1]: dict(zip(COLUMNS, r[:-1], strict=True)) for r in rows}

    def lifecycle_events(self) -> dict[str, list[Event]]:
        """The events that decide running time, by sandbox, in one query: going through
        ``store.events`` would also parse every command event, for nothing."""
        marks = ",".join("?" * len(LIFECYCLE))
        rows = self._query("SELECT id, ts, sandbox_id, sandbox, kind, json_extract(data, "
                           f"'$.state') FROM events WHERE kind IN ({marks}) ORDER BY id",
                           sorted(LIFECYCLE))
        out: dict[str, list[Event]] = {}
        for i, ts, sid, name, kind, state in rows:
            out.setdefault(sid, []).append(Event(
                id=i, ts=datetime.fromisoformat(ts), sandbox_id=sid, sandbox=name, kind=kind,
                data={"state": state} if state else {}))
        return out

    def command_counts(self) -> dict[tuple[str, str], int]:
        """(sandbox_id, exit code or "background") -> commands run."""
        rows = self._query(
            "SELECT sandbox_id, json_extract(data, '$.exit_code'), "
            "json_extract(data, '$.background'), count(*) FROM events "
            "WHERE kind = 'command' AND sandbox_id IS NOT NULL GROUP BY 1, 2, 3")
        return {(sid, "background" if bg else str(code)): n for sid, code, bg, n in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _row(sandbox_id: str, m: SandboxMetrics) -> tuple[Any, ...]:
    return (m.sampled_at, sandbox_id, m.cpu_percent, m.memory.get("used", 0),
            m.memory.get("total", 0), m.disk.get("read_bytes", 0),
            m.disk.get("write_bytes", 0), m.net.get("rx_bytes", 0), m.net.get("tx_bytes", 0),
            m.uptime)


def _epoch(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)


def as_sample(sandbox_id: str, m: SandboxMetrics) -> dict[str, Any]:
    """A live measurement in the shape :meth:`Collector.history` returns."""
    return dict(zip(COLUMNS, _row(sandbox_id, m), strict=True))


async def run_sampler(engine: EngineLike, interval: float, retention: float,
                      stop_event: asyncio.Event) -> None:
    """The daemon's sampling loop: sample, prune, sleep the rest of ``interval``. Runs
    on a thread of its own so a stuck engine call neither blocks the event loop nor
    keeps ``stop_event`` from ending the loop at once."""
    collector = Collector(engine.store)

    def tick() -> None:
        collector.sample_all(engine)
        collector.prune(retention)

    sampler = Periodic("aiva-sampler", interval, [Step(tick, "metrics sampling failed")], log)
    try:
        await sampler.run(stop_event)
    finally:
        if not sampler.busy:  # else the thread still uses it
            collector.close()


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class Price:
    cpu_hour: float = 0.0  # per CPU per hour running
    gb_hour: float = 0.0  # per GiB of memory per hour running


def price_for(backend: str, config: Any = None) -> Price:
    """The ``cost.<backend>`` prices of the config; nothing configured costs nothing."""
    section = getattr(config if config is not None else load_config(), "cost", None)
    found = getattr(section, backend, None)
    if found is None:
        return Price()
    return Price(float(found.cpu_hour), float(found.gb_hour))


def running_seconds(sb: SandboxInfo, events: Iterable[Event], now: datetime | None = None
                    ) -> float:
    """Time spent running: each stretch from started/resumed to stopped/paused/deleted/
    error. A stretch still open ends now if the sandbox runs, else at its last change."""
    total, since = 0.0, None
    for ev in sorted(events, key=lambda e: e.id or 0):
        state = ev.data.get("state") if ev.kind == "reconciled" else None
        if since is None and (ev.kind in OPENS or state == State.RUNNING):
            since = ev.ts
        elif since is not None and (ev.kind in CLOSES or state not in (None, State.RUNNING)):
            total += (ev.ts - since).total_seconds()
            since = None
    if since is not None:
        end = (now or datetime.now(UTC)) if sb.state == State.RUNNING else sb.updated_at
        total += max(0.0, (end - since).total_seconds())
    return total


def cost_of(sb: SandboxInfo, events: Iterable[Event], price: Price | None = None, *,
            now: datetime | None = None) -> float:
    """Running hours x (CPUs x cpu_hour + memory GiB x gb_hour), at the current spec."""
    p = price if price is not None else price_for(sb.spec.backend)
    hours = running_seconds(sb, events, now) / 3600.0
    return hours * (sb.spec.cpus * p.cpu_hour + sb.spec.memory / GIB * p.gb_hour)


def reconciled(engine: EngineLike) -> list[SandboxInfo]:
    """Every sandbox, reconciled one by one: a backend that cannot answer keeps its
    sandboxes' stored state instead of failing the whole list."""
    out = []
    for sb in engine.list_all(reconcile=False):
        try:
            sb = engine.reconcile(sb)
        except AivaError as exc:
            log.warning("cannot reconcile %s: %s", sb.name, exc)
        out.append(sb)
    return out


def costs(engine: EngineLike, *, collector: Collector | None = None, config: Any = None,
          boxes: list[SandboxInfo] | None = None, now: datetime | None = None
          ) -> list[dict[str, Any]]:
    """What each sandbox has cost so far, from the ``cost`` prices in the config."""
    config = config if config is not None else getattr(engine, "config", None) or load_config()
    own = collector is None
    coll = collector or Collector(engine.store)
    try:
        history = coll.lifecycle_events()
    finally:
        if own:
            coll.close()
    currency = str(getattr(getattr(config, "cost", None), "currency", "USD"))
    rows = []
    for sb in boxes if boxes is not None else reconciled(engine):
        price, evs = price_for(sb.spec.backend, config), history.get(sb.id, [])
        rows.append({"sandbox": sb.name, "id": sb.id, "backend": sb.spec.backend,
                     "state": sb.state.value, "cpus": sb.spec.cpus, "memory": sb.spec.memory,
                     "running_seconds": round(running_seconds(sb, evs, now), 3),
                     "cpu_hour": price.cpu_hour, "gb_hour": price.gb_hour,
                     "cost": round(cost_of(sb, evs, price, now=now), 6), "currency": currency})
    return rows


# --------------------------------------------------------------------------- events


def export_jsonl(store: EventSource, out: IO[str], sandbox_id: str | None = None,
                 after: int = 0) -> int:
    """Events after id ``after`` as JSON lines, the eventlog plugin's format (a line
    reads back with ``Event.model_validate_json``); returns how many."""
    n = 0
    for ev in store.events(sandbox_id=sandbox_id, after=after):
        out.write(ev.model_dump_json() + "\n")
        n += 1
    return n


def follow_events(store: EventSource, sandbox_id: str | None = None, poll: float = 0.2,
                  after: int | None = None) -> Iterator[Event]:
    """Events as they are stored by any process, from id ``after`` (default: from now),
    until the caller stops. SQLite tells no one about new rows, so this polls by id;
    ids follow commit order because SQLite has one writer at a time."""
    if after is None:
        newest = store.events(limit=1)
        after = (newest[-1].id or 0) if newest else 0
    while True:
        batch = store.events(sandbox_id=sandbox_id, after=after)
        for ev in batch:
            after = ev.id or after
            yield ev
        if not batch:
            time.sleep(poll)
