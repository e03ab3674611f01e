"""The daemon's HTTP API: a FastAPI app over one :class:`~aiva.engine.Engine`.

Every route is a thin call into the engine, so the daemon can never disagree with the
in-process engine about what is legal. Errors leave as ``{"error": {"type", "message",
"hint"}}`` with a fitting status, never as a traceback. Routes for what happens inside a
sandbox (exec, files, logs ...) are in :mod:`aiva.daemon.routes.inside`.

Auth is per listener (see :class:`Gate`): the Unix socket is guarded by its 0600 mode;
the optional TCP listener (127.0.0.1 only) needs ``Authorization: Bearer <token>``,
except ``GET`` of the dashboard's static files under ``/ui/`` (and ``/``, which redirects
there): they hold no secret (see :mod:`aiva.daemon.routes.observe`). ``/mcp`` is the MCP server
over streamable HTTP (:mod:`aiva.mcp.http`), behind the same gate; it also takes the MCP
token (``AIVA_HOME/mcp.token``), which opens nothing else, so an MCP client's config
never holds the whole API.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any, cast

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from aiva import __version__
from aiva.daemon import wire
from aiva.daemon.bridge import run_sync
from aiva.engine import Engine
from aiva.engine.spec_rules import spec_warnings
from aiva.errors import AivaError, InvalidValue
from aiva.mcp.grants import Grants
from aiva.models import (
    Event,
    MountSpec,
    OnTimeout,
    PortSpec,
    Runtime,
    SandboxInfo,
    SandboxSpec,
)

log = logging.getLogger("aiva.daemon")

#: Scope key a :class:`Gate` sets: which listener let the request in.
LISTENER = "aiva.listener"


# ---------------------------------------------------------------------- auth


class Gate:
    """One listener's door. ``token=None``: the Unix socket, whose file mode is the
    check; otherwise every request must carry the bearer token (compared in constant
    time), but for ``GET`` of the dashboard's files (:func:`_public`). Requests that did
    not come through a Gate are refused by :class:`_Guard`. ``mcp_token`` opens ``/mcp``
    only."""

    def __init__(self, app: ASGIApp, *, token: str | None, mcp_token: str | None = None
                 ) -> None:
        self.app = app
        self.token = token
        self.mcp_token = mcp_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            if self.token is not None and not (_public(scope) or self._authorized(scope)):
                await _unauthorized(send)
                return
            scope = {**scope, LISTENER: "unix" if self.token is None else "tcp"}
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    return False
                sent = given.strip().encode()
                if secrets.compare_digest(sent, self.token.encode()):
                    return True
                return (self.mcp_token is not None and _is_mcp(scope)
                        and secrets.compare_digest(sent, self.mcp_token.encode()))
        return False


def _is_mcp(scope: Scope) -> bool:
    """The one route the MCP token opens (exactly: no prefix a path could climb out of)."""
    return bool(scope.get("path") == "/mcp")


def _public(scope: Scope) -> bool:
    """The dashboard's static files (and the redirect to them): GET only, no secret in
    them; the page then sends the token itself on every API call."""
    path = scope.get("path", "")
    return scope["type"] == "http" and scope.get("method") == "GET" and (
        path in ("/", "/ui") or path.startswith("/ui/"))


class _Guard:
    """Refuse any request that no Gate let in (e.g. the app served by plain uvicorn)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and LISTENER not in scope:
            await _unauthorized(send)
            return
        await self.app(scope, receive, send)


async def _unauthorized(send: Send) -> None:
    err = AivaError("missing or wrong bearer token for the aiva daemon",
                    hint=f"send `Authorization: Bearer` with the token in {wire.token_path()}")
    body = wire.line(wire.error_body(err))
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------- app


async def engine_of(request: Request) -> Engine:
    return cast(Engine, request.app.state.engine)


Eng = Depends(engine_of)


