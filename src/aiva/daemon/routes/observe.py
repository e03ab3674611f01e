"""What the dashboard reads: one overview of every sandbox, and metrics history.

The daemon's sampler (:func:`aiva.observe.collector.run_sampler`, started by ``server._run``)
owns a :class:`~aiva.observe.collector.Collector` of its own inside its loop. These routes read
the same ``metrics`` table through a second Collector kept on ``app.state`` (made on
first use): a Collector is one SQLite connection to the state db in WAL mode, so a
reader never waits for the sampler and the sampler's lifetime stays its own business.

The dashboard's static files (``aiva/daemon/dashboard/``) are mounted at ``/ui`` by
:func:`mount_dashboard`; :class:`~aiva.daemon.app.Gate` lets ``GET /ui...`` (and the
``/`` redirect) through without the token, since those files hold no secret.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from aiva.daemon import wire
from aiva.daemon.app import Eng
from aiva.daemon.bridge import run_sync
from aiva.engine import Engine
from aiva.models import Event, SandboxInfo, State
from aiva.observe.collector import CLOSES, COLUMNS, OPENS, Collector

router = APIRouter()
UI = "/ui"
#: The page embeds noVNC from the desktop endpoint's loopback URL and nothing else.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-src http://127.0.0.1:* http://localhost:*; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


# ---------------------------------------------------------------------- models


class MetricSample(BaseModel):
    """One stored sample (``Collector.history`` row); ``cpu_percent`` on the top scale."""

    ts: float = Field(description="when it was measured, seconds since the epoch")
    cpu_percent: float
    mem_used: int
    mem_total: int
    disk_read: int
    disk_write: int
    net_rx: int
    net_tx: int
    uptime: float


class MetricsHistory(BaseModel):
    sandbox: str
    id: str
    interval: float = Field(description="the daemon's sampling interval, seconds")
    samples: list[MetricSample] = Field(description="oldest first")


class SandboxRow(BaseModel):
    """A sandbox as the dashboard's list shows it."""

    name: str
    id: str
    state: State
    error: str | None = None
    backend: str
    image: str
    template: str | None = None
    cpus: float
    cpu_limit: float | None = Field(None, description="the CPUs the sandbox is held to, or "
                                    "None when it may use all of the host's")
    host_cpus: int = Field(description="CPUs of the host")
    memory: int
    desktop: bool = False
    ports: list[str] = Field(description="published ports, HOST->GUEST/PROTO")
    running_since: datetime | None = None
    uptime: float | None = Field(None, description="seconds running, while running")
    updated_at: datetime
    latest: MetricSample | None = Field(None, description="newest sample, if fresh")


class Overview(BaseModel):
    now: float
    interval: float = Field(description="the daemon's sampling interval, seconds")
    sandboxes: list[SandboxRow]


# ---------------------------------------------------------------------- routes


async def collector_of(request: Request) -> Collector:
    """The app's reading Collector (async: made on the loop's thread, so only once)."""
    state = request.app.state
    coll = getattr(state, "collector", None)
    if coll is None:
        coll = state.collector = Collector(cast(Engine, state.engine).store)
    return cast(Collector, coll)


Coll = Depends(collector_of)


def _interval(eng: Engine) -> float:
    return float(eng.config.collector.interval)


def _sample(row: dict[str, Any]) -> MetricSample:
    return MetricSample(**{k: row[k] for k in COLUMNS if k != "sandbox_id"})


