"""``aiva vnc NAME``: watch a desktop sandbox in the browser, or record its screen.

A plain function, registered on the main app with ``app.command()``; it reaches the
engine through ``aiva.cli.main._engine`` (in-process or the daemon's client alike).
"""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated, Any

import typer

from aiva.cli import output
from aiva.cli.output import console, err_console
from aiva.errors import InvalidValue


def _engine() -> Any:
    from aiva.cli import main

    return main._engine()


def vnc(
    name: Annotated[str, typer.Argument(help="a desktop sandbox")],
    open_browser: Annotated[bool, typer.Option(
        "--open", help="open the URL in the default browser")] = False,
    record: Annotated[Path | None, typer.Option(
        "--record", metavar="FILE", help="record the screen to FILE (.mp4, .mkv or .webm) "
                                         "until Ctrl-C")] = None,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="with --record: stop after this many seconds")] = None,
) -> None:
    """The noVNC URL of a desktop sandbox (127.0.0.1 only, password in the URL)."""
    from aiva.desktop import record as recorder

    if duration is not None and (record is None or duration <= 0):
        raise InvalidValue("--duration takes a positive number of seconds, with --record")
    engine = _engine()
    info = engine.desktop(name)
    if record is None or open_browser:
        console.print(info.url, soft_wrap=True, highlight=False)
        if open_browser and not webbrowser.open(info.url):
            err_console.print("no browser could be opened here; copy the URL above")
    if record is None:
        return
    recorder.ffmpeg_command(str(record))  # a bad suffix fails before anything starts
    with output.status(f"starting the recorder in {name} ...") as st:
        def started() -> None:
            until = f"for {duration:g}s" if duration else "until Ctrl-C"
            st.update(f"recording {name} to {record} {until} ...")

        written = recorder.record(engine, name, record, duration=duration, on_started=started)
    output.ok(f"recorded {name} to {record} ({output.size(written)})")
