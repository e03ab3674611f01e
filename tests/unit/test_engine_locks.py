"""Lifecycle operations hold a per-sandbox lock that background reconciles respect."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

import pytest

from aiva.engine import Engine
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
    lock = tmp_path / "run" / "locks" / "busy.lock"
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
