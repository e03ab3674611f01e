"""JSON-lines logs: tail semantics that follow relies on."""

from __future__ import annotations

import json
from pathlib import Path

from aiva.observe.logs import merge, read_jsonl


def _write(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"t": 1000.0 + i, "s": "stdout", "d": f"line {i}"})
                            + "\n" for i in range(n)))


def test_tail_none_is_everything_and_zero_is_nothing(tmp_path: Path) -> None:
    log = tmp_path / "x.jsonl"
    _write(log, 5)
    assert [x.text for x in read_jsonl(log)] == [f"line {i}" for i in range(5)]
    assert [x.text for x in read_jsonl(log, tail=2)] == ["line 3", "line 4"]
    assert read_jsonl(log, tail=0) == []  # a follow that starts now repeats nothing
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_source_override_and_merge_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(a, 3)
    b.write_text(json.dumps({"t": 1001.5, "s": "x", "d": "between"}) + "\n{broken\n")
    lines = merge(read_jsonl(a), read_jsonl(b, source="syslog"))
    assert [(x.source, x.text) for x in lines] == [
        ("stdout", "line 0"), ("stdout", "line 1"), ("syslog", "between"), ("stdout", "line 2")]
