"""What the benchmarks share: timing samples, percentiles, ratios, number format, and the
result rows, their table and their JSON file (one shape for every ``results/*.json``)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# piped output would otherwise wrap the table at 80 columns
console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass
class Row:
    """One line of a benchmark's table and of its results JSON."""

    figure: str
    metric: str
    unit: str
    aiva: float | None
    peer: str | None = None
    peer_value: float | None = None
    ratio: float | None = None
    ratio_is: str | None = None
    target: str | None = None
    met: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def progress(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False)


def render(rows: list[Row], title: str, *, value: str = "aiva",
           notes: list[str] | None = None) -> None:
    """The table; ``value`` names aiva's column (e.g. "pool")."""
    table = Table(title=title)
    for col in ("figure", "metric", value, "peer", "peer value", "ratio", "target", "met"):
        table.add_column(col, justify="right" if col in (value, "peer value") else "left",
                         no_wrap=True)
    for r in rows:
        met = {True: "[green]yes[/green]", False: "[red]NO[/red]", None: ""}[r.met]
        rat = "-" if r.ratio is None else f"{fmt(r.ratio)}" + (
            f" ({r.ratio_is})" if r.ratio_is else "")
        mine = "-" if r.aiva is None else f"{fmt(r.aiva)} {r.unit}"
        peer_value = "-" if r.peer_value is None else f"{fmt(r.peer_value)} {r.unit}"
        table.add_row(r.figure, r.metric, mine, r.peer or "-", peer_value, rat,
                      r.target or "", met)
    console.print(table)
    judged = [r for r in rows if r.met is not None]
    if judged:
        console.print(f"targets met: {sum(bool(r.met) for r in judged)}/{len(judged)}")
    for note in notes or []:
        console.print(f"note: {note}", highlight=False)


def write_json(path: Path, host: dict[str, Any], rep: Report) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(r).items()}
            for r in rep.rows]
    doc: dict[str, Any] = {"host": host, "rows": rows}
    if rep.notes:
        doc["notes"] = rep.notes
    doc["samples"] = rep.samples
    path.write_text(json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n")
    console.print(f"wrote {path}")


def sample(fn: Callable[[], object], n: int, *, warm: int = 0) -> list[float]:
    """Wall time of ``n`` calls of ``fn`` (after ``warm`` untimed ones), in seconds."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile, linearly interpolated between closest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


@contextmanager
def no_sigint() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:,.0f}"
