"""`aiva metrics NAME --history` fits an 80-column terminal: one line per sample."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from aiva.cli import observe_output
from aiva.cli.output import Fmt


def sample(ts: float) -> dict[str, Any]:
    return {"ts": ts, "cpu_percent": 123.4, "mem_used": 987_654_321, "mem_total": 8 << 30,
            "disk_read": 12_345_678_901, "disk_write": 123_456_789, "net_rx": 98_765_432,
            "net_tx": 1_234_567, "uptime": 123_456}


@pytest.mark.parametrize("spread", [1.0, 86_400.0 * 2], ids=["one day", "several days"])
def test_each_sample_is_one_line_in_80_columns(monkeypatch: pytest.MonkeyPatch,
                                               spread: float) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(observe_output, "console", Console(file=buf, width=80))
    start = 1_796_000_000.0
    observe_output.metrics_history([sample(start + i * spread) for i in range(3)], Fmt.table)
    lines = buf.getvalue().rstrip("\n").splitlines()
    body = [line for line in lines if "123.4" in line]
    assert len(body) == 3, buf.getvalue()
    assert all(len(line) <= 80 for line in lines)
    assert "34h17m" in body[0]
