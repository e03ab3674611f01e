"""Plugins: every hook documented, hooks reach plugins, a failing plugin is contained,
the built-in event log, and plugins installed through entry points."""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiva.agent
from aiva.agent_client import ExecResult, ProcessTransport, Transport
from aiva.backends.base import Backend, LogLine, Observed
from aiva.config import Config
from aiva.engine import Engine
from aiva.engine.store import Store
from aiva.models import Event, SandboxInfo, SandboxSpec, State
from aiva.plugins import call_hook, get_plugin_manager, hookimpl, list_plugins
from aiva.plugins import manager as plugins
from aiva.plugins.builtin import events_path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "tests" / "data" / "example_plugin"
HOOKS = ("on_vm_create", "on_vm_start", "on_vm_stop", "on_vm_delete", "on_command",
         "on_event")


@pytest.fixture(autouse=True)
def fresh_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A new plugin manager and AIVA_HOME per test, and none left for the next tests."""
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()


def _sandbox(name: str = "box") -> SandboxInfo:
    return SandboxInfo(name=name, spec=SandboxSpec(image="img", cpus=1, memory=1, disk=1))


def _specs() -> dict[str, Any]:
    return {n: f for n, f in vars(plugins.AivaSpecs).items()
            if hasattr(f, f"{plugins.PROJECT}_spec")}


def _hook_args(name: str, sb: SandboxInfo) -> dict[str, Any]:
    if name == "on_command":
        return {"sandbox": sb, "argv": ["true"], "exit_code": 0, "duration": 0.25}
    if name == "on_event":
        return {"event": Event(id=1, kind="created", sandbox_id=sb.id, sandbox=sb.name)}
    return {"sandbox": sb}


class Recorder:
    """A plugin implementing every hook with exactly the spec's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def on_vm_create(self, sandbox: SandboxInfo) -> None:
        self.calls.append(("on_vm_create", {"sandbox": sandbox}))

    @hookimpl
    def on_vm_start(self, sandbox: SandboxInfo) -> None:
        self.calls.append(("on_vm_start", {"sandbox": sandbox}))

    @hookimpl
    def on_vm_stop(self, sandbox: SandboxInfo) -> None:
        self.calls.append(("on_vm_stop", {"sandbox": sandbox}))

    @hookimpl
    def on_vm_delete(self, sandbox: SandboxInfo) -> None:
        self.calls.append(("on_vm_delete", {"sandbox": sandbox}))

    @hookimpl
    def on_command(self, sandbox: SandboxInfo, argv: list[str], exit_code: int,
                   duration: float) -> None:
        self.calls.append(("on_command", {"sandbox": sandbox, "argv": argv,
                                          "exit_code": exit_code, "duration": duration}))

    @hookimpl
    def on_event(self, event: Event) -> None:
        self.calls.append(("on_event", {"event": event}))


def test_the_specs_are_the_documented_hooks() -> None:
    assert set(_specs()) == set(HOOKS)
    pm = get_plugin_manager()
    for name in HOOKS:
        assert getattr(pm.hook, name).spec is not None


def test_every_hook_is_documented_with_its_arguments_and_has_a_docstring() -> None:
    text = (ROOT / "docs" / "PLUGINS.md").read_text()
    documented = {m[1]: m[2] for m in re.finditer(r"^### `(\w+)\((.*)\)`\s*$", text, re.M)}
    assert set(documented) == set(HOOKS), "docs/PLUGINS.md and AivaSpecs disagree"
    for name, spec in _specs().items():
        assert (spec.__doc__ or "").strip(), f"{name} has no docstring"
        params = {p.name: p.annotation
                  for p in inspect.signature(spec).parameters.values() if p.name != "self"}
        args = dict(re.findall(r"(\w+): ((?:[^,\[]|\[[^\]]*\])+)", documented[name]))
        assert args == params, f"{name}: the docs say {args}, the spec says {params}"
        # the section under the heading says when it fires
        section = text.split(f"### `{name}(", 1)[1].split("\n###", 1)[0]
        assert "Fires" in section, f"{name}: the docs do not say when it fires"


