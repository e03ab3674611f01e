"""The MCP server without Docker: the official client, in-process, against a fake engine.
Tools are thin engine calls; errors come back as tool errors with a hint; output is cut
to the budget; and every engine method the tools call exists alike on RemoteEngine."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aiva.agent_client import ExecResult
from aiva.agent_client.sync import SyncReport
from aiva.backends.base import LogLine
from aiva.daemon.client import RemoteEngine
from aiva.engine import Engine
from aiva.errors import InvalidTransition, InvalidValue, SandboxNotFound
from aiva.mcp.grants import Grants
from aiva.mcp.limits import Limits
from aiva.mcp.scope import LABEL as SESSION_LABEL
from aiva.mcp.scope import Scope
from aiva.models import PortSpec, SandboxInfo, SandboxSpec, State

SERVER = Path(__file__).resolve().parents[2] / "src" / "aiva" / "mcp" / "serve.py"


class FakeEngine:
    """Just what the tools call, recording each call."""

    def __init__(self) -> None:
        spec = SandboxSpec(image="aiva/python:latest", cpus=1, memory=512 << 20, disk=1 << 30)
        self.box = SandboxInfo(name="box", spec=spec, state=State.RUNNING)
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.files = {"/workspace/big.txt": b"0123456789" * 1000}

    def get(self, name: str) -> SandboxInfo:
        self.calls.append(("get", (name,), {}))
        if name != "box":
            raise SandboxNotFound(name)
        return self.box

    status = get

    def exec(self, name: str, command: Any, **kw: Any) -> ExecResult:
        self.calls.append(("exec", (name, command), kw))
        self.get(name)
        if command == "paused":
            raise InvalidTransition(name, "paused", "use", "resume it with `aiva resume`")
        return ExecResult(0, "o" * 5000, "err\n", 0.25, 42)

    def read_stream(self, name: str, path: str) -> tuple[dict[str, Any], Iterator[bytes]]:
        data = self.files[path]
        return {"size": len(data)}, iter([data[i:i + 999] for i in range(0, len(data), 999)])

    def sync(self, name: str, local: str, remote: str, **kw: Any) -> SyncReport:
        self.calls.append(("sync", (name, local, remote), kw))
        return SyncReport(pushed=["a.txt"])

    def build_spec(self, **kw: Any) -> SandboxSpec:
        self.calls.append(("build_spec", (), kw))
        return self.box.spec.model_copy(update={"ports": [PortSpec.parse("0.0.0.0:1:2")]})

    def create(self, name: str, spec: SandboxSpec) -> SandboxInfo:
        self.calls.append(("create", (name,), {}))
        return SandboxInfo(name=name, spec=spec, state=State.RUNNING)

    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]:
        self.get(name)
        t = datetime(2026, 1, 1, tzinfo=UTC)
        return [LogLine(t, "cmd", "echo hi"), LogLine(t, "stdout", "hi\n"),
                LogLine(t, "exit", "0")][-(tail or 3):]


def _run(engine: FakeEngine, limits: Limits, steps: Any, grants: Grants | None = None,
         scope: Scope | None = None) -> Any:
    """The official client against a server over ``engine``; the fake's ``box`` belongs
    to the client's session (as if it had made it) unless ``scope`` is given."""
    from mcp import Client

    from aiva.mcp.serve import build_server

    if scope is None:
        scope = Scope()
        engine.box.spec.labels[SESSION_LABEL] = scope.fallback  # the first session's id

    async def go() -> Any:
        async with Client(build_server(engine, limits, grants,  # type: ignore[arg-type]
                                       scope)) as client:
            return await steps(client)

    return asyncio.run(go())


