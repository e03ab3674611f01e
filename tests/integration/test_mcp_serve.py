"""``aiva mcp serve`` end to end, driven by the official MCP client as an agent would.

1. stdio: the client spawns ``python -m aiva.cli.main mcp serve`` (in-process engine,
   ``AIVA_NO_DAEMON=1``) and works in a real Docker sandbox.
2. streamable HTTP: a real daemon on a free port serves ``/mcp`` behind its bearer token
   (a request without it gets 401; the Unix socket needs none).

Every sandbox made here is removed in ``finally`` by an in-process engine, whatever
happened to the server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiva.daemon import control, wire

pytestmark = pytest.mark.docker

TOOLS = {"sandbox_create", "sandbox_list", "sandbox_status", "sandbox_destroy", "exec",
         "file_read", "file_write", "file_list", "sync", "snapshot_create", "snapshot_list",
         "snapshot_restore"}
TIMEOUT = 180.0  # seconds for any one MCP call; a hang fails instead of blocking the run


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured content."""
    result = await client.call_tool(tool, args, read_timeout_seconds=TIMEOUT)
    assert not result.is_error, f"{tool} failed: {_text(result)}"
    data: dict[str, Any] = result.structured_content
    return data


def _remove(names: list[str]) -> None:
    from aiva.engine import Engine

    eng = Engine()
    try:
        for name in names:
            if eng.exists(name):
                eng.delete(name, volumes=True)
    finally:
        eng.close()


@pytest.fixture
def boxes() -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        _remove(made)


# ---------------------------------------------------------------------- stdio