def test_a_runtime_plugin_receives_every_hook_with_its_arguments() -> None:
    rec = Recorder()
    get_plugin_manager().register(rec, name="recorder")
    sb = _sandbox()
    sent = [(name, _hook_args(name, sb)) for name in HOOKS]
    for name, args in sent:
        assert call_hook(name, **args) == []
    assert rec.calls == sent
    assert all(a["sandbox"] is sb for _, a in rec.calls if "sandbox" in a)


def test_a_plugin_may_take_a_subset_of_the_arguments() -> None:
    got: list[int] = []

    class ExitCodes:
        @hookimpl
        def on_command(self, exit_code: int) -> int:
            got.append(exit_code)
            return exit_code * 2

    get_plugin_manager().register(ExitCodes(), name="codes")
    args = _hook_args("on_command", _sandbox()) | {"exit_code": 3}
    assert call_hook("on_command", **args) == [6]
    assert got == [3]


def test_a_raising_plugin_is_logged_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    before, after = Recorder(), Recorder()

    class Boom:
        @hookimpl
        def on_event(self, event: Event) -> None:
            raise RuntimeError("plugin bug")

    pm = get_plugin_manager()
    pm.register(before, name="before")
    pm.register(Boom(), name="boom")  # registered later, so called earlier than "before"
    pm.register(after, name="after")
    args = _hook_args("on_event", _sandbox())
    with caplog.at_level(logging.ERROR, logger="aiva.plugins"):
        call_hook("on_event", **args)
    assert before.calls == after.calls == [("on_event", args)]
    [rec] = [r for r in caplog.records if r.name == "aiva.plugins"]
    assert "boom" in rec.getMessage() and "on_event" in rec.getMessage()
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], RuntimeError)


def test_call_hook_refuses_an_unknown_hook_or_missing_arguments() -> None:
    with pytest.raises(ValueError, match="on_nothing"):
        call_hook("on_nothing")
    with pytest.raises(TypeError, match="exit_code, duration"):
        call_hook("on_command", sandbox=_sandbox(), argv=["x"])


def test_the_builtin_event_log_writes_jsonl_that_parses_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    sb = _sandbox()
    events = [store.record("created", sb, image="img", backend="docker"),
              store.record("command", sb, cmd=["echo", "hi"], exit_code=0, duration=0.01),
              store.record("reaped", None, sandbox_id="gone")]
    store.close()
    for ev in events:
        call_hook("on_event", event=ev)
    assert events_path() == tmp_path / "events.jsonl"
    lines = events_path().read_text().splitlines()
    assert [Event.model_validate_json(line) for line in lines] == events
    assert events_path().stat().st_mode & 0o077 == 0  # commands may hold secrets


def test_the_builtin_lifecycle_log(caplog: pytest.LogCaptureFixture) -> None:
    sb = _sandbox("web")
    with caplog.at_level(logging.DEBUG, logger="aiva"):
        for name in HOOKS:
            call_hook(name, **_hook_args(name, sb))
    msgs = [r.getMessage() for r in caplog.records if r.name == "aiva"]
    for word in ("created", "started", "stopped", "deleted", "exited 0"):
        assert any("web" in m and word in m for m in msgs), (word, msgs)


def test_list_plugins_shows_the_builtins_and_their_hooks() -> None:
    found = {p["name"]: p for p in list_plugins()}
    assert found["aiva.eventlog"] == {"name": "aiva.eventlog", "hooks": ["on_event"],
                                      "version": None, "distribution": None, "builtin": True}
    assert found["aiva.lifecycle_log"]["hooks"] == sorted(
        ["on_vm_create", "on_vm_start", "on_vm_stop", "on_vm_delete", "on_command"])


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))  # importlib.metadata finds the .dist-info
    monkeypatch.delitem(sys.modules, "aiva_example_plugin", raising=False)
    monkeypatch.delitem(sys.modules, "aiva_example_typo", raising=False)
    with caplog.at_level(logging.WARNING, logger="aiva.plugins"):
        pm = get_plugin_manager()
    example = importlib.import_module("aiva_example_plugin")
    assert pm.get_plugin("example") is example
    assert pm.get_plugin("broken") is None
    logged = [r.getMessage() for r in caplog.records if r.name == "aiva.plugins"]
    assert any("'broken'" in m for m in logged), logged
    assert any("on_vm_strat" in m for m in logged), logged  # a misspelt hook is reported

    ev = Event(id=7, kind="started")
    call_hook("on_event", event=ev)
    assert example.seen == [ev]
    found = {p["name"]: p for p in list_plugins()}
    assert found["example"] == {"name": "example", "hooks": ["on_event"], "version": "0.1",
                                "distribution": "aiva-example-plugin", "builtin": False}


