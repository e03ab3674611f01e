"""Lifetimes against real Docker sandboxes: timeouts, idle timeouts, extend, restart
policies and orphan reaping, all driven by explicit :func:`lifetimes.tick` calls."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from aiva.engine import lifetimes
from aiva.models import State
from aiva.paths import aiva_home

pytestmark = pytest.mark.docker


def _life(engine: Any, make_sandbox: Any, **life: Any) -> str:
    """A running sandbox given lifetime settings, as `build_spec` + `_boot` would."""
    name = make_sandbox().name
    spec = engine.get(name).spec.model_copy(update=life)
    engine.store.update(name, spec=spec, runtime=lifetimes.boot_runtime(spec))
    return str(name)


def _until(engine: Any, cond: Callable[[], bool], timeout: float = 20,
           between: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Tick until ``cond`` holds; returns everything the ticks did."""
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        done += lifetimes.tick(engine)
        if cond():
            return done
        assert time.monotonic() < deadline, f"condition not met in {timeout}s: {done}"
        if between:
            between()
        time.sleep(0.1)


def _events(engine: Any, name: str, kind: str) -> list[Any]:
    sid = engine.get(name).id
    return [e for e in engine.store.events(sandbox_id=sid) if e.kind == kind]


def _container(docker_ok: Any, engine: Any, name: str) -> Any:
    sid = engine.get(name).id
    (c,) = docker_ok.containers.list(all=True, filters={"label": f"aiva.sandbox_id={sid}"})
    return c


def test_timeout_stops_once_the_deadline_passes(engine: Any, make_sandbox: Any) -> None:
    name = _life(engine, make_sandbox, timeout=2)
    deadline = engine.get(name).runtime["deadline"]
    assert lifetimes.tick(engine) == [] and engine.get(name).state == State.RUNNING
    done = _until(engine, lambda: engine.get(name).state == State.STOPPED)
    assert time.time() >= deadline
    assert {"sandbox": name, "event": "timeout", "action": "stop", "reason": "timeout"} in done
    (ev,) = _events(engine, name, "timeout")
    assert ev.data == {"action": "stop", "reason": "timeout"}
    assert lifetimes.tick(engine) == []  # stopped on purpose: no restart, no second stop


def test_timeout_destroy_removes_the_sandbox(engine: Any, make_sandbox: Any,
                                            docker_ok: Any) -> None:
    name = _life(engine, make_sandbox, timeout=1, on_timeout="destroy")
    sid = engine.get(name).id
    _until(engine, lambda: not engine.exists(name))
    assert docker_ok.containers.list(all=True, filters={"label": f"aiva.sandbox_id={sid}"}) == []
    kinds = [e.kind for e in engine.store.events(sandbox_id=sid)]
    assert kinds[-2:] == ["timeout", "deleted"]


def test_idle_timeout_counts_from_the_last_command(engine: Any, make_sandbox: Any) -> None:
    name = _life(engine, make_sandbox, idle_timeout=3)
    engine.exec(name, "true")
    first = time.time()
    again: list[float] = []

    def keep_busy_once() -> None:  # one more command 2 s in: the count starts over
        if not again and time.time() - first > 2:
            engine.exec(name, "true")
            again.append(time.time())

    _until(engine, lambda: engine.get(name).state == State.STOPPED, between=keep_busy_once)
    (ev,) = _events(engine, name, "timeout")
    assert ev.data["reason"] == "idle"
    last_cmd = _events(engine, name, "command")[-1].ts.timestamp()
    assert again and last_cmd >= again[0] - 1
    assert ev.ts.timestamp() >= last_cmd + 3


def test_extend_pushes_the_deadline(engine: Any, make_sandbox: Any) -> None:
    name = _life(engine, make_sandbox, timeout=2)
    before = engine.get(name).runtime["deadline"]
    sb = lifetimes.extend(engine, name, 30)
    assert sb.runtime["deadline"] >= before + 30
    assert _events(engine, name, "extended")[-1].data["seconds"] == 30
    time.sleep(max(0.0, before - time.time()) + 0.2)  # the old deadline is now past
    assert lifetimes.tick(engine) == [] and engine.get(name).state == State.RUNNING
    sb = lifetimes.extend(engine, name)  # default: one more full timeout
    assert sb.runtime["deadline"] >= before + 32


def test_restart_on_failure_then_give_up(engine: Any, make_sandbox: Any,
                                         docker_ok: Any) -> None:
    name = _life(engine, make_sandbox, restart="on-failure:2")
    for attempt in (1, 2):
        _container(docker_ok, engine, name).kill(signal="SIGKILL")  # exit code 137

        def back(n: int = attempt) -> bool:
            sb = engine.get(name)
            return bool(sb.runtime.get("restarts") == n and sb.state == State.RUNNING)

        _until(engine, back)
        assert engine.exec(name, "echo up").stdout.strip() == "up"
        ev = _events(engine, name, "restarted")[-1]
        assert ev.data == {"restarts": attempt, "exit_code": 137}
    _container(docker_ok, engine, name).kill(signal="SIGKILL")
    _until(engine, lambda: any(e.data.get("action") == "restart"
                               for e in _events(engine, name, "error")))
    sb = engine.get(name)
    assert sb.state == State.ERROR and sb.runtime["restarts"] == 2
    assert lifetimes.tick(engine) == []  # gave up once, and stays given up
    assert len(_events(engine, name, "restarted")) == 2


def test_orphans_of_this_home_are_reaped_and_nothing_else(engine: Any,
                                                          docker_ok: Any) -> None:
    orphan_id, other_id = f"orphan-{uuid.uuid4()}", f"other-{uuid.uuid4()}"
    made = []
    try:
        for sid, home in ((orphan_id, str(aiva_home())), (other_id, "/not/this/home")):
            made.append(docker_ok.containers.run(
                "aiva/python:latest", ["sleep", "300"], detach=True,
                labels={"aiva.managed": "true", "aiva.home": home, "aiva.sandbox_id": sid}))
        done = lifetimes.tick(engine)
        assert {"sandbox_id": orphan_id, "event": "reaped"} in done
        assert other_id not in str(done)
        ids = {c.id for c in docker_ok.containers.list(all=True)}
        assert made[0].id not in ids and made[1].id in ids
        ev = [e for e in engine.store.events() if e.kind == "reaped"][-1]
        assert ev.data["sandbox_id"] == orphan_id and ev.data["backend"] == "docker"
    finally:
        for c in made:
            with contextlib.suppress(Exception):
                c.remove(force=True)
