"""The VM controller facade of the design (seed 003 §1.1, §1.3), over :class:`Sandbox`.

Plain functions keyed by a ``vm_id`` (the sandbox name), returning plain dicts, for code
written against that design. New code should prefer ``Sandbox``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from aiva.agent_client import ExecResult
from aiva.engine import default_engine
from aiva.models import SandboxInfo


def _view(sb: SandboxInfo) -> dict[str, Any]:
    return {
        "vm_id": sb.name,
        "id": sb.id,
        "agent_id": sb.spec.labels.get("agent_id"),
        "state": sb.state.value,
        "error": sb.error,
        "image": sb.spec.image,
        "cpus": sb.spec.cpus,
        "memory": sb.spec.memory,
        "created_at": sb.created_at.isoformat(),
        "updated_at": sb.updated_at.isoformat(),
    }


def create_vm(agent_id: str, config: dict[str, Any] | None = None) -> str:
    """Create and start a sandbox for ``agent_id``; returns its vm_id.

    ``config`` takes the keys of ``Sandbox.create`` (template, image, cpus, memory, env,
    ports, profile, name).
    """
    config = dict(config or {})
    engine = default_engine()
    name = config.pop("name", None) or f"agent-{agent_id}-{uuid.uuid4().hex[:6]}"
    labels = dict(config.pop("labels", {}) or {}, agent_id=agent_id)
    spec = engine.build_spec(labels=labels, **config)
    return engine.create(name, spec, start=True).name


def start_vm(vm_id: str) -> dict[str, Any]:
    return _view(default_engine().start(vm_id))


def stop_vm(vm_id: str, force: bool = False) -> dict[str, Any]:
    return _view(default_engine().stop(vm_id, force=force))


def delete_vm(vm_id: str) -> None:
    default_engine().delete(vm_id, volumes=True)


def list_vms() -> list[dict[str, Any]]:
    return [_view(sb) for sb in default_engine().list_all()]


def get_vm_status(vm_id: str) -> dict[str, Any]:
    return _view(default_engine().status(vm_id))


def execute_in_vm(vm_id: str, command: str | list[str], timeout: float | None = 600
                  ) -> dict[str, Any]:
    res = default_engine().exec(vm_id, command, timeout=timeout)
    assert isinstance(res, ExecResult)
    return {"exit_code": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
            "duration": res.duration, "timed_out": res.timed_out}


def sync_files(vm_id: str, local_path: str | Path, remote_path: str,
               direction: str = "both") -> dict[str, Any]:
    return default_engine().sync(vm_id, local_path, remote_path, direction=direction).to_dict()


def get_logs(vm_id: str, tail: int | None = None) -> list[dict[str, Any]]:
    return [{"ts": line.ts.isoformat(), "source": line.source, "text": line.text}
            for line in default_engine().logs(vm_id, tail=tail)]
