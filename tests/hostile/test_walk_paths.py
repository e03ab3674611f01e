"""Names from the agent's fs.walk never place a file outside the destination, whatever
host-side way pulls them: Engine, SDK, MCP, daemon. Fake agent, real host filesystem."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from hostile_kit import Area, bounded, ha, leftovers
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from surfaces import PULLS

OPS = list(PULLS)


@pytest.mark.parametrize("op", OPS)
def test_escaping_names_with_setuid_modes_stay_inside(hostile: Any, op: str) -> None:
    """The issue's attack: `../../…/evil` with mode 0o6777."""
    area = Area.make(hostile.tmp / "area")
    hostile.play(ha.script({"fs.walk": ha.walk_reply(area.escapes(), mode=0o6777),
                            "fs.read": ha.read_reply(mode=0o6777)}))
    out = bounded(lambda: PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    out.ended()
    area.check()


@pytest.mark.parametrize("op", OPS)
def test_absolute_names_stay_inside(hostile: Any, op: str) -> None:
    """Absolute names in a walk: refused or kept inside, never a RecursionError."""
    area = Area.make(hostile.tmp / "area")
    hostile.play(ha.script({"fs.walk": ha.walk_reply(area.absolutes(), mode=0o6777),
                            "fs.read": ha.read_reply(mode=0o6777)}))
    out = bounded(lambda: PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    out.ended()
    area.check()


ODD_NAMES = {
    "dotdot-inside": "a/../../b",
    "nul": "ok\x00/../../evil",
    "dot": ".",
    "dotdot": "..",
    "empty": "",
    "trailing-slash": "x/",
    "double-slash": "a//b",
    "backslashes": "..\\..\\evil",
    "long-component": "n" * 5000,
    "long-path": "/".join(["p" * 200] * 30),
    "deep": "d/" * 300 + "f",
}


@pytest.mark.parametrize("kind", ODD_NAMES)
def test_odd_names_end_cleanly(hostile: Any, kind: str) -> None:
    """NUL bytes, '..' in the middle, empty and over-long names, deep nesting: either a
    file inside the destination or an AivaError, never a traceback or a file outside."""
    area = Area.make(hostile.tmp / "area")
    hostile.play(ha.script({"fs.walk": ha.walk_reply([ODD_NAMES[kind], "fine.txt"])}))
    out = bounded(lambda: PULLS["engine.sync(pull)"](hostile, area.dest),
                  on_overrun=hostile.kill)
    out.ended()
    area.check()
    assert not leftovers(area.dest)


@pytest.mark.parametrize("op", [op for op in OPS if op != "engine.sync(pull)"])
def test_all_odd_names_at_once_end_cleanly(hostile: Any, op: str) -> None:
    area = Area.make(hostile.tmp / "area")
    hostile.play(ha.script({"fs.walk": ha.walk_reply([*ODD_NAMES.values(), "fine.txt"])}))
    out = bounded(lambda: PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    out.ended()
    area.check()
    assert not leftovers(area.dest)


@pytest.mark.parametrize("op", ["engine.sync(pull)", "engine.copy_out(dir)"])
def test_dirs_list_with_escapes_makes_no_directory_outside(hostile: Any, op: str) -> None:
    area = Area.make(hostile.tmp / "area")
    up = os.path.relpath(area.canary, area.dest)
    hostile.play(ha.script({"fs.walk": ha.walk_reply(
        [], dirs=[f"{up}/made", str(area.canary / "made_abs"), "../../../../x"])}))
    out = bounded(lambda: PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    out.ended()
    area.check()


# ---------------------------------------------------------------------- Hypothesis

SEGMENTS = st.sampled_from(["..", ".", "", "a", "b", "evil", "{UP}", "\x00", "..\x00",
                            "x" * 300, " ", "...", "\\..", "\n"])


@st.composite
def walk_names(draw: Any) -> str:
    """A walk name built from dangerous pieces; {UP} is the way from dest to the canary,
    {ABS} the canary's absolute path."""
    parts = draw(st.lists(SEGMENTS, min_size=1, max_size=6))
    name = "/".join(parts)
    if draw(st.booleans()):
        name = "{ABS}/" + name
    return name


def _fill(name: str, area: Area) -> str:
    return name.replace("{UP}", os.path.relpath(area.canary, area.dest)).replace(
        "{ABS}", str(area.canary))


_counter = itertools.count()


@settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(walk_names(), min_size=1, max_size=4),
       mode=st.sampled_from([0o644, 0o4755, 0o6777, 0o7777, 0o1777]),
       op=st.sampled_from(["engine.sync(pull)", "engine.sync(both)", "engine.copy_out(dir)"]))
def test_generated_walk_names_stay_inside(hostile: Any, names: list[str], mode: int,
                                          op: str) -> None:
    area = Area.make(hostile.tmp / f"h{next(_counter)}")
    hostile.play(ha.script({"fs.walk": ha.walk_reply([_fill(n, area) for n in names],
                                                     mode=mode),
                            "fs.read": ha.read_reply(mode=mode)}))
    out = bounded(lambda: PULLS[op](hostile, area.dest), on_overrun=hostile.kill)
    out.ended()
    area.check()


# ---------------------------------------------------------------------- malformed batches

BAD_BATCHES = {
    "entry a string": {"files": {"a": "xyz"}},
    "entry too short": {"files": {"a": [1]}},
    "entry too long": {"files": {"a": [1, 2, 3, 4]}},
    "entry of strings": {"files": {"a": ["1", "2", "3"]}},
    "negative size": {"files": {"a": [-1, 1, 0o644]}},
    "files a list": {"files": ["a", "b"]},
    "dirs an object": {"files": {}, "dirs": {"a": 1}},
    "dirs of numbers": {"files": {}, "dirs": [1, 2]},
}


@pytest.mark.parametrize("direction", ["pull", "push", "both"])
@pytest.mark.parametrize("batch", BAD_BATCHES)
def test_malformed_walk_batches_are_aiva_errors(hostile: Any, batch: str,
                                                direction: str) -> None:
    area = Area.make(hostile.tmp / "area")
    hostile.play(ha.script({"fs.walk": [{"event": BAD_BATCHES[batch]},
                                        {"result": {"count": 1}}]}))
    out = bounded(lambda: hostile.engine.sync(hostile.name, area.dest, "/workspace/d",
                                              direction=direction),
                  on_overrun=hostile.kill)
    out.ended(must_fail=True)
    area.check()