def test_a_session_sees_and_changes_only_its_own_sandboxes() -> None:
    """The user's own sandbox (no session label) is invisible to an MCP session: not
    listed, and every tool naming it answers as for a missing one; --all-sandboxes
    widens that."""
    eng = FakeEngine()
    eng.list_all = lambda: [eng.box]  # type: ignore[attr-defined]
    eng.delete = lambda *a, **k: eng.calls.append(("delete", a, k))  # type: ignore[attr-defined]

    async def steps(client: Any) -> Any:
        listed = await client.call_tool("sandbox_list", {})
        out = {"list": listed.structured_content["sandboxes"]}
        for tool, args in (("sandbox_destroy", {}), ("exec", {"command": "true"}),
                           ("file_read", {"path": "big.txt"}), ("sandbox_status", {})):
            res = await client.call_tool(tool, {"sandbox": "box", **args})
            out[tool] = (res.is_error, res.structured_content["error"]["message"]
                         if res.is_error else None)
        return out

    got = _run(eng, Limits(), steps, scope=Scope())  # box has no session label: the user's
    assert got["list"] == []
    for tool in ("sandbox_destroy", "exec", "file_read", "sandbox_status"):
        assert got[tool] == (True, "no sandbox named 'box'"), tool
    assert not [c for c in eng.calls if c[0] in ("delete", "exec")]
    wide = _run(eng, Limits(), steps, scope=Scope(all_sandboxes=True))
    assert [b["name"] for b in wide["list"]] == ["box"] and wide["exec"] == (False, None)


def test_a_sandbox_made_in_a_session_carries_its_label() -> None:
    eng = FakeEngine()

    async def steps(client: Any) -> Any:
        return await client.call_tool("sandbox_create", {"name": "mine"})

    scope = Scope()
    res = _run(eng, Limits(), steps, scope=scope)
    assert not res.is_error
    kw = next(c[2] for c in eng.calls if c[0] == "build_spec")
    assert kw["labels"] == {SESSION_LABEL: scope.fallback}


def test_exec_is_a_thin_call_with_the_budget_and_timeout_applied() -> None:
    eng = FakeEngine()

    async def steps(client: Any) -> Any:
        return await client.call_tool("exec", {"sandbox": "box", "command": ["ls", "-l"],
                                               "cwd": "sub", "timeout": 9999})

    res = _run(eng, Limits(max_output=1024, max_exec_timeout=30), steps)
    assert not res.is_error
    call = next(c for c in eng.calls if c[0] == "exec")
    assert call[1] == ("box", ["ls", "-l"])
    assert call[2]["timeout"] == 30 and call[2]["cwd"] == "/workspace/sub"
    out = res.structured_content
    assert out["truncated"] and out["stdout_bytes"] == 5000 and out["stderr"] == "err\n"
    assert "3976 bytes omitted" in out["stdout"]
    text = res.content[0].text
    assert text.startswith("exit code 0 (0.25s)") and "--- stderr ---\nerr" in text


def test_errors_are_tool_errors_with_hints() -> None:
    async def steps(client: Any) -> Any:
        return (await client.call_tool("sandbox_status", {"sandbox": "gone"}),
                await client.call_tool("exec", {"sandbox": "box", "command": "paused"}),
                await client.call_tool("exec", {"sandbox": "box", "command": ""}))

    missing, paused, empty = _run(FakeEngine(), Limits(), steps)
    assert missing.is_error and missing.structured_content["error"]["type"] == "SandboxNotFound"
    assert "sandbox_list" in missing.structured_content["error"]["hint"]
    assert paused.is_error
    assert paused.content[0].text == ("InvalidTransition: cannot use sandbox 'box': it is "
                                      "paused\nhint: resume it with `aiva resume` (a command "
                                      "for the user, not a tool)")
    assert empty.is_error and "empty" in empty.content[0].text


