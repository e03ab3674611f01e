"""An agent that never answers, or answers without end: every host call ends by its
deadline with an AivaError, and the host process stays under a memory bound."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import (
    CALL_TIMEOUT,
    LIMIT,
    Area,
    MemoryGuard,
    Outcome,
    bounded,
    ha,
    leftovers,
)
from surfaces import FILE_PULLS, READS, daemon_ndjson, mcp_file_read, mcp_tool

from aiva import paths
from aiva.errors import AivaError, ProtocolError

GiB = 1 << 30


def bounded_all(calls: dict[str, Any], *, limit: float, on_overrun: Any) -> dict[str, Outcome]:
    """Run every call at once (they share the connection) under one overall deadline."""
    outs = {name: Outcome(limit=limit) for name in calls}
    threads = []
    for name, fn in calls.items():
        def run(fn: Any = fn, out: Outcome = outs[name]) -> None:
            started = time.monotonic()
            try:
                out.value = fn()
            except BaseException as exc:
                out.error = exc
            out.elapsed = time.monotonic() - started

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append((name, t))
    deadline = time.monotonic() + limit
    for _name, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = [name for name, t in threads if t.is_alive()]
    for name in late:
        outs[name].overran = True
    if late:
        on_overrun()
        for _name, t in threads:
            t.join(30)
    return outs


def _failures(outs: dict[str, Outcome], *, must_fail: bool = True) -> list[str]:
    bad = []
    for name, out in outs.items():
        try:
            out.ended(must_fail=must_fail)
        except AssertionError as exc:
            bad.append(f"{name}: {str(exc)[:600]}")
    return bad


def test_every_call_to_an_agent_that_never_answers_ends_by_its_deadline(hostile: Any,
                                                                        tmp_path: Path) -> None:
    """One silent agent, every kind of call at once: each ends with an AivaError within
    the call deadline (plus slack), not at some 60 or 300 s default, not never."""
    hostile.play(ha.script(default="hang"))
    eng, name = hostile.engine, hostile.name
    src = tmp_path / "up.txt"
    src.write_text("x")
    area = Area.make(tmp_path / "area")
    calls = {
        "ping": lambda: eng.agent(name).ping(timeout=CALL_TIMEOUT),  # its own default: 10 s
        "exec": lambda: eng.exec(name, ["true"]),
        "exec with timeout": lambda: eng.exec(name, ["sleep", "1"], timeout=1),
        "read_file": lambda: eng.read_file(name, "/workspace/f"),
        "write_file": lambda: eng.write_file(name, "/workspace/f", b"abc"),
        "stat": lambda: eng.stat(name, "/workspace/f"),
        "list_dir": lambda: eng.list_dir(name, "/workspace"),
        "mkdir": lambda: eng.mkdir(name, "/workspace/d"),
        "remove": lambda: eng.remove(name, "/workspace/d"),
        "rename": lambda: eng.rename(name, "/workspace/a", "/workspace/b"),
        "walk": lambda: eng.agent(name).walk("/workspace"),
        "sync": lambda: eng.sync(name, area.dest, "/workspace/d"),
        "copy_in": lambda: eng.copy_in(name, src, "/workspace/up.txt"),
        "copy_out": lambda: eng.copy_out(name, "/workspace/d", area.dest),
        "proc.list": lambda: eng.agent(name).call("proc.list"),
    }
    outs = bounded_all(calls, limit=CALL_TIMEOUT + 8, on_overrun=hostile.kill)
    bad = _failures(outs)
    assert not bad, "\n".join(bad)


def test_hashing_has_a_deadline_too(hostile: Any) -> None:
    """fs.hash may take longer (it reads whole files), but not for ever: a client with a
    short call deadline gives up on a silent agent in a bounded multiple of it."""
    from aiva.agent_client import AgentClient

    hostile.play(ha.script(default="hang"))
    client = AgentClient(hostile.agents.connect(), label="hash", call_timeout=0.5)
    try:
        out = bounded(lambda: client.hash_files("/workspace", ["a"]), limit=20,
                      on_overrun=hostile.kill)
    finally:
        client.close()
    out.ended(must_fail=True)


def test_silence_after_the_start_of_a_read_ends_by_the_deadline(hostile: Any) -> None:
    """The stat comes, then nothing: the chunk iterator too has a deadline."""
    hostile.play(ha.script({"fs.read": [{"event": {"size": 100, "mode": 0o644,
                                                   "mtime_ns": 1}}, {"hang": True}],
                            "fs.stat": ha.stat_reply("file")}))
    area = Area.make(hostile.tmp / "area")
    out = bounded(lambda: FILE_PULLS["engine.copy_out(file)"](hostile, area.dest),
                  limit=CALL_TIMEOUT + 8, on_overrun=hostile.kill)
    out.ended(must_fail=True)
    assert not leftovers(area.root)


def test_a_silent_agent_fails_mcp_and_daemon_calls_in_time(hostile: Any) -> None:
    hostile.play(ha.script(default="hang"))
    calls = {
        "mcp exec": lambda: mcp_tool(hostile, "exec", {"sandbox": hostile.name,
                                                       "command": ["true"]}),
        "mcp file_read": lambda: mcp_file_read(hostile, "/workspace/f"),
        "daemon exec": lambda: daemon_ndjson(hostile, "/exec", {"command": ["true"]}),
    }
    outs = bounded_all(calls, limit=CALL_TIMEOUT + 10, on_overrun=hostile.kill)
    bad = _failures(outs)
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------- floods


def _cmdlog_size(hostile: Any) -> int:
    sb = hostile.engine.get(hostile.name)
    path = paths.logs_dir(sb.id) / "commands.jsonl"
    return path.stat().st_size if path.exists() else 0


def test_endless_stdout_with_a_timeout_ends_and_stays_bounded(hostile: Any) -> None:
    """`yes`-like output and an agent that ignores the timeout: the call ends at its
    timeout plus grace, memory and the command log stay capped."""
    hostile.play(ha.script({"exec": [{"event": {"started": 7}}, {"stdout": -1}]}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: hostile.engine.exec(hostile.name, ["yes"], timeout=1),
                      on_overrun=hostile.kill)
    out.ended(must_fail=True)
    mem.check()
    assert _cmdlog_size(hostile) <= 9 << 20, "commands.jsonl grew past its cap"


def test_a_large_output_is_kept_to_the_cap(hostile: Any) -> None:
    """256 MiB of stdout, then a proper result: the command finishes, what is kept in
    memory and in the command log is cut (and says so), the host stays bounded."""
    hostile.play(ha.script({"exec": [{"event": {"started": 7}}, {"stdout": 256 << 20},
                                     {"result": {"exit_code": 0, "duration": 1.0,
                                                 "pid": 7, "timed_out": False}}]}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: hostile.engine.exec(hostile.name, ["big"]), limit=60,
                      on_overrun=hostile.kill)
    mem.check()
    out.ended()
    assert out.error is None, out.describe()
    assert len(out.value.stdout) <= 17 << 20
    assert _cmdlog_size(hostile) <= 9 << 20, "commands.jsonl grew past its cap"


@pytest.mark.parametrize("op", READS)
def test_endless_data_after_a_small_declared_size(hostile: Any, op: str) -> None:
    """`ln -s /dev/zero f` as a hostile agent tells it: size 100, then bytes forever."""
    hostile.play(ha.script({"fs.read": ha.read_reply(size=100, sent=-1),
                            "fs.stat": ha.stat_reply("file", size=100)}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: READS[op](hostile), on_overrun=hostile.kill)
    mem.check()
    out.ended()
    if out.error is None:  # a reader that wanted <= 100 bytes may stop early: fine
        assert len(out.value if isinstance(out.value, bytes) else
                   out.value["content"]) <= 100 * 2, out.describe()


def test_mcp_file_read_of_an_endless_file_returns_its_window(hostile: Any) -> None:
    """The daemon grew past 10 GB: file_read(length=100) of a file the agent says is
    2**62 bytes and streams forever. It must return 100 bytes, in time, bounded."""
    hostile.play(ha.script({"fs.read": ha.read_reply(size=1 << 62, sent=-1)}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: mcp_file_read(hostile, "/workspace/zero", length=100),
                      on_overrun=hostile.kill)
    mem.check()
    out.ended()
    assert out.error is None, out.describe()
    assert out.value["length"] == 100


@pytest.mark.parametrize("op", ["engine.copy_out(file)", "files.download(file)"])
def test_copy_out_of_an_endless_file_is_refused_past_its_size(hostile: Any, op: str) -> None:
    hostile.play(ha.script({"fs.read": ha.read_reply(size=1 << 20, sent=-1),
                            "fs.stat": ha.stat_reply("file", size=1 << 20)}))
    area = Area.make(hostile.tmp / "area")
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: FILE_PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    mem.check()
    out.ended(must_fail=True)
    assert isinstance(out.error, AivaError)
    area.check()
    assert not leftovers(area.root)
    assert sum(p.stat().st_size for p in area.dest.rglob("*") if p.is_file()) <= 2 << 20


def test_an_endless_walk_ends_and_stays_bounded(hostile: Any) -> None:
    hostile.play(ha.script({"fs.walk": [{"walk": {"batches": -1}}]}))
    area = Area.make(hostile.tmp / "area")
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: hostile.engine.sync(hostile.name, area.dest, "/workspace/d",
                                                  direction="pull"),
                      limit=60, on_overrun=hostile.kill)
    mem.check()
    out.ended(must_fail=True)
    area.check()


def test_abandoning_a_read_cancels_its_channel(hostile: Any, tmp_path: Path) -> None:
    """Close the chunk iterator after one chunk: the agent gets SIGNAL {"cancel": true}."""
    record = tmp_path / "signals.jsonl"
    hostile.play(ha.script({"fs.read": ha.read_reply(size=64 << 20, sent=64 << 20)},
                           record=str(record)))
    _meta, chunks = hostile.engine.read_stream(hostile.name, "/workspace/f")
    next(chunks)
    chunks.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    signals: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if record.exists():
            signals = [json.loads(x) for x in record.read_text().splitlines()]
            if any(json.loads(s["signal"]).get("cancel") for s in signals):
                break
        time.sleep(0.05)
    assert any(json.loads(s["signal"]).get("cancel") for s in signals), signals


def test_a_flooded_channel_does_not_starve_the_connection(hostile: Any) -> None:
    """After an abandoned endless read, the next call on the same connection answers."""
    hostile.play(ha.script({"fs.read": ha.read_reply(size=1 << 62, sent=-1)}))
    _meta, chunks = hostile.engine.read_stream(hostile.name, "/workspace/f")
    next(chunks)
    chunks.close()  # type: ignore[attr-defined]
    # a channel's buffer is capped (8 MiB by default) and a cancelled one drops its frames
    with MemoryGuard(bound=64 << 20, on_breach=hostile.kill) as mem:
        out = bounded(lambda: hostile.engine.agent(hostile.name).ping(),
                      limit=CALL_TIMEOUT + 8, on_overrun=hostile.kill)
        time.sleep(4)  # the flood goes on meanwhile: memory must not follow it
    mem.check()
    out.ended()
    assert out.error is None, out.describe()


# ---------------------------------------------------------------------- noise on the wire


@pytest.mark.parametrize("greeting", [
    [{"frame": {"kind": "DATA", "size": 1 << 20, "repeat": 256}}],
    [{"frame": {"kind": "RESULT", "size": 64, "repeat": 1000}}],
    [{"frame": {"kind": "STDOUT", "channel": 1, "size": 1 << 20, "repeat": 64}}],
    [{"garbage": 4 << 20}],
], ids=["256MiB-on-stray-channels", "results-on-stray-channels",
        "stdout-on-channel-1-before-it-opens", "garbage"])
def test_noise_before_the_answer_is_dropped(hostile: Any, greeting: list[Any]) -> None:
    hostile.play(ha.script(greeting=greeting))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        out = bounded(lambda: hostile.engine.agent(hostile.name).ping(),
                      on_overrun=hostile.kill)
    mem.check()
    out.ended()


def test_frames_after_the_result_are_dropped(hostile: Any) -> None:
    hostile.play(ha.script({"fs.stat": [*ha.stat_reply("file"),
                                        {"data": 128 << 20}, {"result": {"bytes": 1}}]}))
    with MemoryGuard(on_breach=hostile.kill) as mem:
        first = bounded(lambda: hostile.engine.stat(hostile.name, "/workspace/f"),
                        on_overrun=hostile.kill)
        second = bounded(lambda: hostile.engine.agent(hostile.name).ping(),
                         on_overrun=hostile.kill)
    mem.check()
    first.ended()
    second.ended()


def test_exec_closed_mid_stream_is_an_aiva_error(hostile: Any) -> None:
    hostile.play(ha.script({"exec": [{"event": {"started": 9}}, {"stdout": 1000},
                                     {"close": True}]}))
    out = bounded(lambda: hostile.engine.exec(hostile.name, ["true"]), on_overrun=hostile.kill)
    out.ended(must_fail=True)


def test_a_protocol_error_is_not_a_crash_of_the_connection(hostile: Any) -> None:
    """After a malformed reply, later calls still work (or fail cleanly)."""
    hostile.play(ha.script({"fs.stat": [{"text": "[]", "kind": "RESULT"}]}))
    first = bounded(lambda: hostile.engine.stat(hostile.name, "/x"), on_overrun=hostile.kill)
    first.ended(must_fail=True)
    assert isinstance(first.error, ProtocolError), first.describe()
    second = bounded(lambda: hostile.engine.agent(hostile.name).ping(), limit=LIMIT,
                     on_overrun=hostile.kill)
    second.ended()
