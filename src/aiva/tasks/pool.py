"""The warm pool: ready sandboxes per template, so a task starts in milliseconds.

A pool sandbox is an ordinary sandbox named ``pool-<template>-<4hex>`` with the label
``aiva.pool=<template>``. Nothing about the pool lives only in memory, so its state
survives a daemon restart and several processes (the daemon, ``aiva pool warm``) can
share it:

- **membership**: the store's ``sandboxes`` rows with that label;
- **busy or idle**: ``runtime["pool_busy"]`` (``{"holder", "since", "kept"}`` or None) and
  ``runtime["pool_idle_since"]``. A sandbox with neither key is still warming up;
- **warming**: a row per sandbox being made in the ``pool_pending`` table (state db), so
  a creation counts against ``max`` before its store row exists;
- **limits**: config ``pool:`` (and ``pool.templates``), overridden by ``aiva pool resize``
  in the ``pool_templates`` table.

Every decision that reads those facts and marks a sandbox (claim, drain, the plan of
``maintain``) runs under a flock on ``AIVA_HOME/run/locks/pool/<template>.lock``: one
open file per acquisition, so it excludes other threads as well as other processes. The
slow parts (create, delete, restore) run outside it, on sandboxes already marked.

A sandbox serves one task, then is made clean or destroyed, never shared dirty. Reset
(``pool.reset``) is ``recreate`` by default: measured on a 2-CPU host (Docker 20.10, overlay2;
bench/pool.py figure 3), deleting a used sandbox and creating a fresh one took ~0.40 s,
while restoring the ``clean`` snapshot took ~0.63 s (a Docker snapshot is a commit plus
a volume copy, and restore removes the container, copies the volume back through a helper
container and starts a new container), and ``restore`` also costs a ~0.35 s snapshot per
sandbox warmed. ``restore`` stays available for backends where a snapshot is cheap.

A holder that dies with a lease (its process is gone) leaks a dirty sandbox: ``maintain``
destroys it, unless the lease was kept with :meth:`WarmPool.keep` (a task awaiting
approval holds its sandbox across restarts).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiva import paths
from aiva.agent_client import bundle
from aiva.config import PoolSettings
from aiva.engine.store import SqliteFile
from aiva.errors import AivaError, InvalidValue, SandboxExists, SandboxNotFound
from aiva.models import SandboxSpec, State, utcnow

if TYPE_CHECKING:
    from aiva.engine import Engine
    from aiva.observe.collector import Collector

log = logging.getLogger("aiva.pool")

LABEL = "aiva.pool"
CLEAN_TAG = "clean"
#: A creation whose maker is alive but has not finished after this long is abandoned.
PENDING_TTL = 900.0
#: Samples older than this do not count for placement.
LOAD_MAX_AGE = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS pool_templates (
    template TEXT PRIMARY KEY,
    min_warm INTEGER,
    max INTEGER,
    idle_shrink REAL,
    active INTEGER NOT NULL DEFAULT 1,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pool_pending (
    name TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    purpose TEXT NOT NULL,
    holder TEXT NOT NULL,
    started REAL NOT NULL
);
"""


class PoolExhausted(AivaError):
    """Every sandbox of a template's pool stayed busy until the claim's deadline."""

    recoverable = True


@dataclass
class Lease:
    """One claimed pool sandbox: give it back with :meth:`WarmPool.release`."""

    name: str
    template: str
    claimed_at: datetime = field(default_factory=utcnow)
    warm: bool = True  # False: the pool was at no idle one and grew for this claim
    waited: float = 0.0  # seconds the claim took


@dataclass(frozen=True)
class Limits:
    min_warm: int
    max: int
    idle_shrink: float
    active: bool  # kept warm (topped up to min_warm); off after a drain, on at a claim