def test_file_read_windows_and_logs_resource() -> None:
    async def steps(client: Any) -> Any:
        first = await client.call_tool("file_read", {"sandbox": "box", "path": "big.txt"})
        nxt = first.structured_content["next_offset"]
        second = await client.call_tool("file_read", {"sandbox": "box", "path": "big.txt",
                                                      "offset": nxt, "length": 10})
        logs = await client.read_resource("aiva://sandboxes/box/logs?tail=2")
        return first, second, logs

    first, second, logs = _run(FakeEngine(), Limits(max_output=2048), steps)
    f = first.structured_content
    assert (f["path"], f["length"], f["size"], f["next_offset"]) == (
        "/workspace/big.txt", 2048, 10000, 2048)
    assert "call file_read again with offset=2048" in first.content[0].text
    assert second.structured_content["content"] == "8901234567"
    assert logs.contents[0].text == "00:00:00.000 stdout: hi\n00:00:00.000 exit 0"


def test_tool_list_is_what_agents_see() -> None:
    async def steps(client: Any) -> Any:
        return (await client.list_tools()).tools

    tools = {t.name: t for t in _run(FakeEngine(), Limits(), steps)}
    assert set(tools) == {"sandbox_create", "sandbox_list", "sandbox_status",
                          "sandbox_destroy", "exec", "file_read", "file_write", "file_list",
                          "sync", "snapshot_create", "snapshot_list", "snapshot_restore"}
    for tool in tools.values():
        assert tool.description and len(tool.description) < 500
        assert tool.output_schema is not None
        for prop in tool.input_schema.get("properties", {}).values():
            assert prop.get("description"), tool.name  # every argument is explained
    assert tools["file_read"].annotations.read_only_hint
    assert tools["snapshot_restore"].annotations.destructive_hint


#: The keyword arguments the tools pass, per engine method.
KEYWORDS = {"exec": {"env", "cwd", "timeout", "stdin"}, "delete": {"volumes"},
            "sync": {"direction", "delete", "exclude", "prefer"}, "write_file": {"mode"},
            "logs": {"tail"},
            "build_spec": {"template", "image", "cpus", "memory", "network", "timeout",
                           "runtime"}}


def test_remote_engine_takes_every_call_the_tools_make() -> None:
    used = set(re.findall(r"\bengine\.([a-z][a-z_]*)\(", SERVER.read_text()))
    used |= set(re.findall(r"run_sync\(engine\.([a-z][a-z_]*)\b", SERVER.read_text()))
    assert {"exec", "create", "build_spec", "read_stream", "write_file", "list_dir", "sync",
            "snapshot", "snapshots", "restore", "delete", "logs", "status"} <= used
    for name in sorted(used - {"close"}):
        for cls in (Engine, RemoteEngine):
            params = inspect.signature(getattr(cls, name)).parameters
            assert KEYWORDS.get(name, set()) <= set(params), f"{cls.__name__}.{name}"


# ---------------------------------------------------------------------- host paths


def _sync(local: str) -> dict[str, Any]:
    return {"sandbox": "box", "local": local, "remote": "proj", "direction": "pull"}


def test_sync_without_a_grant_is_refused_with_how_to_grant_one(tmp_path: Path) -> None:
    eng = FakeEngine()

    async def steps(client: Any) -> Any:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        return tools["sync"], await client.call_tool("sync", _sync(str(tmp_path)))

    tool, res = _run(eng, Limits(), steps)
    assert "No host directory is granted" in (tool.description or "")
    assert res.is_error
    err = res.structured_content["error"]
    assert err["type"] == "InvalidValue" and "no host directory is granted" in err["message"]
    assert "aiva mcp serve --allow-dir DIR" in err["hint"] and "mcp.allow_dirs" in err["hint"]
    assert not [c for c in eng.calls if c[0] == "sync"]


