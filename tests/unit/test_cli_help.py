"""Every command's ``--help`` renders: walked from the typer app itself, so a command added
later is covered without listing it here (help text is rich markup: a stray ``[/x]``
in an option's help used to crash ``aiva start --help``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from aiva.cli.main import app


def command_paths(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and group under ``cmd`` (typer ships its own click: duck-typed)."""
    yield path
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        if not getattr(sub, "hidden", False):
            yield from command_paths(sub, (*path, name))


ROOT = typer.main.get_command(app)
PATHS = list(command_paths(ROOT))


def test_the_walk_finds_the_nested_commands() -> None:
    assert ("start",) in PATHS and ("daemon", "start") in PATHS and ("mcp", "serve") in PATHS
    assert len(PATHS) > 40


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "aiva")
def test_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"aiva {' '.join(path)} --help raised {result.exception!r}")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "Usage" in result.output


def test_version() -> None:
    from aiva import __version__

    for flag in ("--version", "-V"):
        result = CliRunner().invoke(app, [flag])
        assert (result.exit_code, result.output) == (0, f"aiva {__version__}\n")


def test_port_help_says_a_lone_guest_port_takes_a_free_host_port() -> None:
    for cmd in ("start", "deploy"):
        text = " ".join(CliRunner().invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
                        .output.split())
        assert "GUEST alone takes a free host port" in text, cmd
