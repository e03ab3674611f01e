"""``--runtime``: runc or gvisor, Docker only, never with the desktop; what the CLI, the
SDK, the daemon's API and MCP hand to ``build_spec``, and what a stored spec reads back."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from aiva.daemon.app import SpecFields
from aiva.engine import Engine
from aiva.errors import InvalidValue
from aiva.models import SandboxSpec, parse_runtime
from aiva.sdk import AsyncSandbox, Sandbox

SPEC = {"image": "aiva/python:latest", "cpus": 1, "memory": 1 << 29, "disk": 1 << 30}


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine()
    yield e
    e.close()


def test_runc_is_the_default_and_gvisor_is_kept(eng: Engine) -> None:
    assert SandboxSpec.model_validate(SPEC).runtime == "runc"
    assert eng.build_spec(backend="docker").runtime == "runc"
    spec = eng.build_spec(backend="docker", runtime="gvisor")
    assert spec.runtime == "gvisor"
    assert SandboxSpec.model_validate(spec.model_dump(mode="json")).runtime == "gvisor"
    # a spec stored before the field existed reads back as runc
    assert SandboxSpec.model_validate({**SPEC, "backend": "docker"}).runtime == "runc"


@pytest.mark.parametrize("backend", ["qemu", "firecracker"])
def test_gvisor_on_a_vm_is_refused(eng: Engine, backend: str) -> None:
    with pytest.raises(InvalidValue, match=f"for the Docker backend, not {backend}") as exc:
        eng.build_spec(backend=backend, runtime="gvisor")
    assert exc.value.hint and "own kernel" in exc.value.hint
    with pytest.raises(ValidationError, match="Docker backend"):  # a full spec, e.g. the API
        SandboxSpec.model_validate({**SPEC, "backend": backend, "runtime": "gvisor"})
    assert eng.build_spec(backend=backend, runtime="runc").runtime == "runc"


def test_gvisor_with_the_desktop_is_refused(eng: Engine) -> None:
    with pytest.raises(InvalidValue, match="desktop sandbox cannot run under gVisor"):
        eng.build_spec(backend="docker", template="desktop", runtime="gvisor")


def test_unknown_runtimes_are_one_clear_line() -> None:
    assert parse_runtime(None) is None
    assert parse_runtime("gvisor") == "gvisor"
    for bad in ("runsc", "GVISOR", "", "kata"):
        with pytest.raises(InvalidValue, match="is not a runtime") as exc:
            parse_runtime(bad)
        assert exc.value.hint == "use runc or gvisor"
    with pytest.raises(ValidationError):
        SandboxSpec.model_validate({**SPEC, "runtime": "runsc"})
    with pytest.raises(ValidationError):
        SpecFields.model_validate({"runtime": "runsc"})


def test_every_entry_point_takes_runtime() -> None:
    assert SpecFields.model_validate({"runtime": "gvisor"}).runtime == "gvisor"
    for create in (Sandbox.create, AsyncSandbox.create):
        assert "runtime" in inspect.signature(create).parameters


def test_a_missing_runtime_says_to_run_setup(eng: Engine) -> None:
    """An engine without aiva-runsc (the real check asks the engine's info)."""
    from aiva.backends.docker import DockerBackend
    from aiva.errors import BackendUnavailable
    from aiva.models import SandboxInfo

    class NoGvisor:
        def info(self) -> dict[str, object]:
            return {"Runtimes": {"runc": {"path": "runc"}, "runsc": {"path": "runsc"}}}

    backend = DockerBackend()
    backend._client = NoGvisor()
    sb = SandboxInfo(name="g", spec=eng.build_spec(backend="docker", runtime="gvisor"))
    with pytest.raises(BackendUnavailable, match="no 'aiva-runsc' runtime") as exc:
        backend.create(sb)
    assert exc.value.hint and "scripts/setup.sh" in exc.value.hint