@router.get(f"{wire.API}/overview", tags=["observe"])
async def overview(reconcile: bool = False, eng: Engine = Eng, coll: Collector = Coll
                   ) -> Overview:
    """Every sandbox with its uptime and newest sample, in one call. The daemon's
    lifetimes loop reconciles every 2 s, so the stored state is fresh by default."""

    def build() -> Overview:
        interval = _interval(eng)
        boxes = eng.list_all(reconcile=reconcile)
        latest = coll.latest(max(3 * interval, 15.0))
        lifecycle = coll.lifecycle_events()
        now = time.time()
        host_cpus = os.cpu_count() or 1
        rows = []
        for sb in boxes:
            since = _running_since(sb, lifecycle.get(sb.id, ()))
            fresh = latest.get(sb.id) if sb.state == State.RUNNING else None
            rows.append(SandboxRow(
                name=sb.name, id=sb.id, state=sb.state, error=sb.error,
                backend=sb.spec.backend, image=sb.spec.image, template=sb.spec.template,
                cpus=sb.spec.cpus, memory=sb.spec.memory, ports=_ports(sb),
                cpu_limit=sb.spec.cpus if sb.spec.cpus < host_cpus else None,
                host_cpus=host_cpus, desktop=sb.spec.desktop,
                running_since=since, updated_at=sb.updated_at,
                uptime=None if since is None else round(max(0.0, now - since.timestamp()), 1),
                latest=_sample(fresh) if fresh else None))
        return Overview(now=now, interval=interval, sandboxes=rows)

    return await run_sync(build)


@router.get(f"{wire.API}/sandboxes/{{name}}/metrics/history", tags=["observe"])
async def metrics_history(
    name: str,
    since: float | None = Query(None, description="seconds since the epoch; default: "
                                "the last `window` seconds"),
    window: float = Query(900.0, gt=0, description="used when `since` is not given"),
    limit: int = Query(500, ge=1, le=20000, description="keep the newest this many"),
    eng: Engine = Eng, coll: Collector = Coll,
) -> MetricsHistory:
    """The samples the daemon's sampler stored for this sandbox, oldest first."""

    def build() -> MetricsHistory:
        sb = eng.get(name)
        start = since if since is not None else time.time() - window
        rows = coll.history(sb.id, start, limit=limit)
        return MetricsHistory(sandbox=sb.name, id=sb.id, interval=_interval(eng),
                              samples=[_sample(r) for r in rows])

    return await run_sync(build)


def _ports(sb: SandboxInfo) -> list[str]:
    """What the backend published (runtime), else what the spec asked for."""
    got = sb.runtime.get("ports")
    if isinstance(got, list) and all(isinstance(p, str) for p in got) and got:
        return [str(p) for p in got]
    return [f"{p.host_ip}:{p.host_port or '?'}->{p.guest_port}/{p.protocol}"
            for p in sb.spec.ports]


def _running_since(sb: SandboxInfo, events: Iterable[Event]) -> datetime | None:
    """Start of the current running stretch: the backend's ``started_at`` when it gives
    one, else the last started/resumed event not followed by a stop (cost's rule)."""
    if sb.state != State.RUNNING:
        return None
    stamp = sb.runtime.get("started_at")
    if isinstance(stamp, str) and stamp and not stamp.startswith("0001-"):
        try:
            when = datetime.fromisoformat(stamp)
            return when if when.tzinfo else when.replace(tzinfo=UTC)
        except ValueError:
            pass
    since: datetime | None = None
    for ev in sorted(events, key=lambda e: e.id or 0):
        state = ev.data.get("state") if ev.kind == "reconciled" else None
        if since is None and (ev.kind in OPENS or state == State.RUNNING):
            since = ev.ts
        elif since is not None and (ev.kind in CLOSES or state not in (None, State.RUNNING)):
            since = None
    return since


# ---------------------------------------------------------------------- static files


class DashboardFiles(StaticFiles):
    """The dashboard's files, never cached stale, with a strict content policy."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "no-cache"
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "no-referrer"
        response.headers["content-security-policy"] = CSP
        return response


def mount_dashboard(app: FastAPI) -> None:
    """``/ui/`` serves ``aiva/daemon/dashboard/``; ``/`` and ``/ui`` redirect there."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{UI}/", status_code=307)

    @app.get(UI, include_in_schema=False)
    async def ui() -> RedirectResponse:
        return RedirectResponse(f"{UI}/", status_code=307)

    app.mount(UI, DashboardFiles(packages=[("aiva.daemon", "dashboard")], html=True),
              name="dashboard")
