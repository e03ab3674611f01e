"""Limits a host cannot honour are errors, defaults are cut to the host, and settings that
give something away are named (aiva.engine.spec_rules), wherever a spec is made or changed."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiva.config import Config, Profile
from aiva.engine import Engine, spec_rules
from aiva.errors import InvalidValue
from aiva.models import MountSpec, PortSpec, SandboxInfo, SandboxSpec

HOST = spec_rules.host_cpus()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("AIVA_HOME", str(tmp_path / "home"))
    eng = Engine(Config())
    yield eng
    eng.close()


@pytest.mark.parametrize("cpus", [0, -1, math.nan, math.inf, HOST + 1, 999])
def test_cpus_outside_the_host_are_errors(cpus: float) -> None:
    with pytest.raises(InvalidValue):
        spec_rules.check_cpus(cpus)


def test_sizes_below_the_minimum_are_errors() -> None:
    assert spec_rules.check_cpus(HOST) == HOST
    for size in (0, 1, (16 << 20) - 1):
        with pytest.raises(InvalidValue, match="below the minimum of 16MB"):
            spec_rules.check_memory(size)
    assert spec_rules.check_memory(16 << 20) == 16 << 20
    with pytest.raises(InvalidValue, match="disk 1KB is below the minimum of 64MB"):
        spec_rules.check_disk(1024)
    assert spec_rules.check_disk(64 << 20) == 64 << 20


@pytest.mark.parametrize(("kw", "text"), [
    ({"memory": "0"}, "memory 0B is below"),
    ({"memory": 0}, "memory 0B is below"),
    ({"memory": "1MB"}, "memory 1MB is below"),
    ({"disk": "1KB"}, "disk 1KB is below"),
    ({"cpus": 999}, f"cpus 999 is more than this host has ({HOST})"),
    ({"cpus": 0}, "cpus must be a positive number"),
])
def test_explicit_values_the_host_cannot_honour(engine: Engine, kw: dict[str, Any],
                                                text: str) -> None:
    with pytest.raises(InvalidValue, match=text.replace("(", r"\(").replace(")", r"\)")):
        engine.build_spec(backend="docker", **kw)


def test_defaults_above_the_host_are_clamped(engine: Engine) -> None:
    engine.config.profiles["huge"] = Profile(cpus=HOST * 8, memory="64TB", disk="1TB")
    spec = engine.build_spec(backend="docker", profile="huge")
    assert spec.cpus == HOST
    assert 0 < spec.memory <= max(spec_rules.host_memory(), 16 << 20) < 64 << 40
    assert spec.disk == 1 << 40  # disk is a limit, not a reservation: not clamped
    engine.config.defaults.cpus = 1000.0
    assert engine.build_spec(backend="docker").cpus == HOST
    assert engine.build_spec(backend="docker", cpus=0.5).cpus == 0.5


def _add(engine: Engine, name: str) -> SandboxInfo:
    spec = SandboxSpec(image="i", cpus=1, memory=1 << 29, disk=1 << 30)
    return engine.store.add(SandboxInfo(name=name, spec=spec))


def test_config_set_checks_the_same_rules(engine: Engine) -> None:
    _add(engine, "box")
    for key, value, text in [("cpus", "999", "more than this host"),
                             ("cpus", "0", "positive"), ("cpus", "many", "a number"),
                             ("memory", "0", "below the minimum"),
                             ("memory", "1KB", "below the minimum")]:
        with pytest.raises(InvalidValue, match=text):
            engine.set_setting("box", key, value)
    assert engine.get("box").spec.cpus == 1 and engine.get("box").spec.memory == 1 << 29


class _Backend:
    name = "fake"

    def create(self, sb: SandboxInfo) -> dict[str, Any]:
        return {}


def test_create_checks_a_whole_spec_and_records_the_warnings(engine: Engine,
                                                             tmp_path: Path) -> None:
    engine._backends["fake"] = _Backend()  # type: ignore[assignment]
    bad = SandboxSpec(backend="fake", image="i", cpus=1, memory=0, disk=1 << 30)
    with pytest.raises(InvalidValue, match="memory"):
        engine.create("zero", bad)  # a whole spec from an API client: checked too
    assert not engine.exists("zero")
    ports = [PortSpec.parse("0.0.0.0:8080:80")]
    spec = SandboxSpec(backend="fake", image="i", cpus=1, memory=1 << 29, disk=1 << 30,
                       ports=ports)
    engine.create("open", spec, start=False)
    created = [e for e in engine.store.events() if e.kind == "created"]
    assert len(created) == 1
    assert created[0].data["warnings"] == spec_rules.spec_warnings(spec)
    assert "reachable from the network" in created[0].data["warnings"][0]


def _mount(host: str, ro: bool = False) -> MountSpec:
    return MountSpec(host_path=host, guest_path="/mnt/host", read_only=ro)


def _spec(**kw: Any) -> SandboxSpec:
    return SandboxSpec(image="i", cpus=1, memory=1 << 29, disk=1 << 30, **kw)


def test_warnings_say_what_is_given_away(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "state" / "home"
    home.mkdir(parents=True)
    monkeypatch.setenv("AIVA_HOME", str(home))
    plain = tmp_path / "plain"
    plain.mkdir()
    sockdir = tmp_path / "sockdir"
    sockdir.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sockdir / "docker.sock"))
    try:
        assert spec_rules.spec_warnings(_spec(
            ports=[PortSpec.parse("8080:80"), PortSpec.parse("127.0.0.1:1:2")],
            mounts=[_mount(str(plain))])) == []
        [everywhere] = spec_rules.spec_warnings(_spec(ports=[PortSpec.parse("0.0.0.0:1:2")]))
        assert "every address of this host" in everywhere and "network" in everywhere
        [v6] = spec_rules.spec_warnings(_spec(ports=[PortSpec.parse("[::]:1:2")]))
        assert "reachable from the network" in v6
        [root] = spec_rules.spec_warnings(_spec(mounts=[_mount("/", ro=True)]))
        assert "--mount /" in root and "whole filesystem" in root and "read" in root
        [docker] = spec_rules.spec_warnings(_spec(mounts=[_mount(str(sockdir), ro=True)]))
        assert "Docker socket" in docker and "root on this host" in docker
        for given in (home, home.parent, home / "logs"):
            given.mkdir(exist_ok=True)
            [state] = spec_rules.spec_warnings(_spec(mounts=[_mount(str(given))]))
            assert "aiva's own state" in state
    finally:
        sock.close()
    if Path("/run/docker.sock").is_socket():
        [run] = spec_rules.spec_warnings(_spec(mounts=[_mount("/run")]))
        assert "Docker socket (/run/docker.sock)" in run


def test_a_template_name_is_stored_as_its_image() -> None:
    """`--template python`, `--image python` and the default all show as one image."""
    from aiva.engine import Engine

    eng = Engine()
    try:
        by_template = eng.build_spec(template="python", backend="docker")
        by_image = eng.build_spec(image="python", backend="docker")
        default = eng.build_spec(backend="docker")
        assert by_template.image == by_image.image == default.image == "aiva/python:latest"
        assert by_template.template == by_image.template == "python"
        assert eng.build_spec(image="busybox:1", backend="docker").image == "busybox:1"
    finally:
        eng.close()


def test_status_says_when_no_cpu_limit_is_enforced() -> None:
    import os

    from aiva.cli.output import cpus_text

    host = os.cpu_count() or 1
    assert cpus_text(host) == cpus_text(host + 2) == f"all {host} (no limit)"
    assert cpus_text(0.5) == "0.5"
