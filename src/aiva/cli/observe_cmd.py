"""``aiva events``, ``aiva metrics`` and ``aiva cost``: what the DataCollector knows.

Plain functions, registered on the main app with ``app.command()``. They reach the
engine through ``aiva.cli.main._engine`` (in-process or the daemon's client alike) and
read samples and prices from the state db of this ``AIVA_HOME``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from aiva.cli import observe_output as show
from aiva.cli.output import Fmt, err_console
from aiva.errors import InvalidValue, SandboxNotFound
from aiva.models import Event
from aiva.observe import collector

Format = Annotated[Fmt, typer.Option("--format", "-o", help="table, json or yaml")]
Limit = Annotated[int | None, typer.Option("--limit", "-n", help="only the newest N")]


def _engine() -> Any:
    from aiva.cli import main

    return main._engine()


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InvalidValue(f"--limit must be at least 1, not {limit}")


def _everything(ev: Event) -> bool:
    return True


def _sandbox_filter(engine: Any, name: str) -> tuple[str | None, Callable[[Event], bool]]:
    """The sandbox's id for the store's filter; a removed sandbox is found by the name
    in its events, so its history stays readable."""
    try:
        return engine.get(name).id, _everything
    except SandboxNotFound:
        if not any(ev.sandbox == name for ev in engine.store.events()):
            raise
        return None, lambda ev: ev.sandbox == name


def events(
    sandbox: Annotated[str | None, typer.Option(
        "--sandbox", "-s", help="only this sandbox's events (also a removed one's)")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="then wait for new events (from any aiva process)")] = False,
    fmt: Annotated[show.EventFmt, typer.Option(
        "--format", "-o", help="table, json, jsonl or yaml")] = show.EventFmt.table,
    limit: Limit = None,
) -> None:
    """The event log (lifecycle, commands, file syncs ...), oldest first."""
    _check_limit(limit)
    if follow and fmt in (show.EventFmt.json, show.EventFmt.yaml):
        raise InvalidValue(f"--follow cannot stream {fmt.value}",
                           hint="use --format jsonl (one event per line) or table")
    engine = _engine()
    store = engine.store
    sid, keep = _sandbox_filter(engine, sandbox) if sandbox else (None, _everything)
    newest = store.events(limit=1)  # before listing: nothing falls between list and follow
    if keep is _everything:
        found = store.events(sandbox_id=sid, limit=limit)
    else:
        found = [ev for ev in store.events() if keep(ev)][-limit if limit else 0:]
    show.events(found, fmt)
    if not follow:
        return
    after = max((ev.id or 0) for ev in newest + found[-1:]) if newest or found else 0
    for ev in collector.follow_events(store, sandbox_id=sid, after=after):
        if keep(ev):
            show.event_line(ev, fmt)


def metrics(
    name: str,
    history: Annotated[bool, typer.Option(
        "--history", help="the stored samples (the daemon takes one every "
        "collector.interval seconds) instead of measuring now")] = False,
    since: Annotated[str | None, typer.Option(
        "--since", help="with --history: 10m, 2h, 1d (ago) or an ISO time")] = None,
    limit: Limit = None,
    fmt: Format = Fmt.table,
) -> None:
    """CPU, memory, disk and network of a sandbox: now, or over time with --history."""
    _check_limit(limit)
    engine = _engine()
    if not history:
        if since is not None or limit is not None:
            raise InvalidValue("--since and --limit go with --history",
                               hint=f"aiva metrics {name} --history --since 1h")
        show.metrics_now(engine.metrics(name), fmt)
        return
    start = show.parse_since(since) if since is not None else None
    sb = engine.get(name)
    coll = collector.Collector(getattr(engine, "store", None))
    try:
        rows = coll.history(sb.id, since=start, limit=limit)
    finally:
        coll.close()
    if not rows and fmt == Fmt.table:
        err_console.print(f"no stored samples of {name}" + (" in that time" if since else "")
                          + "; the daemon samples running sandboxes (`aiva daemon start`), "
                          f"and `aiva metrics {name}` measures now", highlight=False)
        return
    show.metrics_history(rows, fmt)


def cost(fmt: Format = Fmt.table) -> None:
    """What each sandbox has cost so far, at the prices under `cost:` in config.yaml.

    Running hours x (CPUs x cpu_hour + memory GB x gb_hour); local backends cost 0
    unless priced.
    """
    show.cost_table(collector.costs(_engine()), fmt)
