"""The pure lifetime decisions: timeouts, idle timeouts and Docker's restart rules."""

from __future__ import annotations

from typing import Any

import pytest

from aiva.engine import lifetimes
from aiva.errors import InvalidValue
from aiva.models import SandboxInfo, SandboxSpec, State

NOW = 1_000_000.0


def box(state: State = State.RUNNING, runtime: dict[str, Any] | None = None,
        **spec: Any) -> SandboxInfo:
    return SandboxInfo(name="b", state=state, runtime=runtime or {},
                       spec=SandboxSpec(image="i", cpus=1, memory=1, disk=1, **spec))


def test_no_lifetime_means_no_action() -> None:
    assert lifetimes.due_action(box(), NOW - 1e6, NOW) is None


def test_deadline_passed_gives_the_configured_action() -> None:
    for action in ("stop", "pause", "destroy"):
        sb = box(runtime={"deadline": NOW}, timeout=5, on_timeout=action)
        assert lifetimes.due_action(sb, None, NOW - 0.1) is None
        assert lifetimes.due_action(sb, None, NOW) == action


def test_deadline_applies_to_paused_unless_the_action_is_pause() -> None:
    assert lifetimes.due_action(box(State.PAUSED, {"deadline": NOW}, timeout=5), None,
                                NOW + 1) == "stop"
    paused = box(State.PAUSED, {"deadline": NOW}, timeout=5, on_timeout="pause")
    assert lifetimes.due_action(paused, None, NOW + 1) is None
    for state in (State.STOPPED, State.ERROR, State.CREATING):
        assert lifetimes.due_action(box(state, {"deadline": NOW}), None, NOW + 1) is None


def test_idle_counts_from_the_last_activity() -> None:
    sb = box(idle_timeout=10)
    assert lifetimes.due(sb, NOW - 9, NOW) is None
    assert lifetimes.due(sb, NOW - 10, NOW) == ("stop", "idle")
    assert lifetimes.due(sb, None, NOW) is None  # no activity known yet
    assert lifetimes.due(box(State.PAUSED, idle_timeout=10), NOW - 60, NOW) is None


def test_boot_runtime_sets_a_fresh_deadline() -> None:
    assert lifetimes.boot_runtime(box(timeout=30).spec, NOW)["deadline"] == NOW + 30
    assert lifetimes.boot_runtime(box().spec, NOW)["deadline"] is None
    assert lifetimes.boot_runtime(box().spec, NOW)["restarts"] == 0


@pytest.mark.parametrize(("policy", "code", "restarts", "want"), [
    ("no", 1, 0, False),
    ("always", 0, 0, True),
    ("always", 137, 99, True),
    ("on-failure", 0, 0, False),
    ("on-failure", 137, 50, True),
    ("on-failure", None, 0, True),  # lost, no exit code: a failure
    ("on-failure:2", 1, 1, True),
    ("on-failure:2", 1, 2, False),
    ("on-failure:2", 0, 0, False),
])
def test_restart_follows_docker(policy: str, code: int | None, restarts: int,
                                want: bool) -> None:
    assert lifetimes.restart_due(box(restart=policy), code, restarts) is want


def test_restart_policies_are_validated() -> None:
    assert lifetimes.parse_restart("on-failure:3") == ("on-failure", 3)
    assert lifetimes.parse_restart("always") == ("always", None)
    for bad in ("sometimes", "on-failure:0", "always:2", "on-failure:x", ""):
        with pytest.raises(InvalidValue):
            lifetimes.parse_restart(bad)
        with pytest.raises((InvalidValue, ValueError)):
            box(restart=bad)


def test_spec_and_config_carry_the_lifetime_fields() -> None:
    from aiva.config import Defaults

    d = Defaults(timeout=60, idle_timeout=30, on_timeout="destroy", restart="on-failure:1")
    assert (d.timeout, d.on_timeout, d.restart) == (60, "destroy", "on-failure:1")
    with pytest.raises((InvalidValue, ValueError)):
        Defaults(restart="never")
    with pytest.raises(ValueError):
        box(on_timeout="explode")


def test_orphan_vm_dirs_are_killed_by_pid_only_if_theirs() -> None:
    """A VM dir whose sandbox is gone: its supervisor (whose command line names the dir)
    dies and the dir goes; a pid file naming someone else's process kills nothing."""
    import subprocess
    import sys
    import uuid

    from aiva.paths import aiva_home

    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, Any]]] = []

        def _record(self, kind: str, sb: Any = None, **data: Any) -> None:
            self.events.append((kind, data))

    keep, orphan = aiva_home() / "vms" / "known-id", aiva_home() / "vms" / str(uuid.uuid4())
    keep.mkdir(parents=True)
    orphan.mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen([*sleeper, str(orphan)])
    stranger = subprocess.Popen(sleeper)
    try:
        (orphan / "supervisor.pid").write_text(str(ours.pid))
        (orphan / "qemu.pid").write_text(str(stranger.pid))
        rec = Recorder()
        assert lifetimes.reap_vm_dirs(rec, lambda: {"known-id"}) == [orphan.name]  # type: ignore[arg-type]
        ours.wait(timeout=5)  # gone (reaped by the reaper: its exit code is lost)
        assert stranger.poll() is None
        assert not orphan.exists() and keep.exists()
        assert rec.events == [("reaped", {"sandbox_id": orphan.name, "backend": "vm",
                                          "vm_dir": str(orphan)})]
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()
        keep.rmdir()


def test_run_lifetimes_ticks_and_stops_at_once() -> None:
    """The daemon loop: a tick per interval on a thread, ended by the stop event; a
    backend that cannot answer (no Docker, say) costs a log line, not the loop."""
    import asyncio

    ticks: list[int] = []

    class Store:
        def all(self) -> list[SandboxInfo]:
            ticks.append(1)
            return []

    class Engine:
        store = Store()

        def backend(self, name: str) -> Any:
            raise RuntimeError("no docker here")

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(lifetimes.run_lifetimes(Engine(), 0.05, stop))  # type: ignore[arg-type]
        while len(ticks) < 3:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
