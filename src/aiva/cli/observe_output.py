"""How ``aiva events``, ``aiva metrics`` and ``aiva cost`` show things.

Events print as plain fixed-width lines rather than a rich table, so ``-f`` can stream
them one at a time under the same header.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from rich.markup import escape
from rich.table import Table

from aiva.cli.output import Fmt, _dump, console, err_console, size
from aiva.errors import InvalidValue
from aiva.models import Event
from aiva.observe.metrics import SandboxMetrics

_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class EventFmt(StrEnum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    yaml = "yaml"


def parse_since(text: str) -> float:
    """'90s', '10m', '2h', '1d' ago, or an ISO time (UTC unless it says) -> epoch."""
    m = _AGO.match(text)
    if m:
        return time.time() - float(m[1]) * _SECONDS[m[2]]
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValue(f"'{text}' is not a time",
                           hint="write 10m, 2h or 1d (ago), or 2024-05-01T12:00") from None
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()


def _stamp(ts: datetime | float) -> str:
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _details(ev: Event) -> str:
    d = ev.data
    if ev.kind == "command":
        cmd = shlex.join(d["cmd"]) if isinstance(d.get("cmd"), list) else str(d.get("cmd"))
        if d.get("background"):
            return f"background pid {d.get('pid')}: {cmd}"
        late = " (timed out)" if d.get("timed_out") else ""
        return f"exit {d.get('exit_code')} in {d.get('duration', 0):.3f}s{late}: {cmd}"
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}"
                    for k, v in d.items() if v is not None)


def event_header() -> None:
    print(f"{'ID':>6}  {'TIME (UTC)':<19}  {'SANDBOX':<16}  {'KIND':<14}  DETAILS", flush=True)


def event_line(ev: Event, fmt: EventFmt) -> None:
    if fmt == EventFmt.jsonl:
        print(ev.model_dump_json(), flush=True)
        return
    print(f"{ev.id or 0:>6}  {_stamp(ev.ts):<19}  {ev.sandbox or '-':<16}  {ev.kind:<14}  "
          f"{_details(ev)}", flush=True)


def events(evs: list[Event], fmt: EventFmt) -> None:
    if fmt in (EventFmt.json, EventFmt.yaml):
        _dump([ev.model_dump(mode="json") for ev in evs], Fmt(fmt.value))
        return
    if fmt == EventFmt.table:
        event_header()
    for ev in evs:
        event_line(ev, fmt)


def metrics_now(m: SandboxMetrics, fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump(m.to_dict(), fmt)
        return
    mem, src = m.memory, m.source
    rows = [
        ("cpu", f"{m.cpu_percent:.1f}% of {m.cpus:g} CPU", src.get("cpu")),
        ("memory", f"{size(mem['used'])} used of {size(mem['total'])}, "
                   f"{size(mem['available'])} available, {size(mem['cache'])} cache",
         src.get("memory")),
        ("disk", f"{size(m.disk['read_bytes'])} read, {size(m.disk['write_bytes'])} written",
         src.get("disk")),
        ("net", f"{size(m.net['rx_bytes'])} in, {size(m.net['tx_bytes'])} out",
         src.get("net")),
        ("uptime", f"{m.uptime:.0f} s", src.get("uptime")),
    ]
    table = Table(box=None, show_header=False)
    for style in ("bold", "", "dim"):
        table.add_column(style=style)
    for key, text, source in rows:
        table.add_row(key, text, f"({source or 'none'})")
    console.print(table)


def metrics_history(rows: list[dict[str, Any]], fmt: Fmt) -> None:
    """One line per sample, fitting 80 columns: the date once (in the title) when all the
    samples are of one day, pairs (used/total, read/write, in/out) in one column each."""
    if fmt != Fmt.table:
        _dump(rows, fmt)
        return
    days = {_stamp(r["ts"])[:10] for r in rows}
    one_day = len(days) == 1
    table = Table(box=None, header_style="bold", pad_edge=False,
                  title=f"{days.pop()} (UTC)" if one_day else None, title_justify="left")
    for col in ("TIME" if one_day else "TIME (UTC)", "CPU %", "MEMORY", "DISK R/W",
                "NET IN/OUT", "UPTIME"):
        table.add_column(col, justify="left" if col.startswith("TIME") else "right",
                         no_wrap=True)
    for r in rows:
        stamp = _stamp(r["ts"])
        table.add_row(stamp[11:] if one_day else stamp, f"{r['cpu_percent']:.1f}",
                      f"{size(r['mem_used'])}/{size(r['mem_total'])}",
                      f"{size(r['disk_read'])}/{size(r['disk_write'])}",
                      f"{size(r['net_rx'])}/{size(r['net_tx'])}", duration(r["uptime"]))
    console.print(table)


def duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def cost_table(rows: list[dict[str, Any]], fmt: Fmt) -> None:
    if fmt != Fmt.table:
        _dump(rows, fmt)
        return
    if not rows:
        err_console.print("no sandboxes; create one with `aiva start NAME`")
        return
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "BACKEND", "STATE", "CPUS", "MEMORY", "RUNNING", "PRICE/H", "COST"):
        table.add_column(col, justify="right" if col in ("CPUS", "COST", "PRICE/H") else "left")
    currency = rows[0]["currency"]
    for r in rows:
        hourly = r["cpus"] * r["cpu_hour"] + r["memory"] / (1 << 30) * r["gb_hour"]
        table.add_row(escape(r["sandbox"]), r["backend"], r["state"], f"{r['cpus']:g}",
                      size(r["memory"]), duration(r["running_seconds"]), f"{hourly:.4f}",
                      f"{r['cost']:.4f} {escape(r['currency'])}")
    table.add_row("[bold]total[/]", "", "", "", "", "", "",
                  f"[bold]{sum(r['cost'] for r in rows):.4f} {escape(currency)}[/]")
    console.print(table)
    if not any(r["cpu_hour"] or r["gb_hour"] for r in rows):
        err_console.print("[dim]no prices set: local backends cost nothing by default; "
                          "set them under `cost:` in config.yaml[/]")
