"""``aiva mcp ...``: sandboxes as MCP tools, and MCP servers run inside sandboxes."""

from __future__ import annotations

import typer

mcp_app = typer.Typer(help="MCP: sandboxes as tools (serve), MCP servers in sandboxes (run).",
                      no_args_is_help=True)
