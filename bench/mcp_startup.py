"""MCP benchmark: start-up of a stdio MCP server through ``aiva mcp run`` vs bare.

The server is mcp-server-time from PyPI. Each round spawns the command, writes
``initialize``, waits for its answer, then ``tools/list`` and one ``tools/call``, and
closes stdin; the figure is spawn -> ``initialize`` answered ("ready") and the time of
one tool call. Peers, in the same run: the same server bare on the host (a venv this
benchmark makes once), and ``docker run -i --rm`` of the same image.

Run: ``.venv/bin/python bench/mcp_startup.py [--quick]``; results in bench/results/mcp.json.
``aiva mcp run`` removes its own sandbox; anything left is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

HOME = tempfile.mkdtemp(prefix="aiva-b")
os.environ["AIVA_HOME"] = HOME
os.environ["AIVA_NO_DAEMON"] = "1"

import docker  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from aiva.images.derive import derive  # noqa: E402
from common import fmt, ratio  # noqa: E402

IMAGE = "aiva-test/mcp-servers:latest"
HOST_VENV = Path(tempfile.gettempdir()) / "aiva-bench-mcp-venv"
RESULTS = Path(__file__).resolve().parent / "results"
console = Console()

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "aiva-bench", "version": "1"}}}
CALLS: list[dict[str, object]] = [
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
     "params": {"name": "get_current_time", "arguments": {"timezone": "UTC"}}},
]


def send(pipe: IO[bytes], msg: dict[str, object]) -> None:
    pipe.write((json.dumps(msg) + "\n").encode())
    pipe.flush()


def answer(pipe: IO[bytes], want_id: int) -> None:
    while line := pipe.readline():
        if json.loads(line).get("id") == want_id:
            return
    raise RuntimeError(f"the server closed before answering request {want_id}")


def session(cmd: list[str]) -> tuple[float, float]:
    """(spawn -> initialize answered, one tools/call) in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        send(proc.stdin, INIT)
        answer(proc.stdout, 1)
        ready = time.perf_counter() - t0
        for msg in CALLS[:2]:
            send(proc.stdin, msg)
        answer(proc.stdout, 2)
        t1 = time.perf_counter()
        send(proc.stdin, CALLS[2])
        answer(proc.stdout, 3)
        call = time.perf_counter() - t1
        proc.stdin.close()
        proc.wait(timeout=60)
        return ready, call
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def host_server() -> Path:
    exe = HOST_VENV / "bin" / "mcp-server-time"
    if not exe.exists():
        console.print("making the host venv with mcp-server-time (once)")
        venv.create(HOST_VENV, with_pip=True)
        subprocess.run([str(HOST_VENV / "bin" / "pip"), "install", "-q", "mcp-server-time"],
                       check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 10")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else 10
    client = docker.from_env()
    derive(IMAGE, base="python", client=client, run=[
        "python3 -m venv /opt/mcp",
        "/opt/mcp/bin/pip install --no-cache-dir mcp-server-time mcp-server-fetch"])
    peers = {
        "bare (host venv)": [str(host_server()), "--local-timezone", "UTC"],
        "docker run -i --rm": ["docker", "run", "-i", "--rm", "--network", "none",
                               "--label", "aiva.bench=1", IMAGE,
                               "/opt/mcp/bin/mcp-server-time", "--local-timezone", "UTC"],
        "aiva mcp run": [sys.executable, "-m", "aiva.cli.main", "mcp", "run", "--quiet",
                         "--image", IMAGE, "--", "/opt/mcp/bin/mcp-server-time",
                         "--local-timezone", "UTC"],
    }
    got: dict[str, list[tuple[float, float]]] = {k: [] for k in peers}
    try:
        for i in range(rounds):
            console.print(f"round {i + 1}/{rounds}")
            for label, cmd in peers.items():  # interleaved: drift hits all alike
                got[label].append(session(cmd))
    finally:
        for ctr in client.containers.list(all=True, filters={"label": "aiva.bench=1"}):
            ctr.remove(force=True)
        shutil.rmtree(HOME, ignore_errors=True)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for k, v in got.items()}
    aiva_ready = med["aiva mcp run"][0]
    table = Table(title="stdio MCP server start-up (median; same host, same run)")
    for col in ("how", "spawn -> initialized", "tools/call", "aiva ready / this"):
        table.add_column(col)
    for label, (ready, call) in med.items():
        table.add_row(label, f"{fmt(ready * 1000)} ms", f"{fmt(call * 1000)} ms",
                      fmt(ratio(aiva_ready, ready)))
    console.print(table)
    bare, plain = med["bare (host venv)"][0], med["docker run -i --rm"][0]
    console.print(f"aiva mcp run overhead: {fmt((aiva_ready - bare) * 1000)} ms over bare, "
                  f"{fmt((aiva_ready - plain) * 1000)} ms over docker run")
    out = RESULTS / ("mcp.quick.json" if args.quick else "mcp.json")
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu_count": os.cpu_count(),
        "rounds": rounds, "median_s": {k: {"ready": r, "tool_call": c}
                                       for k, (r, c) in med.items()},
        "samples_s": got}, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
