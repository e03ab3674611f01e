"""The MCP audit: requests paired with responses by sender and id, in both directions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aiva.mcp.audit import ARGS_LIMIT, Auditor, LineSplitter
from aiva.mcp.run import default_name


def line(msg: Any) -> bytes:
    return (json.dumps(msg) + "\n").encode()


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def auditor(records: list[dict[str, Any]]) -> Auditor:
    return Auditor(records.append)


def test_a_tool_call_is_one_record_with_its_tool_arguments_and_sizes(
        auditor: Auditor, records: list[dict[str, Any]]) -> None:
    req = line({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                "params": {"name": "get_time", "arguments": {"tz": "UTC"}}})
    res = line({"jsonrpc": "2.0", "id": 7, "result": {"content": [], "isError": False}})
    auditor.see("client", req)
    assert records == []  # nothing until the answer
    auditor.see("server", res)
    [rec] = records
    assert rec["from"] == "client" and rec["method"] == "tools/call"
    assert rec["tool"] == "get_time" and json.loads(rec["arguments"]) == {"tz": "UTC"}
    assert (rec["bytes"], rec["result_bytes"]) == (len(req), len(res))
    assert rec["duration"] >= 0 and "error" not in rec


def test_errors_tool_errors_notifications_and_server_requests(
        auditor: Auditor, records: list[dict[str, Any]]) -> None:
    auditor.see("client", line({"jsonrpc": "2.0", "id": "a", "method": "nope"}))
    auditor.see("server", line({"jsonrpc": "2.0", "id": "a",
                                "error": {"code": -32601, "message": "Method not found"}}))
    auditor.see("client", line({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "boom", "arguments": {}}}))
    auditor.see("server", line({"jsonrpc": "2.0", "id": 1, "result": {
        "isError": True, "content": [{"type": "text", "text": "disk full"}]}}))
    auditor.see("client", line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    # the server asks the client (sampling); the same id from the other side is separate
    auditor.see("server", line({"jsonrpc": "2.0", "id": 1, "method": "sampling/createMessage"}))
    auditor.see("client", line({"jsonrpc": "2.0", "id": 1, "result": {}}))
    assert [(r["from"], r["method"], r.get("error")) for r in records] == [
        ("client", "nope", "-32601: Method not found"),
        ("client", "tools/call", "tool error: disk full"),
        ("client", "notifications/initialized", None),
        ("server", "sampling/createMessage", None),
    ]
    assert records[2]["notification"] is True


def test_garbage_batches_stray_responses_and_unanswered_calls(
        auditor: Auditor, records: list[dict[str, Any]]) -> None:
    auditor.see("client", b"not json at all\n")
    auditor.see("client", b"\n")  # blank lines are nothing
    auditor.see("client", line([{"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                {"jsonrpc": "2.0", "method": "notifications/x"}]))
    auditor.see("server", line({"jsonrpc": "2.0", "id": 99, "result": {}}))
    auditor.see("client", line({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                "params": {"name": "slow", "arguments": {"x": "y" * 5000}}}))
    auditor.close()
    assert [(r["method"], r.get("error")) for r in records] == [
        (None, "not a JSON-RPC message"),
        ("notifications/x", None),
        (None, "a response to no request seen"),
        ("ping", "no response before the session ended"),
        ("tools/call", "no response before the session ended"),
    ]
    args = records[-1]["arguments"]
    assert len(args) < ARGS_LIMIT + 40 and args.endswith("more characters)")


def test_line_splitter_keeps_partial_lines() -> None:
    s = LineSplitter()
    assert s.feed(b'{"a":') == []
    assert s.feed(b'1}\n{"b"') == [b'{"a":1}\n']
    assert s.feed(b":2}\n\n") == [b'{"b":2}\n', b"\n"]
    assert s.feed(b"tail") == [] and s.rest() == b"tail" and s.rest() == b""


@pytest.mark.parametrize(("command", "prefix"), [
    (["npx", "-y", "@modelcontextprotocol/server-everything"], "mcp-server-everything-"),
    (["/opt/mcp/bin/mcp-server-time", "--local-timezone", "UTC"], "mcp-mcp-server-time-"),
    (["python3", "-m", "my_server"], "mcp-my-server-"),
    (["Weird Name!"], "mcp-weird-name-"),
])
def test_default_names_say_what_runs(command: list[str], prefix: str) -> None:
    name = default_name(command)
    assert name.startswith(prefix) and len(name) == len(prefix) + 4
