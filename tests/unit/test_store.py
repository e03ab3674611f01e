from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from aiva.engine.store import Store
from aiva.errors import InvalidTransition, SandboxExists, SandboxNotFound
from aiva.models import SandboxInfo, SandboxSpec, State


def _spec() -> SandboxSpec:
    return SandboxSpec(image="img", cpus=1, memory=1 << 30, disk=1 << 30)


def test_add_get_transition_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    sb = store.add(SandboxInfo(name="a", spec=_spec()))
    assert store.get("a").id == sb.id and store.get("a").state == State.CREATING
    with pytest.raises(SandboxExists):
        store.add(SandboxInfo(name="a", spec=_spec()))
    store.transition("a", State.RUNNING, runtime={"container_id": "c1"})
    assert store.get("a").runtime == {"container_id": "c1"}
    with pytest.raises(InvalidTransition):
        store.transition("a", State.CREATING)
    store.transition("a", State.ERROR, error="boom")
    assert store.get("a").error == "boom"
    store.record("started", sb, x=1)
    store.record("stopped", sb)
    kinds = [(e.kind, e.data) for e in store.events(sandbox_id=sb.id)]
    assert kinds == [("started", {"x": 1}), ("stopped", {})]
    assert [e.kind for e in store.events(limit=1)] == ["stopped"]
    store.remove(sb.id)
    with pytest.raises(SandboxNotFound):
        store.get("a")


def _race(path: str, barrier: multiprocessing.synchronize.Barrier, q: multiprocessing.Queue
          ) -> None:  # type: ignore[type-arg]
    store = Store(Path(path))
    barrier.wait()
    try:
        store.transition("r", State.PAUSED, expect={State.RUNNING}, action="pause")
        q.put("won")
    except InvalidTransition:
        q.put("lost")


def test_only_one_process_wins_a_transition(tmp_path: Path) -> None:
    """Several CLI processes racing to pause one sandbox: exactly one succeeds."""
    path = tmp_path / "s.db"
    store = Store(path)
    store.add(SandboxInfo(name="r", spec=_spec(), state=State.RUNNING))
    ctx = multiprocessing.get_context("spawn")
    n = 6
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(path), barrier, q)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = sorted(q.get(timeout=5) for _ in range(n))
    assert results == ["lost"] * (n - 1) + ["won"]
    assert store.get("r").state == State.PAUSED
