"""Deployed services: one long-running program per sandbox (``aiva deploy``).

The program is part of the spec (``SandboxSpec.service``). The engine starts it after
every boot as a background command whose output goes to the sandbox's command log, and
keeps its pid in ``runtime["service_pid"]``. The daemon's lifetimes loop calls
:func:`check` on each pass: when the program has exited, the sandbox's restart policy
(``no``, ``on-failure[:N]``, ``always``) decides whether it is started again, and the
event stream says what happened (``service_exited``, ``service_started``, ``error``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiva.agent_client import ProcessHandle
from aiva.engine.lifetimes import restart_due
from aiva.errors import AivaError
from aiva.models import SandboxInfo, State

if TYPE_CHECKING:
    from aiva.engine import Engine


def start(engine: Engine, sb: SandboxInfo, *, fresh: bool = False) -> int:
    """Start the sandbox's service now; returns its pid. ``fresh`` (a boot, a deploy)
    starts the restart count over."""
    svc = sb.spec.service
    assert svc is not None
    if fresh:
        engine.store.update(sb.name, runtime={"service_restarts": 0, "service_gave_up": False})
    proc = engine.exec(sb.name, list(svc.command), cwd=svc.cwd, env=svc.env or None,
                       background=True, keep_output=False)
    assert isinstance(proc, ProcessHandle)
    engine.store.update(sb.name, runtime={"service_pid": proc.pid, "service_exit": None})
    engine.record(sb.name, "service_started", pid=proc.pid, command=svc.command)
    return proc.pid


def stop(engine: Engine, sb: SandboxInfo, signal: int = 15) -> None:
    """Signal the running service (a redeploy); the next :func:`check` sees it gone."""
    pid = sb.runtime.get("service_pid")
    if pid is not None and _exit_code(engine, sb.name, int(pid)) is None:
        engine.agent(sb.name).signal(int(pid), signal)


def _exit_code(engine: Engine, name: str, pid: int) -> int | str | None:
    """The exit code, None while it runs, or "unknown" if the agent no longer knows it
    (the sandbox was restarted outside aiva: treat it as gone)."""
    for p in engine.agent(name).processes():
        if p["pid"] == pid:
            code: int | None = p["exit_code"]
            return code
    return "unknown"


def check(engine: Engine, sb: SandboxInfo) -> dict[str, Any] | None:
    """One look at a running sandbox's service: restart it if it ended and the policy says
    so. Returns what was done, for the lifetimes loop's report."""
    if sb.spec.service is None or sb.state != State.RUNNING:
        return None
    pid = sb.runtime.get("service_pid")
    if pid is None or sb.runtime.get("service_gave_up"):
        return None
    try:
        code = _exit_code(engine, sb.name, int(pid))
    except AivaError:
        return None  # the agent is busy or restarting: look again next pass
    if code is None:
        return None
    exit_code = 1 if code == "unknown" else int(code)
    restarts = int(sb.runtime.get("service_restarts", 0))
    if sb.runtime.get("service_exit") is None:
        engine.store.update(sb.name, runtime={"service_exit": exit_code})
        engine.record(sb.name, "service_exited", pid=int(pid), exit_code=exit_code)
    if not restart_due(sb, exit_code, restarts):
        if exit_code != 0 and sb.spec.restart != "no":
            engine.store.update(sb.name, runtime={"service_gave_up": True})
            engine.record(sb.name, "error", action="service_restart", restarts=restarts,
                          message=f"restart policy {sb.spec.restart} gave up on the service "
                                  f"after {restarts} restarts (exit code {exit_code})")
            return {"sandbox": sb.name, "event": "error", "action": "service_gave_up"}
        return None
    engine.store.update(sb.name, runtime={"service_restarts": restarts + 1})
    new_pid = start(engine, engine.get(sb.name))
    return {"sandbox": sb.name, "event": "service_started", "pid": new_pid,
            "restarts": restarts + 1}
