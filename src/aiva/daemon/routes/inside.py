"""Routes for what happens inside a sandbox: exec, processes, files, sync, logs, metrics.

Output streams as newline-delimited JSON while the command runs; file bytes stream both
ways without being held in memory. ``sync`` and ``copy-in``/``copy-out`` take *local*
paths: the daemon runs on the same host (and as the same user) as its callers, so it
reads and writes those paths itself, exactly as the in-process engine would.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from aiva.agent_client import ExecResult, ProcessHandle
from aiva.backends.base import LogLine
from aiva.daemon import wire
from aiva.daemon.app import Eng
from aiva.daemon.bridge import ThreadStream, feed_thread, run_sync
from aiva.engine import Engine
from aiva.errors import AivaError, InvalidValue
from aiva.models import SandboxInfo, ServiceSpec, check_action

log = logging.getLogger("aiva.daemon")
router = APIRouter()
SB = f"{wire.API}/sandboxes/{{name}}"
_STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {wire.NDJSON: {}},
                   "description": "newline-delimited JSON events, sent as they happen"}}


def _check_use(eng: Engine, name: str) -> None:
    """Refuse early (with a proper status) what the engine would refuse mid-stream."""
    check_action(name, eng.get(name).state, "use")


async def _ndjson(stream: ThreadStream, done: Callable[[Any], Any] | None = None,
                  heartbeat: float | None = None) -> AsyncIterator[bytes]:
    async for kind, value in stream.events(heartbeat):
        if kind == "item":
            yield wire.line(value)
        elif kind == "tick":
            yield b"\n"
        elif kind == "done":
            if done is not None:
                yield wire.line(done(value))
        else:
            if not isinstance(value, AivaError):
                log.error("stream failed", exc_info=value)
            yield wire.line(wire.error_body(value))


def _close(it: Iterator[Any]) -> None:
    """Close an iterator that holds something open (an agent channel, a followed file)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _procs(request: Request) -> dict[tuple[str, int], ProcessHandle]:
    procs: dict[tuple[str, int], ProcessHandle] = request.app.state.procs
    return procs


# ---------------------------------------------------------------------- exec


class ExecRequest(BaseModel):
    command: str | list[str]  # a string runs through /bin/sh -c
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    timeout: float | None = None
    stdin: str | None = None  # text ...
    stdin_base64: str | None = None  # ... or bytes
    background: bool = False


@router.post(SB + "/exec", tags=["exec"], responses=_STREAMED)
async def exec_(name: str, req: ExecRequest, request: Request, eng: Engine = Eng
                ) -> Response:
    """Run a command. Streams ``{"stdout": s}`` / ``{"stderr": s}`` as output comes, then
    ``{"exit": {exit_code, duration, pid, timed_out}}`` (or ``{"error": ...}``); the
    result's stdout/stderr are the chunks joined. ``background``: ``{"pid": n}`` at once."""
    await run_sync(_check_use, eng, name)
    if req.stdin is not None and req.stdin_base64 is not None:
        raise InvalidValue("give stdin or stdin_base64, not both")
    stdin: bytes | str | None = req.stdin
    if req.stdin_base64 is not None:
        stdin = base64.b64decode(req.stdin_base64)
    kw: dict[str, Any] = {"env": req.env, "cwd": req.cwd, "user": req.user,
                          "timeout": req.timeout, "stdin": stdin}
    if req.background:
        handle = await run_sync(eng.exec, name, req.command, background=True, **kw)
        assert isinstance(handle, ProcessHandle)
        procs = _procs(request)
        if len(procs) > 4096:  # forget finished ones; the agent keeps results a while too
            for key in [k for k, h in procs.items() if h.done]:
                del procs[key]
        procs[(name, handle.pid)] = handle
        return JSONResponse({"pid": handle.pid}, status_code=201)
    stream = ThreadStream()
    # the client gone (stream.stopped) cancels the command on the agent, output or none
    stream.start(lambda: eng.exec(
        name, req.command, on_stdout=lambda text: stream.emit({"stdout": text}),
        on_stderr=lambda text: stream.emit({"stderr": text}), stop=stream.stopped, **kw))
    return StreamingResponse(_ndjson(stream, lambda res: {"exit": wire.exec_exit(res)}),
                             media_type=wire.NDJSON)


