"""Every host-side way into a sandbox, as plain calls: Engine, SDK, MCP tools, daemon routes.

Each call returns normally or raises. What MCP and the daemon report in-band becomes an
exception here: an ``AivaError`` for an error aiva meant to report, a ``Crash`` for an
error that escaped as something else (a traceback in the server, an "internal error").
"""

from __future__ import annotations

import asyncio
import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiva.daemon import wire
from aiva.errors import AivaError
from aiva.sdk import Sandbox

REMOTE = "/workspace/d"


class Crash(Exception):
    """A host error that was not an AivaError (in-band from MCP or the daemon)."""


def _sdk(box: Any) -> Sandbox:
    return Sandbox.connect(box.name, engine=box.engine)


# ---------------------------------------------------------------------- MCP


def mcp_tool(box: Any, tool: str, args: dict[str, Any], *, grant: Path | None = None) -> Any:
    """One MCP tool call through the official client, in-process, over ``box.engine``."""
    from mcp import Client

    from aiva.mcp.serve import build_server

    kw: dict[str, Any] = {}
    params = inspect.signature(build_server).parameters
    if grant is not None and "grants" in params:
        from aiva.mcp.grants import Grants

        kw["grants"] = Grants.resolve([str(grant)])
    if "scope" in params:  # the fake sandbox was not made by this MCP session
        from aiva.mcp.scope import Scope

        kw["scope"] = Scope(all_sandboxes=True)

    async def go() -> Any:
        async with Client(build_server(box.engine, **kw)) as client:
            return await client.call_tool(tool, args)

    res = asyncio.run(go())
    if res.is_error:
        err = (res.structured_content or {}).get("error") or {}
        if grant is not None and "grant" in str(err.get("message", "")):
            raise Crash(f"the MCP server refused a granted directory: {err}")
        if err.get("type") == "SandboxNotFound":  # it exists: the harness is at fault
            raise Crash(f"the MCP server does not see the test's sandbox: {err}")
        if err.get("type") in wire.ERRORS:
            raise AivaError(f"tool error {err['type']}: {err.get('message')}")
        raise Crash(f"MCP tool {tool} crashed: {res.content[0].text if res.content else res}")
    return res.structured_content


def mcp_file_read(box: Any, path: str, length: int = 100) -> Any:
    return mcp_tool(box, "file_read", {"sandbox": box.name, "path": path, "length": length})


# ---------------------------------------------------------------------- daemon


def daemon_client(box: Any) -> Any:
    from aiva.daemon.app import Gate, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient(Gate(create_app(box.engine), token=None))


def _daemon_error(err: dict[str, Any], what: str) -> Exception:
    if str(err.get("message", "")).startswith("internal error"):
        return Crash(f"daemon {what}: {err}")
    return AivaError(f"daemon {what}: {err.get('type')}: {err.get('message')}")


def daemon_json(box: Any, method: str, route: str, **kw: Any) -> Any:
    with daemon_client(box) as client:
        r = client.request(method, f"{wire.API}/sandboxes/{box.name}{route}", **kw)
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") \
        else None
    if r.status_code >= 400:
        raise _daemon_error((body or {}).get("error") or {"message": r.text[:500]}, route)
    return body


def daemon_ndjson(box: Any, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """A streamed route: its lines; an ``error`` line raises."""
    with daemon_client(box) as client, client.stream(
            "POST", f"{wire.API}/sandboxes/{box.name}{route}", json=body) as r:
        if r.status_code >= 400:
            r.read()
            raise _daemon_error(r.json().get("error") or {}, route)
        lines = [json.loads(x) for x in r.iter_lines() if x.strip()]
    for line in lines:
        if "error" in line:
            raise _daemon_error(line["error"], route)
    return lines


def daemon_read(box: Any, path: str, limit: int = 1 << 20) -> bytes:
    """GET files/content, reading at most ``limit`` bytes of the body (a client that
    wanted a little and hangs up)."""
    got = bytearray()
    try:
        with daemon_client(box) as client, client.stream(
                "GET", f"{wire.API}/sandboxes/{box.name}/files/content",
                params={"path": path}) as r:
            if r.status_code >= 400:
                r.read()
                raise _daemon_error(r.json().get("error") or {}, "files/content")
            for chunk in r.iter_bytes():
                got += chunk
                if len(got) >= limit:
                    break
    except RuntimeError as exc:
        # The route failed after the body had started: a real server breaks the chunked
        # body there (the client sees it cut), the test client re-raises. An AivaError
        # behind it is the route reporting as it should.
        if isinstance(exc.__cause__, AivaError):
            raise exc.__cause__ from None
        raise
    return bytes(got)


# ---------------------------------------------------------------------- the operations

PullOp = Callable[[Any, Path], Any]

#: Every way a sandbox directory comes onto the host.
PULLS: dict[str, PullOp] = {
    "engine.sync(pull)": lambda box, dest: box.engine.sync(box.name, dest, REMOTE,
                                                           direction="pull"),
    "engine.sync(both)": lambda box, dest: box.engine.sync(box.name, dest, REMOTE),
    "engine.copy_out(dir)": lambda box, dest: box.engine.copy_out(box.name, REMOTE, dest),
    "Sandbox.sync(pull)": lambda box, dest: _sdk(box).sync(dest, REMOTE, direction="pull"),
    "files.download(dir)": lambda box, dest: _sdk(box).files.download(REMOTE, dest),
    "mcp sync(pull)": lambda box, dest: mcp_tool(
        box, "sync", {"sandbox": box.name, "local": str(dest), "remote": REMOTE,
                      "direction": "pull"}, grant=dest.parent),
    "daemon /sync(pull)": lambda box, dest: daemon_ndjson(
        box, "/sync", {"local": str(dest), "remote": REMOTE, "direction": "pull"}),
    "daemon /files/copy-out(dir)": lambda box, dest: daemon_json(
        box, "POST", "/files/copy-out", json={"local": str(dest), "remote": REMOTE}),
}

#: Every way one sandbox file comes onto the host (the agent's fs.stat says "file").
FILE_PULLS: dict[str, PullOp] = {
    "engine.copy_out(file)": lambda box, dest: box.engine.copy_out(
        box.name, "/workspace/f", dest / "f"),
    "files.download(file)": lambda box, dest: _sdk(box).files.download(
        "/workspace/f", dest / "f"),
    "daemon /files/copy-out(file)": lambda box, dest: daemon_json(
        box, "POST", "/files/copy-out", json={"local": str(dest / "f"),
                                              "remote": "/workspace/f"}),
}

#: Every way a file's bytes reach a host process's memory.
READS: dict[str, Callable[[Any], Any]] = {
    "engine.read_file": lambda box: box.engine.read_file(box.name, "/workspace/f"),
    "files.read(bytes)": lambda box: _sdk(box).files.read("/workspace/f", format="bytes"),
    "mcp file_read": lambda box: mcp_file_read(box, "/workspace/f"),
    "daemon GET files/content": lambda box: daemon_read(box, "/workspace/f"),
}