@dataclass(frozen=True)
class Member:
    """A pool sandbox as the decisions see it."""

    name: str
    state: str = "running"
    ready: bool = True  # warmed: it has the pool's runtime keys
    busy: bool = False
    holder_alive: bool = True
    kept: bool = False
    idle_since: float | None = None
    warming: bool = False  # its pending row is still there
    sandbox_id: str = ""

    @property
    def idle(self) -> bool:
        return self.ready and not self.busy and not self.warming and self.state == "running"


@dataclass
class Plan:
    create: int = 0
    shrink: list[str] = field(default_factory=list)
    reap: list[str] = field(default_factory=list)  # dead, leaked or half-made


# ---------------------------------------------------------------------- decisions


def plan(members: list[Member], pending: int, pending_idle: int, limits: Limits,
         now: float) -> Plan:
    """What ``maintain`` does to one template's pool: reap dead idle sandboxes, leaked
    leases (holder gone, not kept) and half-made ones (no pending row, never marked);
    shrink idle ones over ``max`` (oldest idle first), then those beyond ``min_warm``
    idle for ``idle_shrink``; top up the idle ones (counting those being made for idle)
    to ``min_warm`` while the total stays within ``max``. ``pending``: creations under
    way (rows in pool_pending), ``pending_idle``: those of them that will be idle."""
    out = Plan()
    for m in members:
        if m.warming:
            continue
        if not m.ready:
            out.reap.append(m.name)
        elif m.busy:
            if not m.holder_alive and not m.kept:
                out.reap.append(m.name)
        elif m.state != "running":
            out.reap.append(m.name)
    live = [m for m in members if m.name not in out.reap and not m.warming]
    total = len(live) + pending
    idle = sorted((m for m in live if m.idle), key=lambda m: m.idle_since or 0.0)
    over = max(0, total - limits.max)
    out.shrink = [m.name for m in idle[:over]]
    rest = idle[over:]
    keep = limits.min_warm if limits.active else 0
    extra = len(rest) - keep
    for m in rest:
        if extra <= 0:
            break
        if now - (m.idle_since or now) >= limits.idle_shrink:
            out.shrink.append(m.name)
            extra -= 1
    if limits.active:
        idle_left = len(idle) - len(out.shrink)
        room = limits.max - (total - len(out.shrink))
        out.create = max(0, min(limits.min_warm - idle_left - pending_idle, room))
    return out


def load_score(sample: dict[str, Any] | None) -> float:
    """How loaded a sandbox looks from its newest sample: CPU (1.0 = one core busy)
    plus the fraction of its memory in use. No sample: 0."""
    if not sample:
        return 0.0
    cpu = float(sample.get("cpu_percent") or 0.0) / 100.0
    total = float(sample.get("mem_total") or 0.0)
    mem = float(sample.get("mem_used") or 0.0) / total if total > 0 else 0.0
    return cpu + mem


def choose(idle: list[Member], load: dict[str, float], *, bucket: float = 0.05
           ) -> Member | None:
    """The idle sandbox to hand out: the least loaded (scores within ``bucket`` count as
    equal, samples are noisy), then the one idle the shortest time. Most-recently-used
    first lets the others age past ``idle_shrink``, so a pool that grew shrinks again;
    handing out the oldest would keep every one of them young."""
    if not idle:
        return None

    def key(m: Member) -> tuple[int, float]:
        return int(load.get(m.name, 0.0) / bucket), -(m.idle_since or 0.0)

    return min(idle, key=key)


def resolve_limits(settings: PoolSettings, template: str, row: dict[str, Any] | None
                   ) -> Limits:
    """The template's limits: ``aiva pool resize`` (``row``) over ``pool.templates``
    over the ``pool`` section. Active: the row says; else whether config lists it."""
    conf = settings.templates.get(template)

    def pick(key: str) -> Any:
        if row is not None and row.get(key) is not None:
            return row[key]
        if conf is not None and getattr(conf, key) is not None:
            return getattr(conf, key)
        return getattr(settings, key)

    mx = int(pick("max"))
    active = bool(row["active"]) if row is not None else conf is not None
    return Limits(min(int(pick("min_warm")), mx), mx, float(pick("idle_shrink")), active)