@router.get(SB + "/procs/{pid}", tags=["exec"])
async def proc(name: str, pid: int, request: Request) -> dict[str, Any]:
    """Whether this daemon started the background process and whether it has ended."""
    handle = _procs(request).get((name, pid))
    return {"pid": pid, "known": handle is not None,
            "done": None if handle is None else handle.done}


@router.post(SB + "/procs/{pid}/wait", tags=["exec"])
async def proc_wait(name: str, pid: int, request: Request, timeout: float | None = None,
                    eng: Engine = Eng) -> dict[str, Any]:
    """Wait for a background process; its result, output included (504 on timeout)."""
    handle = _procs(request).get((name, pid))
    if handle is not None:
        return wire.exec_result(await run_sync(handle.wait, timeout))

    def agent_wait() -> ExecResult:  # started before a daemon restart: ask the agent
        return eng.agent(name).wait_process(pid, timeout=timeout)

    return wire.exec_result(await run_sync(agent_wait))


@router.post(SB + "/procs/{pid}/kill", tags=["exec"])
async def proc_kill(name: str, pid: int, signal: int = Body(9, embed=True),
                    eng: Engine = Eng) -> dict[str, Any]:
    """Signal a process (its whole group) in the sandbox."""
    await run_sync(lambda: eng.agent(name).signal(pid, signal))
    return {"pid": pid, "signal": signal}


# ---------------------------------------------------------------------- files


class PathRequest(BaseModel):
    path: str


class RenameRequest(BaseModel):
    src: str
    dst: str


class CopyRequest(BaseModel):
    local: str  # a path on the daemon's (= the caller's) host
    remote: str


class SyncRequest(CopyRequest):
    direction: str = "both"
    delete: bool = False
    exclude: list[str] | None = None
    prefer: str | None = None
    progress: bool = False
    litter: bool = False


@router.get(SB + "/files/content", tags=["files"],
            responses={200: {"content": {"application/octet-stream": {}}}})
async def read_file(name: str, path: str, eng: Engine = Eng) -> Response:
    """The file's bytes, streamed; its stat is in the ``X-Aiva-Stat`` header (JSON)."""
    meta, chunks = await run_sync(eng.read_stream, name, path)
    stream = ThreadStream(maxsize=8)  # at most 8 chunks (1 MiB each) wait for the client

    def pump() -> None:
        try:
            for chunk in chunks:
                if not stream.emit(chunk):
                    return  # the client has gone
        finally:
            _close(chunks)  # an unfinished read is cancelled on the agent

    stream.start(pump)

    async def body() -> AsyncIterator[bytes]:
        async for kind, value in stream.events():
            if kind == "item":
                yield value
            elif kind == "error":  # break the chunked body: the client sees it truncated
                raise value

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={wire.STAT_HEADER: json.dumps(meta)})


@router.put(SB + "/files/content", tags=["files"])
async def write_file(name: str, path: str, request: Request, mode: int | None = None,
                     eng: Engine = Eng) -> dict[str, Any]:
    """Write the request body to ``path`` atomically (parents made), streamed."""
    await run_sync(_check_use, eng, name)

    def consume(chunks: Iterator[bytes]) -> int:
        return eng.write_file(name, path, chunks, mode=mode)  # type: ignore[arg-type]

    return {"bytes": await feed_thread(request.stream(), consume)}


@router.get(SB + "/files/list", tags=["files"])
async def list_dir(name: str, path: str, eng: Engine = Eng) -> list[dict[str, Any]]:
    return await run_sync(eng.list_dir, name, path)


@router.get(SB + "/files/stat", tags=["files"])
async def stat(name: str, path: str, eng: Engine = Eng) -> dict[str, Any]:
    return await run_sync(eng.stat, name, path)


@router.post(SB + "/files/mkdir", tags=["files"])
async def mkdir(name: str, req: PathRequest, eng: Engine = Eng) -> dict[str, Any]:
    await run_sync(eng.mkdir, name, req.path)
    return {"path": req.path}


