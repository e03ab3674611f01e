"""``aiva deploy NAME SOURCE``: keep an agent or MCP server running in a sandbox.

A plain function, registered on the main app in ``cli/main.py``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from aiva.cli import output


def deploy(
    name: Annotated[str, typer.Argument(help="the sandbox (made if new, updated if not)")],
    source: Annotated[str, typer.Argument(help="a directory (pushed to /app) or an image")],
    entry: Annotated[str | None, typer.Option(
        "--entry", help="the command to keep running (default: aiva.yaml's entry, or the "
                        "image's own command)")] = None,
    port: Annotated[list[str] | None, typer.Option(
        "--port", "-p", help=output.PORT_HELP)] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE")] = None,
    restart: Annotated[str | None, typer.Option(
        "--restart", help="no, on-failure[:N] or always (default always)")] = None,
    template: Annotated[str | None, typer.Option(
        "--template", "-t", help="for a directory: minimal, python (default) ...")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="delete the sandbox first and make it anew")] = False,
) -> None:
    """Deploy a program into a sandbox and keep it running under the daemon.

    The daemon restarts it under the restart policy when it exits; `aiva logs NAME -f`
    shows its output.
    """
    from aiva.cli.main import _engine, _kv
    from aiva.daemon.client import daemon_running
    from aiva.deploy.push import deploy as run_deploy

    engine = _engine()
    with output.status(f"deploying {source} to {name} ...") as st:
        sb = run_deploy(engine, name, source, entry=entry, ports=port, env=_kv(env, "an env"),
                        restart=restart, template=template, replace=replace,
                        say=lambda msg: st.update(f"{name}: {msg}"))
    assert sb.spec.service is not None
    ports = ", ".join(sb.runtime.get("ports") or []) or "no ports"
    output.ok(f"{name} runs `{' '.join(sb.spec.service.command)}` ({ports}; restart "
              f"{sb.spec.restart})")
    if not daemon_running():
        output.error("no daemon runs: nothing restarts the program if it exits",
                     "start one with `aiva daemon start`")