def create_app(engine: Engine, *, port: int | None = None,
               mcp_grants: Grants | None = None) -> FastAPI:
    """The API over ``engine``; serve it through a :class:`Gate` per listener.
    ``mcp_grants``: the host directories ``/mcp``'s tools may touch (none by default)."""
    from aiva.daemon.routes import inside, observe

    app = FastAPI(title="aiva daemon", version=__version__,
                  description="aiva's Engine over HTTP: sandboxes, exec, files, events.")
    app.state.engine = engine
    app.state.port = port
    app.state.started = time.time()
    app.state.procs = {}
    app.add_middleware(_Guard)
    _handlers(app)
    app.include_router(router)
    app.include_router(inside.router)
    app.include_router(observe.router)
    from aiva.daemon.routes import tasks as tasks_api

    app.include_router(tasks_api.router)
    observe.mount_dashboard(app)
    # MCP over streamable HTTP, with this daemon's own engine (aiva.mcp.http)
    from aiva.mcp.http import McpEndpoint

    app.state.mcp_grants = mcp_grants or Grants()
    app.state.mcp = McpEndpoint(engine, app.state.mcp_grants)
    app.router.add_route("/mcp", app.state.mcp, include_in_schema=False)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(AivaError)
    async def aiva_error(_: Request, exc: AivaError) -> JSONResponse:
        return JSONResponse(wire.error_body(exc), status_code=wire.status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
            for e in exc.errors())
        err = InvalidValue(f"bad request: {problems}", hint="see /openapi.json")
        return JSONResponse(wire.error_body(err), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = AivaError(str(exc.detail), hint="see /openapi.json for the routes")
        return JSONResponse(wire.error_body(err), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc)
        return JSONResponse(wire.error_body(exc), status_code=500)


router = APIRouter()


@router.get("/health", tags=["daemon"])
async def health() -> dict[str, Any]:
    """Cheap liveness check: no engine call."""
    return {"ok": True, "pid": os.getpid(), "version": __version__}


@router.get("/metrics", tags=["daemon"], include_in_schema=False)
async def prometheus_metrics(eng: Engine = Eng) -> Response:
    """Prometheus text: sandboxes, their figures, commands and cost."""
    from aiva.observe import prometheus

    return Response(await run_sync(prometheus.render, eng), media_type=prometheus.CONTENT_TYPE)


@router.get(f"{wire.API}/daemon", tags=["daemon"])
async def daemon_info(request: Request, eng: Engine = Eng) -> dict[str, Any]:
    boxes = await run_sync(eng.list_all, reconcile=False)
    started = float(request.app.state.started)
    return {"pid": os.getpid(), "version": __version__, "started_at": started,
            "uptime": round(time.time() - started, 3), "socket": str(wire.socket_path()),
            "port": request.app.state.port, "sandboxes": len(boxes),
            "mcp_allow_dirs": [str(d) for d in request.app.state.mcp_grants.dirs]}


# ---------------------------------------------------------------------- lifecycle


class SpecFields(BaseModel):
    """The arguments of ``Engine.build_spec``; missing ones come from the config."""

    image: str | None = None
    template: str | None = None
    profile: str | None = None
    cpus: float | None = None
    memory: str | int | None = None
    disk: str | int | None = None
    env: dict[str, str] | None = None
    ports: list[str | PortSpec] | None = None
    # DIR[:GUEST_PATH][:ro] strings (DIR as the daemon sees it: give absolute paths) or
    # MountSpecs; RemoteEngine resolves the caller's paths and sends MountSpecs
    mounts: list[str | MountSpec] | None = None
    labels: dict[str, str] | None = None
    backend: str | None = None
    network: str = "nat"
    timeout: float | None = None
    idle_timeout: float | None = None
    on_timeout: OnTimeout | None = None
    restart: str | None = None
    runtime: Runtime | None = None  # runc (default) or gvisor


class CreateRequest(SpecFields):
    name: str
    spec: SandboxSpec | None = None  # a full spec wins over the fields above
    start: bool = True


class ForkRequest(BaseModel):
    name: str
    ports: list[str] | None = None
    cpus: float | None = None
    memory: str | int | None = None
    env: dict[str, str] | None = None
    network: str | None = None
    timeout: float | None = None


class SettingValue(BaseModel):
    value: str


SB = f"{wire.API}/sandboxes"


@router.post(f"{wire.API}/spec", tags=["sandboxes"])
async def build_spec(fields: SpecFields, eng: Engine = Eng) -> SandboxSpec:
    """A spec filled from the daemon's config and profiles, as ``create`` would use."""
    return await run_sync(eng.build_spec, **_spec_args(fields))


def _spec_args(fields: SpecFields) -> dict[str, Any]:
    return {key: getattr(fields, key) for key in SpecFields.model_fields}


@router.get(SB, tags=["sandboxes"])
async def list_sandboxes(reconcile: bool = True, eng: Engine = Eng) -> list[SandboxInfo]:
    return await run_sync(eng.list_all, reconcile=reconcile)


class CreatedInfo(SandboxInfo):
    """The new sandbox, and what its settings give away (``aiva.engine.spec_rules``)."""

    warnings: list[str] = []


@router.post(SB, status_code=201, tags=["sandboxes"])
async def create(req: CreateRequest, eng: Engine = Eng) -> CreatedInfo:
    spec = req.spec if req.spec is not None else await run_sync(eng.build_spec,
                                                                **_spec_args(req))
    sb = await run_sync(eng.create, req.name, spec, start=req.start)
    return CreatedInfo(**dict(sb), warnings=spec_warnings(sb.spec))


@router.get(SB + "/{name}", tags=["sandboxes"])
async def status(name: str, reconcile: bool = True, eng: Engine = Eng) -> SandboxInfo:
    """The sandbox, reconciled with its backend unless ``reconcile=false``."""
    return await run_sync(eng.status if reconcile else eng.get, name)


@router.post(SB + "/{name}/start", tags=["sandboxes"])
async def start(name: str, eng: Engine = Eng) -> SandboxInfo:
    return await run_sync(eng.start, name)


@router.post(SB + "/{name}/stop", tags=["sandboxes"])
async def stop(name: str, force: bool = False, eng: Engine = Eng) -> SandboxInfo:
    return await run_sync(eng.stop, name, force=force)


@router.post(SB + "/{name}/pause", tags=["sandboxes"])
async def pause(name: str, eng: Engine = Eng) -> SandboxInfo:
    return await run_sync(eng.pause, name)


@router.post(SB + "/{name}/resume", tags=["sandboxes"])
async def resume(name: str, eng: Engine = Eng) -> SandboxInfo:
    return await run_sync(eng.resume, name)


@router.delete(SB + "/{name}", tags=["sandboxes"])
async def delete(name: str, request: Request, volumes: bool = False,
                 eng: Engine = Eng) -> dict[str, Any]:
    await run_sync(eng.delete, name, volumes=volumes)
    procs: dict[tuple[str, int], Any] = request.app.state.procs
    for key in [k for k in procs if k[0] == name]:
        procs.pop(key, None)
    return {"deleted": name}


# ---------------------------------------------------------------------- snapshots


@router.post(SB + "/{name}/snapshots", status_code=201, tags=["snapshots"])
async def snapshot(name: str, tag: str | None = Body(None, embed=True),
                   eng: Engine = Eng) -> dict[str, Any]:
    return await run_sync(eng.snapshot, name, tag)


@router.get(SB + "/{name}/snapshots", tags=["snapshots"])
async def snapshots(name: str, eng: Engine = Eng) -> list[dict[str, Any]]:
    return await run_sync(eng.snapshots, name)


@router.post(SB + "/{name}/snapshots/{tag}/restore", tags=["snapshots"])
async def restore(name: str, tag: str, eng: Engine = Eng) -> SandboxInfo:
    return await run_sync(eng.restore, name, tag)


@router.post(SB + "/{name}/snapshots/{tag}/fork", status_code=201, tags=["snapshots"])
async def fork(name: str, tag: str, req: ForkRequest, eng: Engine = Eng) -> SandboxInfo:
    """A new sandbox ``req.name`` started from this sandbox's snapshot ``tag``."""
    return await run_sync(lambda: eng.fork(
        req.name, name, tag, ports=req.ports, cpus=req.cpus, memory=req.memory, env=req.env,
        network=req.network, timeout=req.timeout))


# ---------------------------------------------------------------------- settings, events


@router.get(SB + "/{name}/settings/{key}", tags=["settings"])
async def get_setting(name: str, key: str, eng: Engine = Eng) -> dict[str, Any]:
    return {"key": key, "value": await run_sync(eng.get_setting, name, key)}


@router.put(SB + "/{name}/settings/{key}", tags=["settings"])
async def set_setting(name: str, key: str, req: SettingValue, eng: Engine = Eng
                      ) -> SandboxInfo:
    return await run_sync(eng.set_setting, name, key, req.value)


@router.get(f"{wire.API}/events", tags=["events"])
async def events(sandbox_id: str | None = None, after: int = 0, limit: int | None = None,
                 eng: Engine = Eng) -> list[Event]:
    """The append-only event log, oldest first; ``after`` is the last id already seen."""
    return await run_sync(eng.store.events, sandbox_id=sandbox_id, after=after, limit=limit)
