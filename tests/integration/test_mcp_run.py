"""``aiva mcp run`` with real third-party MCP servers from PyPI (mcp-server-time and
mcp-server-fetch, installed into an image by ``aiva image derive``), driven by the
official ``mcp`` client exactly as an MCP client app would run them.

Network checks talk only to an HTTP server the test runs in its own sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aiva.images.derive import derive
from aiva.mcp.audit import KIND
from aiva.sdk import Sandbox

pytestmark = pytest.mark.docker

AIVA = [sys.executable, "-m", "aiva.cli.main"]
SERVERS = "aiva-test/mcp-servers:latest"
TIME = "/opt/mcp/bin/mcp-server-time"
FETCH = "/opt/mcp/bin/mcp-server-fetch"


@pytest.fixture(scope="module")
def mcp_image(python_image: str, docker_ok: Any) -> str:
    """Two MCP servers from PyPI in a venv on the python template (cached by content)."""
    return derive(SERVERS, base="python", client=docker_ok, run=[
        "python3 -m venv /opt/mcp",
        "/opt/mcp/bin/pip install --no-cache-dir mcp-server-time mcp-server-fetch",
    ]).tag


@pytest.fixture(scope="module")
def target(python_image: str, engine: Any, docker_ok: Any) -> Iterator[tuple[str, str]]:
    """An HTTP server of the test's own, in its own sandbox: (url, a secret it serves)."""
    secret = uuid.uuid4().hex
    sb = Sandbox.create(f"target-{secret[:6]}", template="python", engine=engine, cpus=1,
                        memory="256MB")
    try:
        sb.files.write("/workspace/www/secret.txt", secret)
        sb.commands.run("python3 -m http.server 8000 --directory /workspace/www",
                        background=True)
        ip = docker_ok.containers.get(sb.info.runtime["container_id"]).attrs[
            "NetworkSettings"]["IPAddress"]
        sb.commands.run("for i in $(seq 100); do python3 -c \"import urllib.request as u; "
                        "u.urlopen('http://127.0.0.1:8000/secret.txt')\" && exit 0; "
                        "sleep 0.1; done; exit 1", check=True)
        yield f"http://{ip}:8000/secret.txt", secret
    finally:
        engine.delete(sb.name, volumes=True)


def session(args: list[str], work: Callable[[Any], Any]) -> Any:
    """Run ``aiva mcp run ARGS`` as the official client's stdio server; ``work(session)``."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def main() -> Any:
        params = StdioServerParameters(command=AIVA[0], args=[*AIVA[1:], "mcp", "run", *args],
                                       env=dict(os.environ))
        async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
            await s.initialize()
            return await work(s)

    return asyncio.run(asyncio.wait_for(main(), 180))


def wait_gone(engine: Any, name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.exists(name):
        assert time.monotonic() < deadline, f"{name} was not destroyed after the session"
        time.sleep(0.1)


def text_of(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def test_a_pypi_server_answers_through_the_bridge_and_is_audited(
        mcp_image: str, engine: Any) -> None:
    name = f"mcp-time-{uuid.uuid4().hex[:6]}"

    async def work(s: Any) -> tuple[list[str], Any]:
        tools = await s.list_tools()
        called = await s.call_tool("get_current_time", {"timezone": "UTC"})
        return [t.name for t in tools.tools], called

    try:
        names, called = session(["--image", mcp_image, "--name", name, "--", TIME], work)
        assert "get_current_time" in names
        assert not called.is_error
        assert json.loads(text_of(called))["timezone"] == "UTC"
        wait_gone(engine, name)  # the client hung up: the sandbox went with it

        calls = [ev for ev in engine.store.events() if ev.sandbox == name and ev.kind == KIND]
        by_method = {ev.data["method"]: ev.data for ev in calls}
        assert {"initialize", "tools/list", "tools/call"} <= set(by_method)
        call = by_method["tools/call"]
        assert call["tool"] == "get_current_time"
        assert json.loads(call["arguments"]) == {"timezone": "UTC"}
        assert call["result_bytes"] > 0 and call["duration"] >= 0 and "error" not in call

        out = subprocess.run([*AIVA, "mcp", "audit", name, "--format", "jsonl"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(x) for x in out.stdout.splitlines()]
        assert any(r["data"].get("tool") == "get_current_time" for r in rows)
        # no name: the sessions, this one among them (its sandbox already gone)
        out = subprocess.run([*AIVA, "mcp", "audit", "--format", "json"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        mine = [r for r in json.loads(out.stdout) if r["sandbox"] == name]
        assert len(mine) == 1 and mine[0]["calls"] >= 3
        assert mine[0]["tools"] == ["get_current_time"] and mine[0]["errors"] == 0
        out = subprocess.run([*AIVA, "mcp", "audit"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "COLUMNS": "200"})
        assert name in out.stdout and "CALLS" in out.stdout
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)


def test_network_none_cannot_reach_a_server_that_nat_and_allow_can(
        mcp_image: str, engine: Any, target: tuple[str, str]) -> None:
    url, secret = target
    fetch = ["--", FETCH, "--ignore-robots-txt", "--allow-private-ips"]

    async def work(s: Any) -> Any:
        return await s.call_tool("fetch", {"url": url, "raw": True})

    blocked = session(["--image", mcp_image, *fetch], work)  # default: --network none
    assert blocked.is_error and secret not in text_of(blocked)
    allowed = session(["--image", mcp_image, "--network", "nat", *fetch], work)
    assert not allowed.is_error and secret in text_of(allowed)
    host = url.split("/")[2]  # IP:8000
    listed = session(["--image", mcp_image, "--network", f"allow={host}", *fetch], work)
    assert not listed.is_error and secret in text_of(listed)


def test_keep_mount_and_errors(mcp_image: str, engine: Any, tmp_path: Any) -> None:
    name = f"mcp-keep-{uuid.uuid4().hex[:6]}"
    (tmp_path / "notes.txt").write_text("for the server's eyes")

    async def work(s: Any) -> int:
        return len((await s.list_tools()).tools)

    try:
        args = ["--image", mcp_image, "--name", name, "--keep",
                "--mount", f"{tmp_path}:/data:ro", "--", TIME]
        assert session(args, work) > 0
        assert engine.exists(name)
        spec = engine.get(name).spec
        assert spec.network == "none" and spec.labels["aiva.mcp"] == "run"
        assert engine.exec(name, "cat /data/notes.txt").stdout == "for the server's eyes"
        assert engine.exec(name, "touch /data/x").exit_code != 0  # read-only
    finally:
        if engine.exists(name):
            engine.delete(name, volumes=True)
    r = subprocess.run([*AIVA, "mcp", "run", "--image", "no/such-image", "--", "x"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # stdout is the protocol's, even on errors
