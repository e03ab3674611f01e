"""How `aiva exec` splits its own options (given after NAME) from the command."""

from __future__ import annotations

import pytest

from aiva.cli.main import split_exec_args
from aiva.errors import InvalidValue


def test_options_then_double_dash_then_command() -> None:
    opts, argv = split_exec_args(["--cwd", "/tmp", "-e", "A=1", "--env=B=2", "-i", "-u", "x",
                                  "--timeout", "5", "--", "ls", "--cwd"])
    assert argv == ["ls", "--cwd"]
    assert opts == {"env": ["A=1", "B=2"], "cwd": "/tmp", "interactive": True, "user": "x",
                    "timeout": "5"}


def test_the_first_plain_word_starts_the_command() -> None:
    assert split_exec_args(["python3", "-c", "print(1)"]) == ({"env": []},
                                                              ["python3", "-c", "print(1)"])
    assert split_exec_args(["--", "--weird-binary"])[1] == ["--weird-binary"]
    assert split_exec_args(["-w", "/x", "-"])[1] == ["-"]


@pytest.mark.parametrize("words", [["--cdw", "/tmp", "--", "pwd"], ["-x"], ["--cwd"]])
def test_unknown_or_incomplete_options_are_refused(words: list[str]) -> None:
    with pytest.raises(InvalidValue) as err:
        split_exec_args(words)
    assert "-- CMD ARGS" in (err.value.hint or "")
