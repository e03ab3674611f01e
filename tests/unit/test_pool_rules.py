"""The warm pool's decisions, without Docker: placement, shrink/top-up/reap plans,
limits and holders; and its stored limits (resize, status) on a real state db."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from aiva.config import PoolSettings, PoolTemplate
from aiva.errors import InvalidValue
from aiva.tasks.pool import (
    Limits,
    Member,
    choose,
    holder_alive,
    holder_id,
    load_score,
    member_of,
    plan,
    resolve_limits,
    slug,
)

NOW = 1_000_000.0
ON = Limits(min_warm=2, max=6, idle_shrink=300, active=True)


def idle(name: str, since: float = NOW - 10, **kw: Any) -> Member:
    return Member(name, idle_since=since, **kw)


def busy(name: str, **kw: Any) -> Member:
    return Member(name, busy=True, **kw)


# ---------------------------------------------------------------------- placement


def test_choose_least_loaded_then_most_recently_idle() -> None:
    a, b, c = idle("a", NOW - 100), idle("b", NOW - 5), idle("c", NOW - 50)
    assert choose([], {}) is None
    assert choose([a, b, c], {}) == b  # no samples: most recently idle
    assert choose([a, b, c], {"b": 0.9, "c": 0.2, "a": 0.5}) == c
    # scores within one bucket count as equal: recency decides
    assert choose([a, b, c], {"a": 0.01, "b": 0.03, "c": 0.5}) == b


def test_load_score() -> None:
    assert load_score(None) == 0.0
    assert load_score({"cpu_percent": 50.0, "mem_used": 256, "mem_total": 1024}) == 0.75
    assert load_score({"cpu_percent": 10.0, "mem_used": 5, "mem_total": 0}) == 0.1


# ---------------------------------------------------------------------- plans


def test_plan_tops_up_to_min_within_max() -> None:
    assert plan([], 0, 0, ON, NOW).create == 2
    assert plan([idle("a")], 0, 0, ON, NOW).create == 1
    assert plan([idle("a")], 1, 1, ON, NOW).create == 0  # one on its way
    # busy ones do not count as warm: keep two idle ones ready, but never beyond max
    five_busy = [busy(f"b{i}") for i in range(5)]
    assert plan(five_busy, 0, 0, ON, NOW).create == 1
    assert plan(five_busy, 1, 0, ON, NOW).create == 0  # a claim's creation fills the room
    off = Limits(2, 6, 300, active=False)
    assert plan([], 0, 0, off, NOW).create == 0


def test_plan_shrinks_idle_beyond_min_after_idle_shrink_oldest_first() -> None:
    members = [idle("old", NOW - 1000), idle("mid", NOW - 400), idle("new", NOW - 10),
               idle("newer", NOW - 1)]
    p = plan(members, 0, 0, ON, NOW)
    assert p.shrink == ["old", "mid"] and p.create == 0
    assert plan(members[2:], 0, 0, ON, NOW).shrink == []  # not idle long enough
    three_old = [idle(n, NOW - 1000) for n in "abc"]
    assert len(plan(three_old, 0, 0, ON, NOW).shrink) == 1  # down to min, no further
    # an inactive (drained) template keeps none
    off = Limits(2, 6, 300, active=False)
    assert len(plan(three_old, 0, 0, off, NOW).shrink) == 3


def test_plan_shrinks_over_max_at_once() -> None:
    small = Limits(min_warm=1, max=2, idle_shrink=300, active=True)
    members = [idle("a", NOW - 3), idle("b", NOW - 2), idle("c", NOW - 1), busy("d")]
    p = plan(members, 0, 0, small, NOW)
    assert p.shrink == ["a", "b"] and p.create == 0


def test_plan_reaps_dead_leaked_and_half_made() -> None:
    members = [
        idle("dead", state="error"),
        busy("leaked", holder_alive=False),
        busy("kept", holder_alive=False, kept=True),
        busy("working"),
        Member("half", ready=False),  # no pending row and never marked: its maker died
        Member("warming", ready=False, warming=True),
        idle("fine"),
    ]
    p = plan(members, 1, 1, ON, NOW)
    assert sorted(p.reap) == ["dead", "half", "leaked"]
    assert p.shrink == [] and p.create == 0  # "fine" + the one warming = min


def test_member_of_runtime() -> None:
    me = holder_id()
    assert not member_of("a", "i", "creating", {}, True).ready
    m = member_of("a", "i", "running", {"pool_busy": None, "pool_idle_since": 5.0}, False)
    assert m.idle and m.idle_since == 5.0
    m = member_of("a", "i", "running", {"pool_busy": {"holder": me, "since": 1}}, False)
    assert m.busy and m.holder_alive and not m.kept and not m.idle
    m = member_of("a", "i", "running",
                  {"pool_busy": {"holder": "999999999:1", "kept": True}}, False)
    assert m.busy and not m.holder_alive and m.kept


def test_holders() -> None:
    assert holder_alive(holder_id())
    assert holder_alive(str(os.getpid()))  # no start time recorded: the pid decides
    assert not holder_alive("999999999:1")
    assert not holder_alive("garbage")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    gone = holder_id(proc.pid)
    proc.wait()
    assert not holder_alive(gone)
    pid, _, start = holder_id().partition(":")
    if start:  # a reused pid with another start time is someone else
        assert not holder_alive(f"{pid}:{int(start) + 1}")


# ---------------------------------------------------------------------- limits


def test_resolve_limits_order() -> None:
    s = PoolSettings(min_warm=2, max=6, idle_shrink=300,
                     templates={"python": PoolTemplate(max=4)})
    assert resolve_limits(s, "minimal", None) == Limits(2, 6, 300, False)
    assert resolve_limits(s, "python", None) == Limits(2, 4, 300, True)
    row = {"min_warm": 1, "max": None, "idle_shrink": 30.0, "active": 0}
    assert resolve_limits(s, "python", row) == Limits(1, 4, 30, False)
    # min never above max
    assert resolve_limits(PoolSettings(min_warm=5, max=3), "x", None).min_warm == 3


def test_slug() -> None:
    assert slug("python") == "python"
    assert slug("aiva/python:latest") == "aiva-python-latest"
    assert slug("///") == "x"


# ---------------------------------------------------------------------- stored limits


@pytest.fixture
def pool(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    from aiva.config import Config
    from aiva.engine import Engine
    from aiva.tasks.pool import WarmPool

    engine = Engine(Config())
    p = WarmPool(engine, PoolSettings(min_warm=2, max=6))
    yield p
    p.close()
    engine.close()


def test_resize_is_stored_and_checked(pool: Any) -> None:
    assert pool.status() == []
    lim = pool.resize("python", 1, 3)
    assert lim == Limits(1, 3, 300, True)
    assert pool.resize("python", idle_shrink=5).idle_shrink == 5  # the rest kept
    assert pool.limits("python") == Limits(1, 3, 5, True)
    with pytest.raises(InvalidValue, match="more than max"):
        pool.resize("python", 4, None)
    with pytest.raises(InvalidValue, match="at least 1"):
        pool.resize("python", 0, 0)
    (row,) = pool.status()
    assert row["template"] == "python" and (row["min"], row["max"], row["warm"]) == (1, 3, 0)
    # another pool object (another process, a restarted daemon) sees the same limits
    from aiva.tasks.pool import WarmPool

    other = WarmPool(pool.engine, PoolSettings())
    try:
        assert other.limits("python") == Limits(1, 3, 5, True)
    finally:
        other.close()


def test_stale_pending_rows_are_dropped(pool: Any) -> None:
    pool._db.write("INSERT INTO pool_pending VALUES (?,?,?,?,?)",
                   ("pool-python-dead", "python", "idle", "999999999:1", time.time()))
    pool._db.write("INSERT INTO pool_pending VALUES (?,?,?,?,?)",
                   ("pool-python-mine", "python", "idle", holder_id(), time.time()))
    assert [r["name"] for r in pool._pending("python")] == ["pool-python-mine"]
    assert pool.templates() == ["python"]