def test_sync_reaches_only_below_a_granted_directory(tmp_path: Path) -> None:
    grant = tmp_path / "grant"
    (grant / "proj").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (grant / "out").symlink_to(outside)  # a link inside the grant that leads out
    (grant / "loop").symlink_to(grant / "loop")
    (grant / "file").write_text("x")
    eng = FakeEngine()
    grants = Grants.resolve([str(grant)])
    refused = {str(outside): "is not inside", f"{grant}/../secret": "'..'",
               f"{grant}/out": "leads out of", f"{grant}/out/sub": "leads out of",
               f"{grant}/loop/x": "cannot be resolved", f"{grant}/a\0b": "NUL",
               "proj": "not absolute",
               f"{grant}/file": "not a directory", "/": "is not inside"}

    async def steps(client: Any) -> Any:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        ok = [await client.call_tool("sync", _sync(p))
              for p in (str(grant), f"{grant}/proj", f"{grant}/new/dir")]
        bad = {p: await client.call_tool("sync", _sync(p)) for p in refused}
        return tools["sync"], ok, bad

    tool, ok, bad = _run(eng, Limits(), steps, grants)
    assert str(grant) in (tool.description or "")
    assert [r.is_error for r in ok] == [False, False, False]
    synced = [c[1][1] for c in eng.calls if c[0] == "sync"]
    assert synced == [str(grant), str(grant / "proj"), str(grant / "new" / "dir")]
    for path, text in refused.items():
        res = bad[path]
        assert res.is_error, path
        assert text in res.structured_content["error"]["message"], path
    assert len([c for c in eng.calls if c[0] == "sync"]) == 3  # none of the refused ran


def test_grants_are_resolved_at_startup(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    assert Grants.resolve([str(tmp_path / "alias")], [str(real)]).dirs == (real,)
    with pytest.raises(InvalidValue, match="does not exist"):
        Grants.resolve([str(tmp_path / "nope")])
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidValue, match="not a directory"):
        Grants.resolve([str(tmp_path / "f")])


def test_sandbox_create_checks_the_name_and_returns_the_warnings() -> None:
    eng = FakeEngine()

    async def steps(client: Any) -> Any:
        return ([await client.call_tool("sandbox_create", {"name": bad})
                 for bad in ("../../x/y", "a/b", "..")],
                await client.call_tool("sandbox_create", {"name": "fine"}))

    bad, good = _run(eng, Limits(), steps)
    for res in bad:
        assert res.is_error and "not a valid sandbox name" in res.content[0].text
    assert [c[1] for c in eng.calls if c[0] == "create"] == [("fine",)]
    assert not good.is_error
    assert "reachable from the network" in good.structured_content["warnings"][0]


def test_hints_name_tools_and_bad_arguments_are_one_line() -> None:
    from aiva.errors import SandboxFileNotFound
    from aiva.mcp.serve import agent_hint

    assert agent_hint("remove it with `aiva rm mcpbox --volumes`") == \
        "remove it with the sandbox_destroy tool (sandbox mcpbox)"
    assert agent_hint("see `aiva logs box`") == "see the resource aiva://sandboxes/box/logs"
    assert agent_hint("start it with `aiva start box`") == \
        "start it with `aiva start box` (a command for the user, not a tool)"

    eng = FakeEngine()

    def missing(name: str, path: str) -> Any:
        raise SandboxFileNotFound(f"No such file or directory: {path}",
                                  kind="FileNotFoundError")

    eng.read_stream = missing  # type: ignore[method-assign]

    async def steps(client: Any) -> Any:
        return (await client.call_tool("exec", {"sandbox": "box"}),
                await client.call_tool("exec", {"sandbox": "box", "command": "ls",
                                                "timeout": "soon"}),
                await client.call_tool("file_read", {"sandbox": "box", "path": "nope.txt"}),
                await client.call_tool("exec", {"sandbox": "box", "command": "paused"}))

    no_arg, bad_arg, no_file, paused = _run(eng, Limits(), steps)
    assert no_arg.content[0].text == ("InvalidArguments: exec: missing argument 'command'\n"
                                      "hint: tools/list gives each tool's arguments and their "
                                      "types")
    assert "pydantic" not in bad_arg.content[0].text and "'timeout'" in bad_arg.content[0].text
    assert no_file.structured_content["error"]["hint"] == "file_list shows what a directory holds"
    assert "a command for the user" in paused.structured_content["error"]["hint"]
