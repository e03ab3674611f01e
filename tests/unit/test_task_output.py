"""A task's output file: kept per task, capped, never written through a link."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aiva.tasks.output import TaskOutput, output_path, read_task_output


def test_output_round_trip_and_cap(tmp_path: Path) -> None:
    out = TaskOutput("t-0000aaaa", cap=100)
    out.write("cmd", "make fix")
    out.write("stdout", "x" * 500)
    out.write("stderr", "never kept")
    out.close()
    lines = read_task_output("t-0000aaaa")
    assert lines is not None
    assert [(x.source, len(x.text)) for x in lines[:2]] == [("cmd", 8), ("stdout", 92)]
    assert lines[-1].source == "aiva" and "not kept" in lines[-1].text
    assert stat.S_IMODE(os.stat(output_path("t-0000aaaa")).st_mode) == 0o600


def test_no_file_is_none() -> None:
    assert read_task_output("t-0000bbbb") is None


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep\n")
    path = output_path("t-0000cccc")
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    out = TaskOutput("t-0000cccc")
    with pytest.raises(OSError):
        out.write("stdout", "x")
    assert target.read_text() == "keep\n"
