"""The supervisor's bounded logs: the console and the guest's syslog are the guest's words,
so a guest that floods them (an endless line, gigabytes of lines) must cost the host a
bounded buffer and a bounded file."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from aiva.vm import supervisor
from aiva.vm.supervisor import MAX_LINE, BoundedLog, read_lines


def lines_of(chunks: list[bytes]) -> list[bytes]:
    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        for c in chunks:
            reader.feed_data(c)
        reader.feed_eof()
        return [line async for line in read_lines(reader)]

    return asyncio.run(run())


def test_lines_split_across_chunks_and_cr_stripped() -> None:
    assert lines_of([b"one\r\ntw", b"o\nthr", b"ee"]) == [b"one", b"two", b"three"]


def test_an_endless_line_is_cut_and_the_next_line_survives() -> None:
    flood = [b"x" * (1 << 16)] * 40  # 2.5 MiB without a newline
    out = lines_of([*flood, b"tail\nnext\n"])
    assert out == [b"x" * MAX_LINE, b"next"]


def test_bounded_log_rotates_and_keeps_at_most_two_files(tmp_path: Path) -> None:
    path = tmp_path / "syslog.jsonl"
    log = BoundedLog(path, rotate_at=10_000)
    line = json.dumps({"t": 1.0, "s": "syslog", "d": "y" * 80}).encode() + b"\n"
    for _ in range(2_000):  # ~200 KB written, twenty times the limit
        log.write(line)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["syslog.jsonl", "syslog.jsonl.1"]
    assert all((tmp_path / f).stat().st_size <= 10_000 for f in files)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().endswith(line)


def test_bounded_log_never_writes_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    (tmp_path / "console.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        BoundedLog(tmp_path / "console.jsonl")
    assert target.read_text() == "keep\n"


def test_syslog_pump_writes_the_guests_lines_bounded(tmp_path: Path) -> None:
    out = tmp_path / "syslog.jsonl"

    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b'{"t":1,"s":"syslog","d":"a: hi"}\n' + b"z" * (MAX_LINE * 3))
        reader.feed_eof()
        await supervisor._pump_syslog(reader, out)

    asyncio.run(run())
    first, second = out.read_bytes().splitlines()
    assert json.loads(first)["d"] == "a: hi"
    assert second == b"z" * MAX_LINE
    assert os.path.getsize(out) < 2 * MAX_LINE
