"""The audit trail of an MCP session: one record per JSON-RPC call or notification.

MCP's stdio transport is newline-delimited JSON-RPC 2.0. :class:`Auditor` sees every
line in both directions, pairs each request with its response by (sender, id), and
hands a finished record to ``emit``: the method, the tool name and arguments of
``tools/call``, the request and result sizes, the duration and the error, if any. A
``tools/call`` whose result has ``isError`` counts as an error too. The bytes are never
changed: auditing only reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Side = Literal["client", "server"]
ARGS_LIMIT = 2000  # characters of a call's arguments kept in the record
KIND = "mcp"  # the event kind in the store


@dataclass
class _Pending:
    method: str
    params: Any
    size: int
    started: float = field(default_factory=time.monotonic)


class LineSplitter:
    """Bytes in, complete lines (newline included) out; keeps the partial tail."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [line + b"\n" for line in lines]

    def rest(self) -> bytes:
        out, self._buf = self._buf, b""
        return out


class Auditor:
    """Pairs requests and responses of one session; calls ``emit(record)`` per call."""

    def __init__(self, emit: Callable[[dict[str, Any]], object]) -> None:
        self._emit = emit
        self._pending: dict[tuple[Side, str], _Pending] = {}

    def see(self, sender: Side, line: bytes) -> None:
        """One line as ``sender`` wrote it."""
        text = line.strip()
        if not text:
            return
        try:
            msg = json.loads(text)
        except ValueError:
            self._emit({"from": sender, "method": None, "bytes": len(line),
                        "error": "not a JSON-RPC message"})
            return
        for one in msg if isinstance(msg, list) else [msg]:  # a JSON-RPC batch
            if isinstance(one, dict):
                self._see(sender, one, len(line))

    def _see(self, sender: Side, msg: dict[str, Any], size: int) -> None:
        method, key = msg.get("method"), _key(msg.get("id"))
        if isinstance(method, str):
            if key is None:  # a notification: nothing comes back
                self._emit({"from": sender, "method": method, "notification": True,
                            "bytes": size, **_details(method, msg.get("params"))})
            else:
                self._pending[(sender, key)] = _Pending(method, msg.get("params"), size)
            return
        if key is None:
            return
        asker: Side = "server" if sender == "client" else "client"
        req = self._pending.pop((asker, key), None)
        record: dict[str, Any] = {"from": asker, "id": msg.get("id"), "result_bytes": size}
        if req is None:
            record |= {"method": None, "error": "a response to no request seen"}
        else:
            record |= {"method": req.method, "bytes": req.size,
                       "duration": round(time.monotonic() - req.started, 6),
                       **_details(req.method, req.params)}
        error = _error_of(msg)
        if error is not None:
            record["error"] = error
        self._emit(record)

    def close(self) -> None:
        """The session ended: requests never answered are recorded as such."""
        for (sender, _), req in sorted(self._pending.items(), key=lambda kv: kv[0]):
            self._emit({"from": sender, "method": req.method, "bytes": req.size,
                        "duration": round(time.monotonic() - req.started, 6),
                        "error": "no response before the session ended",
                        **_details(req.method, req.params)})
        self._pending.clear()


def _key(msg_id: Any) -> str | None:
    return None if msg_id is None else json.dumps(msg_id)


def _details(method: str, params: Any) -> dict[str, Any]:
    if method != "tools/call" or not isinstance(params, dict):
        return {}
    args = json.dumps(params.get("arguments"), ensure_ascii=False, default=str)
    if len(args) > ARGS_LIMIT:
        args = args[:ARGS_LIMIT] + f"... ({len(args) - ARGS_LIMIT} more characters)"
    return {"tool": params.get("name"), "arguments": args}


def _error_of(msg: dict[str, Any]) -> str | None:
    err = msg.get("error")
    if isinstance(err, dict):
        return f"{err.get('code')}: {err.get('message')}"
    result = msg.get("result")
    if isinstance(result, dict) and result.get("isError"):
        texts = [c.get("text", "") for c in result.get("content") or []
                 if isinstance(c, dict) and c.get("type") == "text"]
        return ("tool error: " + " ".join(texts))[:500]
    return None
