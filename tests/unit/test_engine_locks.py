"""Lifecycle operations hold a per-sandbox lock that background reconciles respect."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from aiva import paths
from aiva.engine import Engine
from aiva.errors import InvalidValue
from aiva.models import SandboxInfo, SandboxSpec


def _sb(name: str) -> SandboxInfo:
    return SandboxInfo(name=name, spec=SandboxSpec(image="i", cpus=1, memory=1, disk=1))


def test_reconcile_skips_a_sandbox_another_process_is_changing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    engine = Engine()
    calls: list[str] = []
    monkeypatch.setattr(engine, "_reconcile", lambda sb: calls.append(sb.name) or sb)
    sb = _sb("busy")
    lock = paths.lock_path("busy")
    assert lock.parent == tmp_path / "run" / "locks"
    lock.parent.mkdir(parents=True)
    with lock.open("a") as f:  # another open file: as another process would hold it
        fcntl.flock(f, fcntl.LOCK_EX)
        assert engine.reconcile(sb) is sb
        assert calls == []
    assert engine.reconcile(sb) is sb
    assert calls == ["busy"]
    engine.close()


def test_lock_is_reentrant_in_a_thread_and_exclusive_across_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    engine = Engine()
    seen: list[bool] = []
    with engine._exclusive("a"), engine._exclusive("a") as again:
        assert again is True  # re-entrant: start() reconciles under its own lock

        def other() -> None:
            with engine._exclusive("a", wait=False) as mine:
                seen.append(mine)

        t = threading.Thread(target=other)
        t.start()
        t.join(10)
    assert seen == [False]
    with engine._exclusive("a", wait=False) as mine:
        assert mine is True
    engine.close()


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD_NAMES = ["../../../x/y", "a/b", "..", ".", "/abs", "a\0b", "", "x" * 64, "-x", "a b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_bad_name_is_refused_before_any_file_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    """`aiva rm ../../../x/y` once made x/y.lock outside AIVA_HOME; `init a/b` a dir."""
    home = tmp_path / "a" / "b" / "c" / "home"
    home.mkdir(parents=True)
    monkeypatch.setenv("AIVA_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    engine = Engine()
    before = _tree(tmp_path)
    spec = SandboxSpec(image="i", cpus=1, memory=1 << 29, disk=1 << 30)
    calls = [lambda: engine.delete(bad), lambda: engine.create(bad, spec),
             lambda: engine.stop(bad), lambda: engine.start(bad),
             lambda: engine.snapshot(bad), lambda: engine.set_setting(bad, "cpus", "1"),
             lambda: engine.fork(bad, "src", "t")]
    for call in calls:
        with pytest.raises(InvalidValue, match="not a valid sandbox name"):
            call()
    assert _tree(tmp_path) == before
    engine.close()


def test_lock_files_are_named_by_a_hash_of_the_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path))
    engine = Engine()
    with engine._exclusive("box.1"):
        pass
    locks = list((tmp_path / "run" / "locks").iterdir())
    assert locks == [paths.lock_path("box.1")]
    assert "box" not in locks[0].name and locks[0].suffix == ".lock"
    engine.close()
