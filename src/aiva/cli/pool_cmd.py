"""``aiva pool status|resize|warm|drain``: the warm pool tasks run in.

The pool keeps its state in the state db and in Docker (see ``aiva.tasks.pool``), so
these commands work on it directly, with an in-process engine, whether or not the daemon
runs; the daemon's loop keeps the pool topped up and shrinks it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from aiva.cli import output
from aiva.cli.output import Fmt

pool_app = typer.Typer(help="The warm pool of sandboxes tasks run in.", no_args_is_help=True)

Format = Annotated[Fmt, typer.Option("--format", "-o", help="table, json or yaml")]
Template = Annotated[str, typer.Argument(help="template (python, minimal ...) or image")]


@contextmanager
def _pool() -> Iterator[Any]:
    from aiva.engine import Engine
    from aiva.tasks.pool import WarmPool

    engine = Engine()
    pool = WarmPool(engine)
    try:
        yield pool
    finally:
        pool.close()
        engine.close()


@pool_app.command("status")
def status(fmt: Format = Fmt.table) -> None:
    """Per template: warm (idle, ready), busy and warming sandboxes, and the limits."""
    with _pool() as pool:
        rows = pool.status()
    if fmt != Fmt.table:
        output._dump(rows, fmt)
        return
    if not rows:
        output.err_console.print("the pool is empty; fill it with `aiva pool warm TEMPLATE`")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("TEMPLATE", "WARM", "BUSY", "WARMING", "MIN", "MAX", "IDLE SHRINK", "ACTIVE",
                "RESET"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["template"], str(r["warm"]), str(r["busy"]), str(r["warming"]),
                      str(r["min"]), str(r["max"]), f"{r['idle_shrink']:g}s",
                      "yes" if r["active"] else "no", r["reset"])
    output.console.print(table)


@pool_app.command("resize")
def resize(
    template: Template,
    min_warm: Annotated[int | None, typer.Option("--min", help="idle sandboxes kept ready")]
    = None,
    max_: Annotated[int | None, typer.Option("--max", help="sandboxes at most, busy or idle")]
    = None,
    idle_shrink: Annotated[float | None, typer.Option(
        "--idle-shrink", help="seconds idle before one beyond --min goes")] = None,
) -> None:
    """Change a template's pool limits (kept across restarts; the daemon applies them)."""
    from aiva.errors import InvalidValue

    if min_warm is None and max_ is None and idle_shrink is None:
        raise InvalidValue("nothing to change", hint="give --min, --max or --idle-shrink")
    with _pool() as pool:
        lim = pool.resize(template, min_warm, max_, idle_shrink)
    output.ok(f"pool {template}: min {lim.min_warm}, max {lim.max}, "
              f"idle shrink {lim.idle_shrink:g} s")


@pool_app.command("warm")
def warm(template: Template) -> None:
    """Fill a template's pool to its --min now (no daemon needed), and keep it warm."""
    with _pool() as pool, output.err_console.status(f"warming the {template} pool"):
        done = pool.warm(template)
    for e in done["errors"]:
        output.error(e)
    made = len(done["created"]) - len(done["errors"])
    output.ok(f"pool {template}: {made} sandbox(es) warmed"
              + (f", {len(done['shrunk']) + len(done['reaped'])} removed"
                 if done["shrunk"] or done["reaped"] else ""))
    if done["errors"]:
        raise typer.Exit(1)


@pool_app.command("drain")
def drain(template: Template) -> None:
    """Destroy a template's idle pool sandboxes and stop keeping it warm (until the next
    claim or `aiva pool warm`); busy ones go when their tasks end."""
    with _pool() as pool:
        gone = pool.drain(template)
    output.ok(f"pool {template}: {len(gone)} idle sandbox(es) destroyed")
