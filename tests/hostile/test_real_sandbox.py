"""The attack as it happens: code in a real Docker sandbox replaces the agent's socket with
the hostile agent's, and the user runs the CLI (a separate process, a fresh connection).

The hostile agent is copied in through the run dir and started by the real agent; its
script lives in the run dir too, so the test changes it from the host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import (
    AGENT,
    CALL_TIMEOUT,
    LIMIT,
    MEMORY_BOUND,
    Area,
    Ran,
    biggest_file,
    bounded,
    ha,
    leftovers,
    run_cli,
)

from aiva import paths
from aiva.agent_client import AgentClient, connect_unix
from aiva.errors import AivaError
from aiva.paths import aiva_home

pytestmark = [pytest.mark.docker]

IN_SANDBOX_RUN = "/.aiva/run"  # where the run dir is inside the container
CLI_RSS_BOUND = (150 << 20) + MEMORY_BOUND  # the CLI's own ~100 MiB plus the flood bound


@dataclass
class Shadowed:
    """A running sandbox whose agent.sock now leads to the hostile agent."""

    name: str
    sb: Any
    run: Path

    def play(self, script: dict[str, Any]) -> None:
        tmp = self.run / "hostile.json.tmp"
        tmp.write_text(json.dumps(script))
        tmp.replace(self.run / "hostile.json")


def cli(args: list[str], **kw: Any) -> Ran:
    """The CLI, which must have taken the contract's `limits:` section."""
    ran = run_cli(args, **kw)
    assert "limits: unknown key" not in ran.stderr, (
        "this aiva's config has no `limits:` section (the call_timeout knob): "
        + ran.stderr.strip())
    return ran


@pytest.fixture(scope="module")
def short_deadlines() -> Iterator[None]:
    """`limits: {call_timeout: 2}` for the CLI processes of this module, then put back."""
    cfg = aiva_home() / "config.yaml"
    old = cfg.read_text() if cfg.exists() else None
    cfg.write_text((old or "") + f"limits:\n  call_timeout: {CALL_TIMEOUT:g}\n")
    yield
    if old is None:
        cfg.unlink()
    else:
        cfg.write_text(old)


def _ask(sock: Path) -> str | None:
    """Who answers at ``sock`` now: the agent's version string, or None."""
    try:
        client = AgentClient(connect_unix(str(sock), timeout=1), label="probe")
    except AivaError:
        return None
    try:
        return str(client.ping(timeout=3).get("version"))
    except AivaError:
        return None
    finally:
        client.close()


@pytest.fixture
def shadowed(make_sandbox: Any, engine: Any, short_deadlines: None) -> Iterator[Shadowed]:
    sb = make_sandbox(memory="256MB")
    run = paths.run_dir(sb.id)
    box = Shadowed(sb.name, sb, run)
    box.play(ha.script())
    (run / "hostile_agent.py").write_bytes(AGENT.read_bytes())
    handle = engine.exec(sb.name, [
        "python3", f"{IN_SANDBOX_RUN}/hostile_agent.py",
        "--listen", f"{IN_SANDBOX_RUN}/agent.sock",
        "--script-file", f"{IN_SANDBOX_RUN}/hostile.json"], background=True)
    deadline = time.monotonic() + 30
    while _ask(run / "agent.sock") != ha.HOSTILE_VERSION:
        if handle.done:
            res = handle.wait(1)
            if "ermission" in res.stderr or "ead-only" in res.stderr:
                pytest.skip(f"protected: the sandbox cannot replace its agent socket "
                            f"({res.stderr.strip()[-200:]})")
            pytest.fail(f"the hostile agent did not start: {res.stderr[-2000:]}")
        assert time.monotonic() < deadline, "the hostile agent never took over agent.sock"
        time.sleep(0.1)
    yield box


@pytest.mark.parametrize("names", ["relative", "absolute"])
@pytest.mark.parametrize("how", ["data pull", "cp"])
def test_cli_pull_of_escaping_setuid_names_stays_inside(shadowed: Shadowed, tmp_path: Path,
                                                       how: str, names: str) -> None:
    """The issue's first finding: a root-owned -rwsrwsrwx file outside the destination
    (`../../…` names), and a RecursionError (absolute names)."""
    area = Area.make(tmp_path / "area")
    walk = area.escapes() if names == "relative" else area.absolutes()
    shadowed.play(ha.script({"fs.walk": ha.walk_reply(walk, mode=0o6777),
                             "fs.read": ha.read_reply(mode=0o6777)}))
    args = (["data", shadowed.name, "pull", "/workspace/d", str(area.dest)] if how == "data pull"
            else ["cp", f"{shadowed.name}:/workspace/d", str(area.dest)])
    ran = cli(args)
    ran.clean()
    area.check()