def test_without_the_example_on_sys_path_no_entry_point_plugin_loads() -> None:
    names = {p["name"] for p in list_plugins()}
    assert {"aiva.eventlog", "aiva.lifecycle_log"} <= names
    assert "example" not in names


class FakeBackend(Backend):
    """Lifecycle in memory; the agent is a real local process over stdio."""

    name = "fake"

    def __init__(self) -> None:
        self.states: dict[str, State] = {}

    def check(self) -> None:
        pass

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        self.states[sb.id] = State.STOPPED
        return {}

    def start(self, sb: SandboxInfo) -> dict[str, Any]:
        self.states[sb.id] = State.RUNNING
        return {}

    def stop(self, sb: SandboxInfo, *, force: bool = False, timeout: float = 10.0) -> None:
        self.states[sb.id] = State.STOPPED

    def pause(self, sb: SandboxInfo) -> None:
        self.states[sb.id] = State.PAUSED

    def resume(self, sb: SandboxInfo) -> None:
        self.states[sb.id] = State.RUNNING

    def delete(self, sb: SandboxInfo, *, volumes: bool = False) -> None:
        self.states.pop(sb.id, None)

    def observe(self, sb: SandboxInfo) -> Observed:
        return Observed(self.states.get(sb.id))

    def connect_agent(self, sb: SandboxInfo, *, timeout: float = 10.0) -> Transport:
        agent = Path(aiva.agent.__file__).parent
        proc = subprocess.Popen([sys.executable, str(agent), "--stdio"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return ProcessTransport(proc)

    def engine_logs(self, sb: SandboxInfo, *, tail: int | None = None,
                    follow: bool = False) -> Iterator[LogLine]:
        return iter(())


@pytest.mark.skipif(not hasattr(Engine, "_record"), reason="engine.py is not wired yet")
def test_the_engine_calls_every_hook(tmp_path: Path) -> None:
    class Boom:
        @hookimpl
        def on_event(self, event: Event) -> None:
            raise RuntimeError("plugin bug")

        @hookimpl
        def on_command(self) -> None:
            raise RuntimeError("plugin bug")

    rec = Recorder()
    get_plugin_manager().register(rec, name="recorder")
    get_plugin_manager().register(Boom(), name="boom")  # the engine does not notice
    engine = Engine(Config())
    engine._backends["fake"] = FakeBackend()
    spec = SandboxSpec(backend="fake", image="img", cpus=1, memory=1 << 29, disk=1 << 30,
                       workdir=str(tmp_path))
    try:
        engine.create("box", spec)
        result = engine.exec("box", ["sh", "-c", "exit 3"])
        engine.stop("box")
        engine.delete("box")
    finally:
        engine.close()
    assert isinstance(result, ExecResult) and result.exit_code == 3
    calls = [(name, args) for name, args in rec.calls if name != "on_event"]
    assert [name for name, _ in calls] == ["on_vm_create", "on_vm_start", "on_command",
                                           "on_vm_stop", "on_vm_delete"]
    assert [a["sandbox"].state for _, a in calls] == [
        State.CREATING, State.RUNNING, State.RUNNING, State.STOPPED, State.STOPPED]
    _, cmd = calls[2]
    assert cmd["argv"] == ["sh", "-c", "exit 3"] and cmd["exit_code"] == 3
    assert cmd["duration"] > 0
    # every stored event reached on_event, and the built-in log, in order
    events = [a["event"] for name, a in rec.calls if name == "on_event"]
    assert [e.kind for e in events] == ["created", "started", "command", "stopped", "deleted"]
    logged = [Event.model_validate_json(x) for x in events_path().read_text().splitlines()]
    assert logged == events