def slug(template: str) -> str:
    """A template or image as a name part: ``aiva/python:latest`` -> ``aiva-python-latest``."""
    s = re.sub(r"[^a-z0-9]+", "-", template.lower()).strip("-")
    return s[:40] or "x"


def holder_id(pid: int | None = None) -> str:
    """``pid:start time`` of a process, so a reused pid is not taken for the old one."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or ''}"


def holder_alive(holder: str) -> bool:
    pid_text, _, start = holder.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    now = _start_time(pid)
    if now is not None:
        return not start or now == start
    if Path("/proc/self/stat").exists():
        return False  # /proc works here and has no such process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22, starttime


def member_of(name: str, sandbox_id: str, state: str, runtime: dict[str, Any],
              warming: bool) -> Member:
    busy = runtime.get("pool_busy")
    ready = "pool_busy" in runtime or "pool_idle_since" in runtime
    return Member(
        name=name, state=state, ready=ready, busy=bool(busy),
        holder_alive=holder_alive(str(busy.get("holder", ""))) if busy else True,
        kept=bool(busy.get("kept")) if busy else False,
        idle_since=runtime.get("pool_idle_since"), warming=warming, sandbox_id=sandbox_id)


# ---------------------------------------------------------------------- the pool


class _PoolDB(SqliteFile):
    """The pool's two tables in the state db (a connection per thread, like the stores)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    def write(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        self._db.execute(sql, args)


