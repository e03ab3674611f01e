"""Fixtures of the hostile-guest suite: an engine wired to the fake agent (fast), and a
real Docker sandbox whose agent socket the fake agent has taken over (real)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile_kit import (
    FakeAgents,
    HostileBackend,
    fresh_connection,
    ha,
    hostile_config,
    set_call_timeout,
)

from aiva.engine import Engine


@dataclass
class Hostile:
    """One fake sandbox: an Engine whose 'docker' backend connects to the fake agent."""

    engine: Engine
    name: str
    agents: FakeAgents
    tmp: Path

    def play(self, script: dict[str, Any]) -> None:
        """Answer with ``script`` from the next connection on (the old one is dropped)."""
        self.agents.play(script)
        fresh_connection(self.engine, self.name)

    def kill(self) -> None:
        self.agents.kill_all()


@pytest.fixture(scope="session")
def fake_agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeAgents]:
    """The fake agent process, one per session; each test plays its own script."""
    agents = FakeAgents(tmp_path_factory.mktemp("fake-agent"))
    yield agents
    agents.stop()


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            fake_agents: FakeAgents) -> Iterator[Hostile]:
    set_call_timeout(monkeypatch)
    agents = fake_agents
    agents.play(ha.script())
    engine = Engine(hostile_config())
    engine._backends["docker"] = HostileBackend(agents)
    name = f"hx-{uuid.uuid4().hex[:6]}"
    engine.create(name, engine.build_spec(backend="docker", image="aiva/python:latest"))
    box = Hostile(engine, name, agents, tmp_path)
    try:
        yield box
    finally:
        agents.kill_all()
        try:
            engine.delete(name, volumes=True)
        finally:
            engine.close()
