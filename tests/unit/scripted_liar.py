"""A lying stand-in for the in-sandbox agent, for tests: stdlib only, real wire format.

    python scripted_liar.py SCRIPT_JSON LOG_PATH

It serves one client on stdin/stdout. Every frame it receives is appended to LOG_PATH as a
JSON line ``{"kind": k, "chan": c, "payload": "..."}`` (so a test can see cancels). Each
OPEN is answered from SCRIPT, a JSON object mapping an op name to a behaviour:

- a list of ``[kind, payload]`` frames sent on the request's channel; a payload is a JSON
  value (sent as JSON text), or ``{"raw": "text"}`` (sent as those bytes), or
  ``{"zeros": n}`` (n zero bytes)
- ``"silent"``: never answer
- ``"walk_forever"``: walk batches of new names, without end
- ``"data_forever"``: a file header, then zero bytes without end
- ``"stdout_forever"``: an exec start, then output without end

An op the script does not name is answered as the real agent would answer ``ping``, or
with an empty RESULT. ``"*"`` applies to every op not named. ``"flood"``: n frames on
channels nobody opened, sent before the first answer. ``"stop_reading"``: after the first
OPEN the agent stops reading its input (a peer that takes nothing).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src" / "aiva" / "agent"))
import protocol as p

K = p.FrameKind
PING = {"version": "1", "pid": os.getpid(), "python": "3.11.0", "uid": 0}
_write_lock = threading.Lock()


def send(kind: int, chan: int, payload: bytes = b"") -> None:
    with _write_lock:
        _write_all(p.encode(kind, chan, payload))


def _write_all(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def body(payload: Any) -> bytes:
    if isinstance(payload, dict) and "raw" in payload:
        return str(payload["raw"]).encode()
    if isinstance(payload, dict) and "zeros" in payload:
        return bytes(int(payload["zeros"]))
    return json.dumps(payload).encode()  # NaN and Infinity pass as the lies they are


def forever(behaviour: str, chan: int) -> None:
    try:
        i = 0
        if behaviour == "data_forever":
            send(K.EVENT, chan, body({"size": 1 << 20, "mode": 0o644, "mtime_ns": 1}))
        if behaviour == "stdout_forever":
            send(K.EVENT, chan, body({"started": 4242}))
        while True:
            i += 1
            if behaviour == "walk_forever":
                send(K.EVENT, chan, body({"files": {f"d{i}/f{j}": [1, 1, 0o644]
                                                    for j in range(100)}}))
            elif behaviour == "data_forever":
                send(K.DATA, chan, bytes(1 << 18))
            else:
                send(K.STDOUT, chan, b"y" * 65536)
    except OSError:
        return


def answer(script: dict[str, Any], chan: int, req: dict[str, Any]) -> None:
    op = req.get("op")
    behaviour = script.get(op, script.get("*"))
    if behaviour is None:
        send(K.RESULT, chan, body(PING if op == "ping" else {}))
    elif behaviour == "silent":
        return
    elif isinstance(behaviour, str):
        threading.Thread(target=forever, args=(behaviour, chan), daemon=True).start()
    else:
        for kind, payload in behaviour:
            send(int(kind), chan, body(payload))


def main() -> None:
    script = json.loads(sys.argv[1])
    log = open(sys.argv[2], "a", buffering=1)
    flood = int(script.pop("flood", 0))
    stop_reading = bool(script.pop("stop_reading", False))
    decoder = p.Decoder()
    while True:
        data = os.read(0, 1 << 16)
        if not data:
            return
        for kind, chan, payload in decoder.feed(data):
            log.write(json.dumps({"kind": kind, "chan": chan,
                                  "payload": payload.decode("utf-8", "replace")}) + "\n")
            if kind != K.OPEN:
                continue
            for i in range(flood):
                send(K.DATA, 2 * (i % 1000) + 2, bytes(4096))
            flood = 0
            answer(script, chan, json.loads(payload))
            if stop_reading:
                threading.Event().wait()  # hold the pipe open, read nothing more


if __name__ == "__main__":
    main()