class WarmPool:
    """Warm sandboxes per template for tasks; see the module's docstring.

    ``engine`` must be the in-process :class:`~aiva.engine.Engine` (the pool reads and
    marks the store itself). ``config``: the ``pool`` settings (default: the engine's).
    """

    def __init__(self, engine: Engine, config: PoolSettings | None = None) -> None:
        self.engine = engine
        self.settings = config or engine.config.pool
        self._db = _PoolDB(engine.store.path)
        self._holder = holder_id()
        self._cond = threading.Condition()
        self._workers: ThreadPoolExecutor | None = None
        self._background: set[Future[None]] = set()
        self._collector: Collector | None = None
        self._mu = threading.Lock()
        # The agent bundle is written once per AIVA_HOME under a temp dir named by pid:
        # made here, before the pool creates sandboxes from several threads at once.
        bundle.agent_bundle()

    # ------------------------------------------------------------------ facts

    @contextmanager
    def _locked(self, template: str) -> Iterator[None]:
        path = paths.pool_lock(slug(template))
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def limits(self, template: str) -> Limits:
        rows = self._db.query("SELECT * FROM pool_templates WHERE template = ?", (template,))
        return resolve_limits(self.settings, template, dict(rows[0]) if rows else None)

    def templates(self) -> list[str]:
        """Every template the pool knows: configured, resized or claimed, or with members."""
        names = set(self.settings.templates)
        names |= {r["template"] for r in self._db.query("SELECT template FROM pool_templates")}
        names |= {r["template"] for r in self._db.query("SELECT template FROM pool_pending")}
        names |= {r[0] for r in self._db.query(
            "SELECT DISTINCT json_extract(spec, '$.labels.\"aiva.pool\"') FROM sandboxes "
            "WHERE json_extract(spec, '$.labels.\"aiva.pool\"') IS NOT NULL")}
        return sorted(names)

    def _pending(self, template: str) -> list[sqlite3.Row]:
        """Creations under way; rows of makers that died (or took far too long) dropped."""
        rows = self._db.query("SELECT * FROM pool_pending WHERE template = ?", (template,))
        now = time.time()
        live = []
        for r in rows:
            if holder_alive(r["holder"]) and now - r["started"] < PENDING_TTL:
                live.append(r)
            else:
                self._db.write("DELETE FROM pool_pending WHERE name = ?", (r["name"],))
        return live

    def members(self, template: str) -> list[Member]:
        """The template's pool sandboxes as stored now (one query; a pool holds a
        handful per template)."""
        warming = {r["name"] for r in self._pending(template)}
        rows = self._db.query(
            "SELECT id, name, state, runtime FROM sandboxes "
            "WHERE json_extract(spec, '$.labels.\"aiva.pool\"') = ? ORDER BY created_at",
            (template,))
        return [member_of(r["name"], r["id"], r["state"], json.loads(r["runtime"]),
                          r["name"] in warming) for r in rows]

    def _activate(self, template: str, active: bool = True) -> None:
        self._db.write(
            "INSERT INTO pool_templates (template, active, updated_at) VALUES (?,?,?) "
            "ON CONFLICT(template) DO UPDATE SET active = excluded.active, "
            "updated_at = excluded.updated_at",
            (template, int(active), utcnow().isoformat()))

    def _load(self, idle: list[Member]) -> dict[str, float]:
        """Scores from the collector's newest samples (the daemon's sampler writes them;
        one query). Measuring live would cost ~1 s per Docker sandbox."""
        if len(idle) < 2:
            return {}
        try:
            with self._mu:
                if self._collector is None:
                    from aiva.observe.collector import Collector

                    self._collector = Collector(self.engine.store.path)
                coll = self._collector
            latest = coll.latest(LOAD_MAX_AGE)
        except Exception as exc:  # placement is an optimisation; never fail a claim on it
            log.debug("no load samples: %s", exc)
            return {}
        return {m.name: load_score(latest.get(m.sandbox_id)) for m in idle}

    def _mark(self, name: str, *, busy: bool, kept: bool = False) -> None:
        if busy:
            info = {"holder": self._holder, "since": time.time(), "kept": kept}
            self.engine.store.update(name, runtime={"pool_busy": info})
        else:
            self.engine.store.update(name, runtime={"pool_busy": None,
                                                    "pool_idle_since": time.time()})

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ making

    def spec(self, template: str) -> SandboxSpec:
        """A pool sandbox's spec: the template (or image), the pool's label and size; no
        timeouts or restarts of its own (the pool decides when it goes)."""
        from aiva.images.build import TEMPLATES

        known = template in TEMPLATES
        s = self.settings
        spec = self.engine.build_spec(template=template if known else None,
                                      image=None if known else template,
                                      labels={LABEL: template}, cpus=s.cpus, memory=s.memory)
        return spec.model_copy(update={"timeout": None, "idle_timeout": None,
                                       "restart": "no"})

    def _reserve(self, template: str, purpose: str) -> str:
        """A name and its pending row (the caller holds the template's lock)."""
        while True:
            name = f"pool-{slug(template)}-{secrets.token_hex(2)}"
            if self.engine.exists(name):
                continue
            try:
                self._db.write("INSERT INTO pool_pending VALUES (?,?,?,?,?)",
                               (name, template, purpose, self._holder, time.time()))
            except sqlite3.IntegrityError:
                continue
            return name

    def _make(self, template: str, name: str, *, busy: bool) -> None:
        """Create (and for ``restore`` snapshot) a reserved sandbox, then mark it busy
        for this process or idle; undone if anything fails."""
        t0 = time.perf_counter()
        try:
            try:
                self.engine.create(name, self.spec(template))
            except SandboxExists:
                raise AivaError(f"pool sandbox name {name} is taken") from None
            if self.settings.reset == "restore":
                self.engine.snapshot(name, CLEAN_TAG)
            with self._locked(template):
                self._db.write("DELETE FROM pool_pending WHERE name = ?", (name,))
                self._mark(name, busy=busy)
        except BaseException:
            self._db.write("DELETE FROM pool_pending WHERE name = ?", (name,))
            self._destroy(name)
            raise
        self.engine.record(name, "pool_warmed", template=template,
                           seconds=round(time.perf_counter() - t0, 4), busy=busy)
        self._notify()

    def _destroy(self, name: str) -> None:
        try:
            self.engine.delete(name, volumes=True)
        except SandboxNotFound:
            pass
        except Exception as exc:
            log.warning("could not delete pool sandbox %s: %s", name, exc)

    def _alive(self, name: str) -> bool:
        """Cheap check that a picked sandbox answers (and its agent connection is made
        now, so the task's first exec does not pay for it)."""
        try:
            self.engine.agent(name).ping(timeout=5)
            return True
        except Exception as exc:
            log.info("pool sandbox %s does not answer: %s", name, exc)
            return False

    def _pool_of(self) -> ThreadPoolExecutor:
        with self._mu:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(8, thread_name_prefix="aiva-pool")
            return self._workers

    # ------------------------------------------------------------------ claim/release

    def claim(self, template: str, timeout: float | None = None) -> Lease:
        """A clean running sandbox of ``template`` for one task: an idle warm one at
        once (the least loaded), else a new one while the pool is under ``max``, else
        wait up to ``timeout`` seconds (default ``pool.claim_timeout``) for one to come
        back; then :class:`PoolExhausted`."""
        timeout = self.settings.claim_timeout if timeout is None else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout
        announced = False
        while True:
            grow: str | None = None
            with self._locked(template):
                limits = self.limits(template)
                if not limits.active:
                    self._activate(template)
                members = self.members(template)
                idle = [m for m in members if m.idle]
                pick = choose(idle, self._load(idle))
                if pick is not None:
                    self._mark(pick.name, busy=True)
                else:
                    pending = len(self._pending(template))
                    live = sum(1 for m in members if not m.warming)
                    if live + pending < limits.max:
                        grow = self._reserve(template, "claim")
            if pick is not None:
                if not self._alive(pick.name):
                    self.engine.record(pick.name, "pool_replaced", template=template,
                                       reason="did not answer when claimed")
                    self._destroy(pick.name)
                    continue
                return self._leased(pick.name, template, t0, warm=True)
            if grow is not None:
                self._make(template, grow, busy=True)
                return self._leased(grow, template, t0, warm=False)
            left = deadline - time.monotonic()
            if left <= 0:
                self.engine.record_global("pool_exhausted", template=template,
                                          max=limits.max, waited=round(timeout, 3))
                raise PoolExhausted(
                    f"no '{template}' sandbox came free in {timeout:g} s: all "
                    f"{limits.max} of the pool's sandboxes are busy",
                    hint=f"allow more with `aiva pool resize {template} --max N`, or "
                         "claim with a longer timeout")
            if not announced:
                log.info("pool %s is at its max (%d): waiting", template, limits.max)
                announced = True
            with self._cond:
                self._cond.wait(min(0.1, left))

    def _leased(self, name: str, template: str, t0: float, *, warm: bool) -> Lease:
        lease = Lease(name, template, warm=warm, waited=time.monotonic() - t0)
        self.engine.record(name, "pool_claimed", template=template, warm=warm,
                           seconds=round(lease.waited, 6))
        return lease

    def keep(self, lease: Lease) -> None:
        """Hold the sandbox beyond this process's life (a task awaiting approval):
        ``maintain`` then never takes it for a leaked lease."""
        with self._locked(lease.template):
            sb = self.engine.get(lease.name)
            busy = dict(sb.runtime.get("pool_busy") or {"holder": self._holder})
            busy["kept"] = True
            self.engine.store.update(lease.name, runtime={"pool_busy": busy})

    def release(self, lease: Lease, *, reset: bool = True, wait: bool = True) -> None:
        """Give a sandbox back. ``reset=True``: made clean (``pool.reset``: a fresh one
        in its place, or its ``clean`` snapshot restored; destroyed if that fails) and
        idle again; ``reset=False``: destroyed (``maintain`` tops the pool up).
        ``wait=False`` does it in the background (:meth:`close` waits for it), so the
        caller is free at once; the sandbox is busy until it is clean."""
        if wait:
            self._release(lease, reset)
            return
        fut = self._pool_of().submit(self._release, lease, reset)
        with self._mu:
            self._background.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._mu:
            self._background.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("pool release failed: %s", fut.exception())

    def retire(self, lease: Lease, *, reason: str) -> None:
        """Take a sandbox out of the pool for good, stopped, with its disk and snapshots:
        a rolled-back task's sandbox, kept for debugging (``aiva rm`` ends it). The pool
        makes a new one in its place."""
        name, template = lease.name, lease.template
        sb = self.engine.store.find(name)
        if sb is not None:
            with self._locked(template):
                labels = {k: v for k, v in sb.spec.labels.items() if k != LABEL}
                labels["aiva.retired_from_pool"] = template
                self.engine.store.update(name, spec=sb.spec.model_copy(
                    update={"labels": labels}), runtime={"pool_busy": None,
                                                         "pool_idle_since": None})
            self.engine.record(name, "pool_retired", template=template, reason=reason)
            try:
                if self.engine.get(name).state == State.RUNNING:
                    self.engine.stop(name)
            except AivaError as exc:
                log.warning("cannot stop retired %s: %s", name, exc)
        self._notify()
        self._replace(template)

    def _release(self, lease: Lease, reset: bool) -> None:
        t0 = time.perf_counter()
        name, template = lease.name, lease.template
        sb = self.engine.store.find(name)
        if sb is None or sb.spec.labels.get(LABEL) != template:
            self._notify()
            return
        method = self.settings.reset if reset else "destroy"
        if method == "restore":
            try:
                self.engine.restore(name, CLEAN_TAG)
                if self.engine.get(name).state != State.RUNNING or not self._alive(name):
                    raise AivaError(f"{name} is not running after its restore")
                with self._locked(template):
                    self._mark(name, busy=False)
                self.engine.record(name, "pool_released", template=template, reset="restore",
                                   seconds=round(time.perf_counter() - t0, 4))
                self._notify()
                return
            except Exception as exc:
                log.warning("restoring %s failed, destroying it: %s", name, exc)
                method = "recreate"
        self.engine.record(name, "pool_released", template=template, reset=method)
        self._destroy(name)
        self._notify()
        if method == "recreate":
            self._replace(template)

    def _replace(self, template: str) -> None:
        """A fresh idle sandbox for one just destroyed, if the pool has room."""
        with self._locked(template):
            limits = self.limits(template)
            members = self.members(template)
            total = sum(1 for m in members if not m.warming) + len(self._pending(template))
            if not limits.active or total >= limits.max:
                return
            name = self._reserve(template, "idle")
        self._make(template, name, busy=False)

    # ------------------------------------------------------------------ upkeep

    def maintain(self, template: str | None = None) -> dict[str, dict[str, Any]]:
        """Top up, shrink and replace, for one template or all: what the daemon runs
        every few seconds. Returns per template what was created, shrunk and reaped."""
        out: dict[str, dict[str, Any]] = {}
        for t in [template] if template else self.templates():
            out[t] = self._maintain(t)
        return out

    def _maintain(self, template: str) -> dict[str, Any]:
        for m in self.members(template):  # let dead idle ones show as dead
            if m.idle:
                try:
                    self.engine.reconcile(self.engine.get(m.name))
                except SandboxNotFound:
                    pass
        now = time.time()
        with self._locked(template):
            limits = self.limits(template)
            members = self.members(template)
            pending = self._pending(template)
            p = plan(members, len(pending), sum(r["purpose"] == "idle" for r in pending),
                     limits, now)
            for name in p.shrink + p.reap:  # nobody may claim what is about to go
                try:
                    self._mark(name, busy=True)
                except SandboxNotFound:
                    pass
            names = [self._reserve(template, "idle") for _ in range(p.create)]
        jobs: list[Future[None]] = []
        workers = self._pool_of()
        for name in p.reap:
            self.engine.record_global("pool_reaped", template=template, sandbox=name)
            jobs.append(workers.submit(self._destroy, name))
        for name in p.shrink:
            self.engine.record_global("pool_shrunk", template=template, sandbox=name)
            jobs.append(workers.submit(self._destroy, name))
        jobs += [workers.submit(self._make, template, name, busy=False) for name in names]
        errors = [str(j.exception()) for j in jobs if j.exception() is not None]
        for e in errors:
            log.warning("pool %s: %s", template, e)
        self._notify()
        return {"created": names, "shrunk": p.shrink, "reaped": p.reap, "errors": errors}

    def warm(self, template: str) -> dict[str, Any]:
        """Fill the template's pool to ``min_warm`` now (and keep it warm from now on)."""
        self._activate(template)
        return self._maintain(template)

    def drain(self, template: str) -> list[str]:
        """Destroy the template's idle sandboxes and stop keeping it warm (until the next
        claim or warm). Busy ones finish their tasks and go when released."""
        with self._locked(template):
            self._activate(template, False)
            idle = [m.name for m in self.members(template) if m.ready and not m.busy
                    and not m.warming]
            for name in idle:
                self._mark(name, busy=True)
        jobs = [self._pool_of().submit(self._destroy, name) for name in idle]
        for j in jobs:
            j.result()
        if idle:
            self.engine.record_global("pool_drained", template=template, sandboxes=idle)
        return idle

    def resize(self, template: str, min_warm: int | None = None, max: int | None = None,
               idle_shrink: float | None = None) -> Limits:
        """Change (and keep, in the state db) a template's limits; ``maintain`` applies
        them. Also makes the template active."""
        cur = self.limits(template)
        new_min = cur.min_warm if min_warm is None else min_warm
        new_max = cur.max if max is None else max
        if new_max < 1:
            raise InvalidValue(f"max must be at least 1, not {new_max}")
        if new_min < 0:
            raise InvalidValue(f"min must not be negative, not {new_min}")
        if new_min > new_max:
            raise InvalidValue(f"min ({new_min}) is more than max ({new_max})",
                               hint="give both: `aiva pool resize T --min N --max M`")
        if idle_shrink is not None and idle_shrink <= 0:
            raise InvalidValue(f"idle shrink must be positive, not {idle_shrink}")
        with self._locked(template):
            self._db.write(
                "INSERT INTO pool_templates VALUES (?,?,?,?,1,?) ON CONFLICT(template) DO "
                "UPDATE SET min_warm = excluded.min_warm, max = excluded.max, "
                "idle_shrink = COALESCE(excluded.idle_shrink, pool_templates.idle_shrink), "
                "active = 1, updated_at = excluded.updated_at",
                (template, new_min, new_max, idle_shrink, utcnow().isoformat()))
        self.engine.record_global("pool_resized", template=template, min_warm=new_min,
                                  max=new_max, idle_shrink=idle_shrink)
        return self.limits(template)

    def status(self) -> list[dict[str, Any]]:
        """Per template: warm (idle, ready), busy, warming, min, max, idle_shrink."""
        out = []
        for t in self.templates():
            lim = self.limits(t)
            ms = self.members(t)
            out.append({
                "template": t,
                "warm": sum(m.idle for m in ms),
                "busy": sum(m.busy for m in ms),
                "warming": len(self._pending(t)),
                "kept": sum(m.kept for m in ms),
                "min": lim.min_warm,
                "max": lim.max,
                "idle_shrink": lim.idle_shrink,
                "active": lim.active,
                "reset": self.settings.reset,
                "sandboxes": [m.name for m in ms],
            })
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the background releases started so far are done."""
        with self._mu:
            running = list(self._background)
        deadline = None if timeout is None else time.monotonic() + timeout
        for fut in running:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                fut.result(left)
            except Exception:  # logged by _done
                pass

    def close(self, *, wait: bool = True) -> None:
        """Finish background releases (``wait``), then let go of the pool's resources."""
        with self._mu:
            workers, self._workers = self._workers, None
            coll, self._collector = self._collector, None
        if workers is not None:
            workers.shutdown(wait=wait)
        if coll is not None:
            coll.close()
        self._db.close()