@router.delete(SB + "/files", tags=["files"])
async def remove(name: str, path: str, recursive: bool = False, eng: Engine = Eng
                 ) -> dict[str, Any]:
    await run_sync(eng.remove, name, path, recursive=recursive)
    return {"path": path}


@router.post(SB + "/files/rename", tags=["files"])
async def rename(name: str, req: RenameRequest, eng: Engine = Eng) -> dict[str, Any]:
    await run_sync(eng.rename, name, req.src, req.dst)
    return {"src": req.src, "dst": req.dst}


@router.post(SB + "/files/copy-in", tags=["files"])
async def copy_in(name: str, req: CopyRequest, eng: Engine = Eng) -> dict[str, Any]:
    """``aiva cp LOCAL NAME:REMOTE``, run by the daemon on the shared host filesystem."""
    return {"bytes": await run_sync(eng.copy_in, name, req.local, req.remote)}


@router.post(SB + "/files/copy-out", tags=["files"])
async def copy_out(name: str, req: CopyRequest, eng: Engine = Eng) -> dict[str, Any]:
    return {"bytes": await run_sync(eng.copy_out, name, req.remote, req.local)}


@router.post(SB + "/sync", tags=["files"], responses=_STREAMED)
async def sync(name: str, req: SyncRequest, eng: Engine = Eng) -> StreamingResponse:
    """Two-way incremental sync with a local directory of the daemon's host. Streams
    ``{"progress": [path, done, total]}`` (if asked), then ``{"report": {...}}``."""
    stream = ThreadStream()

    def progress(path: str, done: int, total: int) -> None:
        stream.emit({"progress": [path, done, total]})

    stream.start(lambda: eng.sync(
        name, req.local, req.remote, direction=req.direction, delete=req.delete,
        exclude=req.exclude, prefer=req.prefer, progress=progress if req.progress else None,
        litter=req.litter))
    return StreamingResponse(_ndjson(stream, lambda rep: {"report": rep.to_dict()}),
                             media_type=wire.NDJSON)


# ---------------------------------------------------------------------- logs, metrics


@router.get(SB + "/logs", tags=["logs"])
async def logs(name: str, tail: int | None = None, eng: Engine = Eng) -> list[dict[str, Any]]:
    """Command output and the engine's log, ordered by time."""
    return [wire.log_line(x) for x in await run_sync(eng.logs, name, tail=tail)]


@router.get(SB + "/logs/follow", tags=["logs"], responses=_STREAMED)
async def follow_logs(name: str, eng: Engine = Eng) -> StreamingResponse:
    """New log lines as they come, one JSON object a line, until the client hangs up."""
    sources = await run_sync(eng.log_streams, name)
    stream = ThreadStream()

    def pump(lines: Iterator[LogLine]) -> None:
        try:
            for line in lines:
                if not stream.emit(wire.log_line(line)):
                    return  # the client has gone
        finally:
            _close(lines)

    for source in sources:
        stream.spawn(functools.partial(pump, source))
    return StreamingResponse(_ndjson(stream, heartbeat=15.0), media_type=wire.NDJSON)


@router.get(SB + "/metrics", tags=["metrics"])
async def metrics(name: str, eng: Engine = Eng) -> dict[str, Any]:
    return (await run_sync(eng.metrics, name)).to_dict()


# ---------------------------------------------------------------------- service


@router.put(SB + "/service", tags=["sandboxes"])
async def set_service(name: str, service: Annotated[ServiceSpec | None, Body()] = None,
                      eng: Engine = Eng) -> SandboxInfo:
    """Deploy (or, with null, remove) the sandbox's long-running program."""
    return await run_sync(eng.set_service, name, service)


# ---------------------------------------------------------------------- desktop


class DesktopView(BaseModel):
    url: str
    port: int
    password: str


@router.get(SB + "/desktop", tags=["desktop"])
async def desktop(name: str, eng: Engine = Eng) -> DesktopView:
    """The noVNC URL (127.0.0.1 only, password in its fragment) of a running desktop
    sandbox; 404 if it has no desktop, 409 if it is not running."""
    return DesktopView(**(await run_sync(eng.desktop, name)).to_dict())