def test_cli_cp_of_a_setuid_file_masks_its_mode(shadowed: Shadowed, tmp_path: Path) -> None:
    area = Area.make(tmp_path / "area")
    shadowed.play(ha.script({"fs.stat": ha.stat_reply("file", size=3, mode=0o6777),
                             "fs.read": ha.read_reply(mode=0o6777)}))
    ran = cli(["cp", f"{shadowed.name}:/workspace/f", str(area.dest / "f")])
    ran.clean()
    area.check()


def test_cli_cp_of_an_endless_file_ends_bounded(shadowed: Shadowed, tmp_path: Path) -> None:
    """`ln -s /dev/zero f; aiva cp box:f .` as a hostile agent says it: size 10, forever."""
    area = Area.make(tmp_path / "area")
    shadowed.play(ha.script({"fs.stat": ha.stat_reply("file", size=10),
                             "fs.read": ha.read_reply(size=10, sent=-1)}))
    ran = cli(["cp", f"{shadowed.name}:/workspace/f", str(area.dest / "f")])
    ran.clean_failure()
    assert ran.maxrss <= CLI_RSS_BOUND, f"the CLI peaked at {ran.maxrss >> 20} MiB"
    assert biggest_file(area.dest) <= 10
    assert not leftovers(area.root)
    area.check()


def test_cli_data_pull_of_a_lying_file_ends_bounded(shadowed: Shadowed, tmp_path: Path) -> None:
    area = Area.make(tmp_path / "area")
    shadowed.play(ha.script({"fs.walk": ha.walk_reply(["f"], size=10),
                             "fs.read": ha.read_reply(size=10, sent=-1)}))
    ran = cli(["data", shadowed.name, "pull", "/workspace/d", str(area.dest)])
    ran.clean_failure()
    assert ran.maxrss <= CLI_RSS_BOUND, f"the CLI peaked at {ran.maxrss >> 20} MiB"
    assert biggest_file(area.dest) <= 10
    assert not leftovers(area.root)
    area.check()


def test_cli_exec_against_a_silent_agent_fails_in_time(shadowed: Shadowed) -> None:
    """A fake agent that never answers hung `aiva exec` forever."""
    shadowed.play(ha.script(default="hang"))
    ran = cli(["exec", shadowed.name, "--", "true"], limit=CALL_TIMEOUT + LIMIT)
    ran.clean_failure()


def test_cli_exec_with_wrong_types_fails_cleanly(shadowed: Shadowed) -> None:
    shadowed.play(ha.script({"exec": ha.exec_reply(started="pid", exit_code="0")}))
    ran = cli(["exec", shadowed.name, "--", "true"])
    ran.clean_failure()


def test_cli_exec_of_endless_output_ends_at_its_timeout(shadowed: Shadowed,
                                                        engine: Any) -> None:
    """100 MB of stdout once made a 600 MB commands.jsonl and 531 MB in the CLI."""
    shadowed.play(ha.script({"exec": [{"event": {"started": 7}}, {"stdout": -1}]}))
    ran = cli(["exec", "--timeout", "1", shadowed.name, "--", "yes"], limit=LIMIT * 2)
    ran.clean_failure()
    assert ran.maxrss <= CLI_RSS_BOUND, f"the CLI peaked at {ran.maxrss >> 20} MiB"
    log = paths.logs_dir(shadowed.sb.id) / "commands.jsonl"
    assert not log.exists() or log.stat().st_size <= 9 << 20, "commands.jsonl past its cap"


def test_sdk_sync_in_a_new_process_engine_stays_inside(shadowed: Shadowed,
                                                       tmp_path: Path) -> None:
    """A new Engine connects afresh (as any new CLI or SDK process does): Sandbox.sync
    then meets the hostile agent in-process."""
    from hostile_kit import hostile_config

    from aiva.engine import Engine
    from aiva.sdk import Sandbox

    area = Area.make(tmp_path / "area")
    shadowed.play(ha.script({"fs.walk": ha.walk_reply(area.escapes(), mode=0o6777),
                             "fs.read": ha.read_reply(mode=0o6777)}))
    eng = Engine(hostile_config())
    try:
        out = bounded(lambda: Sandbox.connect(shadowed.name, engine=eng).sync(
            area.dest, "/workspace/d", direction="pull"))
        out.ended()
    finally:
        eng.close()
    area.check()
