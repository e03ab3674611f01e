"""``aiva daemon start [--port N] | stop | status``: run the engine as one shared process.

While the daemon runs, the CLI and the SDK send their calls to it (over
``AIVA_HOME/daemon.sock``) instead of running the engine in-process; ``AIVA_NO_DAEMON=1``
opts out.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
import yaml

from aiva.cli import output

daemon_app = typer.Typer(help="The aiva daemon: the engine as one shared process (REST API).",
                         no_args_is_help=True)

Format = Annotated[output.Fmt, typer.Option("--format", "-o", help="table, json or yaml")]


@daemon_app.command("start")
def start(
    port: Annotated[int | None, typer.Option(
        "--port", help="also listen on 127.0.0.1:PORT (bearer token: AIVA_HOME/daemon.token)")
    ] = None,
    foreground: Annotated[bool, typer.Option(
        "--foreground", help="run in this terminal instead of detached")] = False,
    mcp_allow_dir: Annotated[list[str] | None, typer.Option(
        "--mcp-allow-dir", help="a host directory the /mcp sync tool may read and write "
        "(repeat for more; with config mcp.allow_dirs). None by default")] = None,
) -> None:
    """Start the daemon (detached) and wait until it answers."""
    from aiva.daemon import control
    from aiva.mcp.grants import Grants

    dirs = [str(d) for d in Grants.resolve(mcp_allow_dir or []).dirs]  # a bad one: one line
    if foreground:
        from aiva.daemon.__main__ import main

        main(([] if port is None else ["--port", str(port)])
             + [arg for d in dirs for arg in ("--mcp-allow-dir", d)])
        return
    with output.status("starting the aiva daemon ..."):
        info = control.start(port, mcp_allow_dirs=dirs)
    where = info["socket"] + (f" and 127.0.0.1:{info['port']}" if info.get("port") else "")
    output.ok(f"aiva daemon running (pid {info['pid']}) on {where}")


@daemon_app.command("stop")
def stop(
    keep_pool: Annotated[bool, typer.Option(
        "--keep-pool", help="leave the warm pool's idle sandboxes running (nothing shrinks "
                            "them without the daemon)")] = False,
) -> None:
    """Stop the daemon (SIGTERM, then SIGKILL). The warm pool's idle sandboxes, which
    only the daemon's tasks use, are drained unless --keep-pool; your own sandboxes, and
    pool sandboxes that are busy or kept for you, keep running."""
    from aiva.daemon import control

    output.ok("aiva daemon stopped" if control.stop() else "no aiva daemon was running")
    _pool_after_stop(drain=not keep_pool)


def _pool_after_stop(*, drain: bool) -> None:
    """Drain the idle warm sandboxes (or say what is left and how to drain it)."""
    from aiva.cli.pool_cmd import _pool

    with _pool() as pool:
        rows = [r for r in pool.status() if r["warm"] or r["busy"]]
        for r in rows:
            t = r["template"]
            if drain and r["warm"]:
                gone = pool.drain(t)
                output.ok(f"drained the warm pool of {t}: {len(gone)} idle sandbox"
                          f"{'es' if len(gone) != 1 else ''} removed")
            elif r["warm"]:
                output.err_console.print(
                    f"the warm pool of {t} keeps {r['warm']} idle sandboxes running and "
                    f"nothing shrinks it now; `aiva pool drain {t}` removes them",
                    highlight=False)
            if r["busy"]:
                output.err_console.print(
                    f"{r['busy']} {t} pool sandboxes are busy or held for a task; they stay "
                    "(`aiva pool status`)", highlight=False)


@daemon_app.command("status")
def status(fmt: Format = output.Fmt.table) -> None:
    """pid, uptime, socket, port, version, the MCP grants and the sandbox count; exits 1
    if not running."""
    from aiva.daemon import control

    info = control.status()
    if fmt == output.Fmt.json:
        print(json.dumps(info, indent=2))
    elif fmt == output.Fmt.yaml:
        print(yaml.safe_dump(info, sort_keys=False), end="")
    elif not info["running"]:
        output.error("no aiva daemon is running", "start one with `aiva daemon start`")
    else:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_at"]))
        rows = [("pid", info["pid"]), ("version", info["version"]),
                ("started", f"{started} (up {info['uptime']:.0f}s)"),
                ("socket", info["socket"]), ("port", info["port"] or "-"),
                ("mcp dirs", ", ".join(info.get("mcp_allow_dirs") or []) or "none granted"),
                ("sandboxes", info["sandboxes"])]
        for key, value in rows:
            print(f"{key:<10} {value}")
    if not info["running"]:
        raise typer.Exit(1)