def _server_env() -> dict[str, str]:
    keep = ("AIVA_HOME", "AIVA_NO_DAEMON", "DOCKER_HOST", "DOCKER_CONFIG", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["AIVA_NO_DAEMON"] = "1"
    return env


def test_stdio_agent_session(python_image: str, boxes: list[str], tmp_path: Path) -> None:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "aiva.cli.main", "mcp", "serve", "--max-output", "4KB",
              "--exec-timeout", "60", "--allow-dir", str(tmp_path)],
        env=_server_env())
    name = f"mcp-{uuid.uuid4().hex[:6]}"
    boxes.append(name)
    timings: dict[str, float] = {}

    async def session() -> None:
        t0 = time.monotonic()
        async with Client(params, read_timeout_seconds=TIMEOUT) as client:
            timings["connect"] = time.monotonic() - t0
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == TOOLS
            exec_schema = tools["exec"].input_schema
            assert exec_schema["required"] == ["sandbox", "command"]
            assert {"type": "array", "items": {"type": "string"}} in \
                exec_schema["properties"]["command"]["anyOf"]
            assert tools["sandbox_destroy"].annotations.destructive_hint
            assert "4KB" in (tools["exec"].description or "")

            t0 = time.monotonic()
            sb = await _call(client, "sandbox_create", name=name, template="python", cpus=1,
                             memory="512MB", network="none")
            timings["create"] = time.monotonic() - t0
            assert sb["name"] == name and sb["state"] == "running"
            assert sb["network"] == "none" and sb["workdir"] == "/workspace"
            listed = await _call(client, "sandbox_list")
            assert name in [x["name"] for x in listed["sandboxes"]]

            code = ("import json, sys\n"
                    "json.dump({'sum': sum(range(10)), 'py': sys.version_info[0]},"
                    " open('result.json', 'w'))\n"
                    "print('wrote result.json')\n")
            wrote = await _call(client, "file_write", sandbox=name, path="main.py",
                                content=code)
            assert wrote == {"path": "/workspace/main.py", "bytes": len(code)}
            t0 = time.monotonic()
            run = await _call(client, "exec", sandbox=name, command="python3 main.py")
            timings["exec"] = time.monotonic() - t0
            assert run["exit_code"] == 0 and run["stdout"] == "wrote result.json\n"
            assert not run["truncated"] and run["timeout"] == 60
            got = await _call(client, "file_read", sandbox=name, path="result.json")
            assert got["encoding"] == "text" and not got["truncated"]
            assert json.loads(got["content"]) == {"sum": 45, "py": 3}
            logs = await client.read_resource(f"aiva://sandboxes/{name}/logs")
            text = logs.contents[0].text
            assert "$ python3 main.py" in text and "stdout: wrote result.json" in text
            files = await _call(client, "file_list", sandbox=name)
            assert {"main.py", "result.json"} <= {e["name"] for e in files["entries"]}

            # argv without a shell, a non-zero exit (a result, not an error), stdin, env
            argv = await _call(client, "exec", sandbox=name, command=[
                "python3", "-c", "import os,sys; print(os.environ['X'], sys.stdin.read());"
                " sys.exit(3)"], env={"X": "ex"}, stdin="in", cwd="/tmp")
            assert (argv["exit_code"], argv["stdout"]) == (3, "ex in\n")

            # big output: cut to the budget with a note; the byte count stays exact
            big = await client.call_tool("exec", {
                "sandbox": name, "command": "python3 -c \"print('x' * 100000)\"; echo tail-end"},
                read_timeout_seconds=TIMEOUT)
            data = big.structured_content
            assert not big.is_error and data["truncated"]
            assert data["stdout_bytes"] == 100001 + len("tail-end\n")
            assert len(data["stdout"].encode()) < 4096 + 400
            assert "bytes omitted" in data["stdout"] and "file_read" in data["stdout"]
            assert data["stdout"].endswith("tail-end\n")
            assert "bytes omitted" in _text(big)

            # a long file is read in windows, continued from next_offset
            await _call(client, "exec", sandbox=name,
                        command="seq 1 3000 > nums.txt")  # 13893 bytes
            first = await _call(client, "file_read", sandbox=name, path="nums.txt")
            assert first["truncated"] and first["length"] == 4096 and first["size"] == 13893
            rest = await _call(client, "file_read", sandbox=name, path="nums.txt",
                               offset=first["next_offset"], length=100000)
            assert rest["offset"] == 4096 and rest["length"] == 4096
            assert (first["content"] + rest["content"]).startswith("1\n2\n3\n")

            # binary in and out as base64
            blob = bytes(range(256))
            await _call(client, "file_write", sandbox=name, path="/tmp/blob.bin",
                        content=base64.b64encode(blob).decode(), encoding="base64")
            raw = await _call(client, "file_read", sandbox=name, path="/tmp/blob.bin")
            assert raw["encoding"] == "base64" and base64.b64decode(raw["content"]) == blob

            # timeouts kill the command and say so
            slow = await _call(client, "exec", sandbox=name, command="sleep 30", timeout=1)
            assert slow["timed_out"] and slow["duration"] < 10

            # sync: push a local directory, change it inside, pull it back
            local = tmp_path / "proj"
            local.mkdir()
            (local / "a.txt").write_text("from host\n")
            pushed = await _call(client, "sync", sandbox=name, local=str(local),
                                 remote="proj", direction="push")
            assert pushed["pushed"] == ["a.txt"] and pushed["remote"] == "/workspace/proj"
            await _call(client, "exec", sandbox=name, command="echo made >> proj/b.txt")
            pulled = await _call(client, "sync", sandbox=name, local=str(local),
                                 remote="proj", direction="pull")
            assert pulled["pulled"] == ["b.txt"]
            assert (local / "b.txt").read_text() == "made\n"

            # errors an agent can act on: message and hint, no traceback
            missing = await client.call_tool("exec", {"sandbox": "no-such-box",
                                                      "command": "true"})
            assert missing.is_error
            err = missing.structured_content["error"]
            assert err["type"] == "SandboxNotFound" and "no-such-box" in err["message"]
            assert err["hint"] and "sandbox_list" in err["hint"]
            assert "hint:" in _text(missing) and "Traceback" not in _text(missing)
            nofile = await client.call_tool("file_read", {"sandbox": name,
                                                          "path": "/nope.txt"})
            assert nofile.is_error and "nope.txt" in _text(nofile)
            relative = await client.call_tool("sync", {"sandbox": name, "local": "rel/dir",
                                                       "remote": "x"})
            assert relative.is_error and "absolute" in _text(relative)

            # the logs resource: the newest lines in the budget, a huge line cut short
            templates = (await client.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == ["aiva://sandboxes/{name}/logs{?tail}"]
            logs = await client.read_resource(f"aiva://sandboxes/{name}/logs")
            text = logs.contents[0].text
            assert len(text.encode()) < 4096 + 200
            assert "stdout: xxxxxxxx" in text and "more bytes]" in text  # 100 KB line, cut
            assert text.rstrip().endswith("exit 0") and "$ echo made >> proj/b.txt" in text
            short = await client.read_resource(f"aiva://sandboxes/{name}/logs?tail=2")
            assert len(short.contents[0].text.splitlines()) <= 2
            overview = await client.read_resource("aiva://sandboxes")
            assert name in overview.contents[0].text

            gone = await _call(client, "sandbox_destroy", sandbox=name)
            assert gone == {"destroyed": name}
            after = await client.call_tool("sandbox_status", {"sandbox": name})
            assert after.is_error

    asyncio.run(session())
    print("\nstdio timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


def test_stdio_sandbox_create_under_gvisor(gvisor_ok: None, boxes: list[str]) -> None:
    """An MCP client may ask for the stronger wall; the answer says which runtime it got."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "aiva.cli.main", "mcp", "serve"],
                                   env=_server_env())
    name = f"mcp-gv-{uuid.uuid4().hex[:6]}"
    boxes.append(name)

    async def session() -> None:
        async with Client(params, read_timeout_seconds=TIMEOUT) as client:
            sb = await _call(client, "sandbox_create", name=name, cpus=1, memory="256MB",
                             runtime="gvisor")
            assert sb["runtime"] == "gvisor" and sb["state"] == "running"
            run = await _call(client, "exec", sandbox=name, command=["uname", "-r"])
            assert run["stdout"] == "4.4.0\n"
            status = await _call(client, "sandbox_status", sandbox=name)
            assert status["runtime"] == "gvisor"

    asyncio.run(session())


def test_stdio_stdout_carries_only_protocol(python_image: str) -> None:
    """The raw stream: every line the server writes to stdout is a JSON-RPC message, and
    the server exits cleanly when its client closes stdin."""
    import selectors
    import subprocess

    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}}
    calls = [init, {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                 "name": "sandbox_status", "arguments": {"sandbox": "no-such-box"}}}]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiva.cli.main", "mcp", "serve"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "AIVA_NO_DAEMON": "1"})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b"".join(json.dumps(c).encode() + b"\n" for c in calls))
        proc.stdin.flush()
        lines: list[bytes] = []
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(lines) < 2 and time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    replies = [json.loads(line) for line in [*lines, *rest.splitlines()]]
    assert [r.get("id") for r in replies] == [1, 2]
    assert replies[1]["result"]["isError"] is True


# ---------------------------------------------------------------------- daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon_port(python_image: str) -> Iterator[int]:
    port = _free_port()
    pids: list[int] = []
    try:
        info = control.start(port, timeout=60)
        pids.append(int(info["pid"]))
        yield port
    finally:
        control.stop()
        for pid in pids:
            if control.is_daemon(pid):
                os.kill(pid, signal.SIGKILL)
    log = wire.log_path().read_text(errors="replace")
    assert "Traceback" not in log, log


@asynccontextmanager
async def _http_client(url: str, headers: dict[str, str] | None = None,
                       uds: str | None = None) -> AsyncIterator[Any]:
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    transport = httpx2.AsyncHTTPTransport(uds=uds) if uds else None
    async with httpx2.AsyncClient(headers=headers, transport=transport,
                                  timeout=httpx2.Timeout(30, read=TIMEOUT)) as http, \
            Client(streamable_http_client(url, http_client=http),
                   read_timeout_seconds=TIMEOUT) as client:
        yield client


def test_streamable_http_on_the_daemon(daemon_port: int, boxes: list[str]) -> None:
    url = f"http://127.0.0.1:{daemon_port}/mcp"
    token = wire.token_path().read_text().strip()
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}}
    accept = {"accept": "application/json, text/event-stream"}
    for headers in ({}, {"authorization": "Bearer wrong"}):
        r = httpx.post(url, json=init, headers={**accept, **headers}, trust_env=False)
        assert r.status_code == 401, headers
        assert "bearer token" in r.json()["error"]["message"]
    # the MCP token (for an MCP client's config) opens /mcp and nothing else
    mcp_only = {"authorization": f"Bearer {wire.mcp_token_path().read_text().strip()}"}
    assert (wire.mcp_token_path().stat().st_mode & 0o777) == 0o600
    r = httpx.post(url, json=init, headers={**accept, **mcp_only}, trust_env=False)
    assert r.status_code == 200, r.text
    api = f"http://127.0.0.1:{daemon_port}/v1/sandboxes"
    assert httpx.get(api, headers=mcp_only, trust_env=False).status_code == 401
    name = f"mcph-{uuid.uuid4().hex[:6]}"
    boxes.append(name)

    async def session() -> None:
        async with _http_client(url, {"authorization": f"Bearer {token}"}) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            t0 = time.monotonic()
            sb = await _call(client, "sandbox_create", name=name, cpus=1, memory="512MB")
            created = time.monotonic() - t0
            assert sb["state"] == "running"
            run = await _call(client, "exec", sandbox=name,
                              command="echo hello > greet.txt && cat greet.txt")
            assert run["stdout"] == "hello\n"
            got = await _call(client, "file_read", sandbox=name, path="greet.txt")
            assert got["content"] == "hello\n"

            snap = await _call(client, "snapshot_create", sandbox=name, tag="s1")
            assert snap["tag"] == "s1" and snap["memory"] is False
            await _call(client, "exec", sandbox=name, command="rm greet.txt")
            tags = await _call(client, "snapshot_list", sandbox=name)
            assert [s["tag"] for s in tags["snapshots"]] == ["s1"]
            back = await _call(client, "snapshot_restore", sandbox=name, tag="s1")
            assert back["state"] == "running"
            again = await _call(client, "file_read", sandbox=name, path="greet.txt")
            assert again["content"] == "hello\n"
            bad = await client.call_tool("snapshot_restore", {"sandbox": name, "tag": "nope"})
            assert bad.is_error and bad.structured_content["error"]["hint"]

            logs = await client.read_resource(f"aiva://sandboxes/{name}/logs")
            assert "cat greet.txt" in logs.contents[0].text
            print(f"\nhttp: create {created:.2f}s")

        # the daemon's own engine made it: the REST API sees the same sandbox
        async with _http_client("http://localhost/mcp", uds=str(wire.socket_path())) as unix:
            status = await _call(unix, "sandbox_status", sandbox=name)  # no token needed
            assert status["name"] == name
            await _call(unix, "sandbox_destroy", sandbox=name)

    asyncio.run(session())
    from aiva.daemon.client import connect

    with connect() as remote:
        assert not remote.exists(name)


def test_a_session_cannot_see_or_destroy_the_users_sandboxes(
        python_image: str, engine: Any, boxes: list[str]) -> None:
    """The user's own sandbox, made with the engine (as `aiva start` would): an MCP
    client over stdio neither lists it nor reaches it with any tool; `--all-sandboxes`
    lets it see it."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    user = f"user-{uuid.uuid4().hex[:6]}"
    boxes.append(user)
    engine.create(user, engine.build_spec(cpus=1, memory="256MB"))

    def params(*extra: str) -> Any:
        return StdioServerParameters(command=sys.executable,
                                     args=["-m", "aiva.cli.main", "mcp", "serve", *extra],
                                     env=_server_env())

    async def as_agent() -> dict[str, Any]:
        async with Client(params(), read_timeout_seconds=TIMEOUT) as client:
            listed = await _call(client, "sandbox_list")
            destroy = await client.call_tool("sandbox_destroy", {"sandbox": user},
                                             read_timeout_seconds=TIMEOUT)
            run = await client.call_tool("exec", {"sandbox": user, "command": "id"},
                                         read_timeout_seconds=TIMEOUT)
            return {"names": [b["name"] for b in listed["sandboxes"]],
                    "destroy": (destroy.is_error, _text(destroy)),
                    "exec": run.is_error}

    got = asyncio.run(as_agent())
    assert user not in got["names"]
    assert got["destroy"][0] and f"no sandbox named '{user}'" in got["destroy"][1]
    assert got["exec"] and engine.status(user).state.value == "running"

    async def widened() -> list[str]:
        async with Client(params("--all-sandboxes"), read_timeout_seconds=TIMEOUT) as client:
            return [b["name"] for b in (await _call(client, "sandbox_list"))["sandboxes"]]

    assert user in asyncio.run(widened())
