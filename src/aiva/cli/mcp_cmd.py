"""``aiva mcp ...``: sandboxes as MCP tools, and MCP servers run inside sandboxes."""

from __future__ import annotations

from typing import Annotated

import typer

mcp_app = typer.Typer(help="MCP: sandboxes as tools (serve), MCP servers in sandboxes (run).",
                      no_args_is_help=True)


# ---------------------------------------------------------------------- serve


@mcp_app.command("serve")
def serve(
    max_output: Annotated[str | None, typer.Option(
        "--max-output", help="bytes kept per exec stream and file_read, e.g. 64KB "
        "(default: config mcp.max_output)")] = None,
    exec_timeout: Annotated[float | None, typer.Option(
        "--exec-timeout", help="seconds a command may run when the call gives no timeout "
        "(default: config mcp.exec_timeout)")] = None,
    max_exec_timeout: Annotated[float | None, typer.Option(
        "--max-exec-timeout", help="the largest timeout a call may ask for "
        "(default: config mcp.max_exec_timeout)")] = None,
    allow_dir: Annotated[list[str] | None, typer.Option(
        "--allow-dir", help="a host directory the sync tool may read and write (repeat for "
        "more; with config mcp.allow_dirs). None by default: no host path is reachable")
    ] = None,
    all_sandboxes: Annotated[bool, typer.Option(
        "--all-sandboxes", help="let the client see and change every sandbox of this "
        "AIVA_HOME, yours included (default: only those it created; config "
        "mcp.all_sandboxes)")] = False,
) -> None:
    """Serve sandboxes as MCP tools over stdio (for an MCP client's config).

    Only protocol goes to stdout; logs go to stderr and AIVA_HOME/aiva.log.

    The client (an agent) reaches host paths only below the --allow-dir directories,
    and only the sandboxes it created (unless --all-sandboxes).

    While the aiva daemon runs, tool calls go through it.

    The daemon serves the same tools over streamable HTTP at /mcp.
    """
    from aiva.config import load_config
    from aiva.mcp.grants import Grants
    from aiva.mcp.limits import Limits

    limits = Limits.from_settings(load_config().mcp, max_output=max_output,
                                  exec_timeout=exec_timeout, max_exec_timeout=max_exec_timeout)
    dirs = [str(d) for d in Grants.resolve(allow_dir or []).dirs]  # a bad one: one line
    from aiva.mcp.serve import serve_stdio  # the MCP SDK: imported only here

    serve_stdio(limits, dirs, all_sandboxes)
