"""``aiva mcp run`` and ``aiva mcp audit``: an MCP server in a sandbox, and what it was asked.

Plain functions, registered on the ``mcp`` group in ``cli/main.py``. ``run`` speaks
only MCP on stdout; everything aiva has to say goes to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Annotated, Any

import typer

from aiva.cli import observe_output as show
from aiva.cli.output import Fmt, console
from aiva.errors import InvalidValue

RUN_SETTINGS = {"allow_interspersed_args": False}


def _say(msg: str) -> None:
    print(f"aiva: {msg}", file=sys.stderr, flush=True)


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through run()'s finally: the sandbox goes


def run(
    command: Annotated[list[str], typer.Argument(help="the server's command and arguments")],
    image: Annotated[str | None, typer.Option("--image", help="any local image")] = None,
    template: Annotated[str | None, typer.Option(
        "--template", "-t", help="minimal, python or desktop")] = None,
    network: Annotated[str, typer.Option(
        "--network", help="none (default), nat, or allow=HOST,... (only those)")] = "none",
    mount: Annotated[list[str] | None, typer.Option(
        "--mount", help="DIR[:GUEST_PATH][:ro] (repeatable)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="the server's directory")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="the sandbox's name (default mcp-PROGRAM-XXXX)")] = None,
    cpus: Annotated[float | None, typer.Option("--cpus")] = None,
    memory: Annotated[str | None, typer.Option("--memory", "-m")] = None,
    keep: Annotated[bool, typer.Option(
        "--keep", help="keep the sandbox when the client disconnects")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="nothing on stderr")] = False,
) -> None:
    """Run a stdio MCP server in a new sandbox, bridged to this process's stdin/stdout.

    In an MCP client's config, replace `npx some-server` with
    `aiva mcp run -- npx some-server`. Every message is audited (`aiva mcp audit NAME`).
    """
    from aiva.cli.main import _kv
    from aiva.engine import Engine
    from aiva.mcp.run import RunOptions
    from aiva.mcp.run import run as run_server

    opts = RunOptions(command=command, name=name, template=template, image=image,
                      network=network, mounts=mount or [], env=_kv(env, "an env"),
                      cwd=cwd, cpus=cpus, memory=memory, keep=keep)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    engine = Engine()  # the bridge holds the agent's stream itself, daemon or not
    try:
        code = run_server(engine, opts, say=None if quiet else _say)
    except KeyboardInterrupt:
        code = 130
    finally:
        engine.close()
    raise typer.Exit(code)


def audit(
    name: Annotated[str | None, typer.Argument(
        help="the sandbox (also one already destroyed); none: list the sessions")] = None,
    fmt: Annotated[show.EventFmt, typer.Option(
        "--format", "-o", help="table, json, jsonl or yaml")] = show.EventFmt.table,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then wait for more")] = False,
) -> None:
    """The MCP calls of a sandbox's session: method, tool, arguments, sizes, time, error.
    Without a name: every audited session (one per `aiva mcp run` sandbox)."""
    from aiva.cli import observe_cmd
    from aiva.mcp.audit import KIND

    engine = observe_cmd._engine()
    if name is None:
        if follow:
            raise InvalidValue("--follow needs a sandbox", hint="aiva mcp audit NAME -f")
        _sessions([ev for ev in engine.store.events() if ev.kind == KIND], fmt)
        return
    sandbox_id, keep = observe_cmd._sandbox_filter(engine, name)
    rows = [ev for ev in engine.store.events(sandbox_id=sandbox_id)
            if ev.kind == KIND and keep(ev)]
    if not rows and not follow:
        raise InvalidValue(f"no MCP calls recorded for {name}",
                           hint="sessions of `aiva mcp run` are audited; see `aiva events -s NAME`")
    if fmt != show.EventFmt.table:
        show.events(rows, fmt)
    else:
        _table(rows)
    if follow:
        from aiva.observe.collector import follow_events

        newest = engine.store.events(limit=1)
        after = max((ev.id or 0) for ev in newest + rows[-1:]) if newest or rows else 0
        for ev in follow_events(engine.store, sandbox_id=sandbox_id, after=after):
            if ev.kind == KIND and keep(ev):
                if fmt == show.EventFmt.table:
                    _table([ev], header=False)
                else:
                    show.event_line(ev, fmt)


def _sessions(events: list[Any], fmt: show.EventFmt) -> None:
    """One row per audited session: its sandbox, when, how many calls, how many failed."""
    import json

    import yaml

    sessions: dict[str, dict[str, Any]] = {}
    for ev in events:
        key = ev.sandbox_id or ev.sandbox or "?"
        s = sessions.setdefault(key, {"sandbox": ev.sandbox, "sandbox_id": ev.sandbox_id,
                                      "first": ev.ts, "last": ev.ts, "calls": 0,
                                      "errors": 0, "tools": set()})
        s["last"] = ev.ts
        s["calls"] += 1
        s["errors"] += bool(ev.data.get("error"))
        if ev.data.get("tool"):
            s["tools"].add(str(ev.data["tool"]))
    rows = [{**s, "first": s["first"].isoformat(), "last": s["last"].isoformat(),
             "tools": sorted(s["tools"])} for s in sessions.values()]
    if fmt == show.EventFmt.json:
        print(json.dumps(rows, indent=2))
        return
    if fmt in (show.EventFmt.jsonl,):
        for row in rows:
            print(json.dumps(row))
        return
    if fmt == show.EventFmt.yaml:
        print(yaml.safe_dump(rows, sort_keys=False), end="")
        return
    if not rows:
        from aiva.cli.output import err_console

        err_console.print("no MCP sessions audited yet; `aiva mcp run` records each call",
                          highlight=False)
        return
    from rich.table import Table

    from aiva.cli.output import console

    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("SANDBOX", "FIRST", "LAST", "CALLS", "ERRORS", "TOOLS"):
        table.add_column(col, no_wrap=col != "TOOLS")
    for row in rows:
        table.add_row(row["sandbox"] or "?", row["first"][:19].replace("T", " "),
                      row["last"][:19].replace("T", " "), str(row["calls"]),
                      str(row["errors"]), ", ".join(row["tools"]) or "-")
    console.print(table)


def _table(rows: list[Any], *, header: bool = True) -> None:
    from rich.table import Table

    table = Table(show_header=header, box=None, pad_edge=False)
    for col in ("time", "from", "method", "tool", "arguments", "bytes", "result", "ms",
                "error"):
        table.add_column(col, overflow="fold")
    for ev in rows:
        d = ev.data
        dur = d.get("duration")
        table.add_row(ev.ts.strftime("%H:%M:%S"), d.get("from") or "",
                      str(d.get("method") or "?"), d.get("tool") or "",
                      _short(d.get("arguments")), str(d.get("bytes") or ""),
                      str(d.get("result_bytes") or ""),
                      "" if dur is None else f"{dur * 1000:.1f}", d.get("error") or "")
    console.print(table)


def _short(args: Any, limit: int = 60) -> str:
    if args is None:
        return ""
    text = args if isinstance(args, str) else json.dumps(args)
    return text if len(text) <= limit else text[:limit - 1] + "…"


__all__ = ["RUN_SETTINGS", "Fmt", "audit", "run"]
