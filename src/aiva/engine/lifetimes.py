"""Lifetimes and recovery: timeouts, idle timeouts, restart policies and orphan reaping.

The decisions are pure functions of a sandbox, a clock and a few facts, so they are tested
without an engine; :func:`tick` gathers the facts (one reconcile and at most a couple of
indexed event queries per sandbox) and acts through the engine, so every action goes
through the state machine and leaves an event. The daemon runs :func:`tick` every few
seconds (:func:`run_lifetimes`); nothing is added to the exec hot path: idleness is read
from the sandbox's newest activity event, which exec and sync already record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from aiva import paths
from aiva.errors import InvalidValue
from aiva.models import SandboxInfo, SandboxSpec, State
from aiva.paths import aiva_home
from aiva.periodic import Periodic, Step

if TYPE_CHECKING:
    from aiva.engine import Engine

log = logging.getLogger("aiva.lifetimes")

Action = Literal["stop", "pause", "destroy"]
#: Events that count as use of a sandbox for ``idle_timeout``; a boot starts the count.
ACTIVITY = ("command", "files_synced", "started", "resumed", "restarted", "extended")
#: Events that tell how a sandbox last stopped (a ``reconciled`` one: not by request).
LIFECYCLE = ("created", "started", "restarted", "stopped", "reconciled", "timeout", "error")
_RESTART = re.compile(r"^(no|always|on-failure(?::([1-9][0-9]*))?)$")


def parse_restart(text: str) -> tuple[str, int | None]:
    """``no | on-failure[:N] | always`` -> (mode, max attempts or None)."""
    m = _RESTART.match(text)
    if not m:
        raise InvalidValue(f"'{text}' is not a restart policy",
                           hint="use no, on-failure, on-failure:N or always")
    mode = m.group(1).split(":")[0]
    return mode, int(m.group(2)) if m.group(2) else None


def boot_runtime(spec: SandboxSpec, now: float | None = None) -> dict[str, Any]:
    """Runtime facts a boot sets: a fresh deadline (a timeout counts from start), and a
    fresh restart count (a start by hand resets it; :func:`tick` counts after booting)."""
    now = time.time() if now is None else now
    return {"deadline": now + spec.timeout if spec.timeout else None,
            "restarts": 0, "restart_gave_up": False}


# ---------------------------------------------------------------------- decisions


def due(sb: SandboxInfo, last_active: float | None, now: float) -> tuple[Action, str] | None:
    """The action a sandbox's lifetime asks for now, and why (``timeout`` or ``idle``)."""
    action: Action = sb.spec.on_timeout
    deadline = sb.runtime.get("deadline")
    live = sb.state == State.RUNNING or (sb.state == State.PAUSED and action != "pause")
    if live and deadline is not None and now >= float(deadline):
        return action, "timeout"
    if sb.state == State.RUNNING and sb.spec.idle_timeout and last_active is not None \
            and now - last_active >= sb.spec.idle_timeout:
        return action, "idle"
    return None


def due_action(sb: SandboxInfo, events_last_active: float | None, now: float) -> Action | None:
    """What to do with ``sb`` at ``now``; ``events_last_active``: its newest activity."""
    found = due(sb, events_last_active, now)
    return found[0] if found else None


def restart_due(sb: SandboxInfo, observed_exit_code: int | None, restarts: int) -> bool:
    """Docker's rules, for a sandbox that died on its own (the caller knows it did):
    ``always`` restarts any exit, ``on-failure`` a non-zero one, at most N times."""
    mode, limit = parse_restart(sb.spec.restart)
    if mode == "always":
        return True
    if mode == "on-failure":
        return observed_exit_code != 0 and (limit is None or restarts < limit)
    return False


# ---------------------------------------------------------------------- actions


def extend(engine: Engine, name: str, seconds: float | None = None) -> SandboxInfo:
    """Push the deadline back (from now if it already passed) and count as activity;
    ``seconds`` defaults to one more full timeout."""
    sb = engine.get(name)
    seconds = seconds if seconds is not None else sb.spec.timeout or sb.spec.idle_timeout
    if not seconds or seconds <= 0:
        raise InvalidValue(f"'{name}' has no timeout to extend",
                           hint=f"give the seconds: `aiva extend {name} 600`")
    deadline = sb.runtime.get("deadline")
    if deadline is not None:
        deadline = max(float(deadline), time.time()) + seconds
        sb = engine.store.update(name, runtime={"deadline": deadline})
    engine._record("extended", sb, seconds=seconds, deadline=deadline)
    return sb


def _newest(engine: Engine, sandbox_id: str, kinds: tuple[str, ...]) -> tuple[str, float] | None:
    """The newest event of these kinds: one query on the (sandbox_id, id) index."""
    ev = engine.store.newest_event(sandbox_id, kinds)
    return (ev.kind, ev.ts.timestamp()) if ev else None


def _apply_timeout(engine: Engine, sb: SandboxInfo, now: float) -> dict[str, Any] | None:
    last = _newest(engine, sb.id, ACTIVITY) if sb.spec.idle_timeout else None
    found = due(sb, last[1] if last else None, now)
    if found is None:
        return None
    action, reason = found
    engine._record("timeout", sb, action=action, reason=reason)
    if action == "stop":
        engine.stop(sb.name)
    elif action == "pause":
        engine.pause(sb.name)
    else:
        engine.delete(sb.name, volumes=True)
    return {"sandbox": sb.name, "event": "timeout", "action": action, "reason": reason}


def _apply_restart(engine: Engine, sb: SandboxInfo) -> dict[str, Any] | None:
    if sb.spec.restart == "no" or sb.state not in (State.ERROR, State.STOPPED):
        return None
    if sb.runtime.get("restart_gave_up"):
        return None
    last = _newest(engine, sb.id, LIFECYCLE)
    if sb.state == State.STOPPED and (last is None or last[0] != "reconciled"):
        return None  # stopped on request (or never started): Docker leaves those alone
    obs = engine._backend_of(sb).observe(sb)
    if obs.state is None:
        return None  # nothing left to start; the error event already says so
    restarts = int(sb.runtime.get("restarts", 0))
    if not restart_due(sb, obs.exit_code, restarts):
        if obs.exit_code != 0 and sb.spec.restart.startswith("on-failure"):
            engine.store.update(sb.name, runtime={"restart_gave_up": True})
            engine._record("error", sb, action="restart", restarts=restarts,
                           message=f"restart policy {sb.spec.restart} gave up after "
                                   f"{restarts} restarts (exit code {obs.exit_code})")
            return {"sandbox": sb.name, "event": "error", "action": "gave_up"}
        return None
    try:
        sb = engine.start(sb.name)
    finally:  # a failed boot counts as an attempt too
        sb = engine.store.update(sb.name, runtime={"restarts": restarts + 1})
    engine._record("restarted", sb, restarts=restarts + 1, exit_code=obs.exit_code)
    return {"sandbox": sb.name, "event": "restarted", "restarts": restarts + 1}


# ---------------------------------------------------------------------- orphans


def reap_containers(engine: Engine, known: Callable[[], set[str]]) -> list[str]:
    """Remove containers of this AIVA_HOME whose sandbox the store no longer has; a
    container without both labels is never touched. ``known`` is read after listing:
    a sandbox's row is written before its container exists, so a new one is never hit."""
    home = str(aiva_home())
    client = cast(Any, engine.backend("docker")).client
    flt = {"label": ["aiva.managed=true", f"aiva.home={home}"]}
    found = client.containers.list(all=True, filters=flt)
    ids = known()
    gone = []
    for c in found:
        labels = c.labels or {}
        sid = labels.get("aiva.sandbox_id")
        if labels.get("aiva.managed") != "true" or labels.get("aiva.home") != home \
                or not sid or sid in ids:
            continue
        with contextlib.suppress(Exception):  # already going: fine
            c.remove(force=True)
        engine._record("reaped", None, sandbox_id=sid, backend="docker", container=c.name)
        gone.append(sid)
    return gone


def reap_egress(engine: Engine, known: Callable[[], set[str]]) -> list[str]:
    """Remove the allow-list networks and nft/iptables rules of this AIVA_HOME whose
    sandbox the store no longer has (an orphan container goes first, above)."""
    gone = cast(Any, engine.backend("docker")).reap_egress(known)
    for sid in gone:
        engine._record("reaped", None, sandbox_id=sid, backend="docker", what="egress")
    return list(gone)


def reap_disks(engine: Engine, known: Callable[[], set[str]]) -> list[str]:
    """Unmount the Docker disks of this AIVA_HOME whose sandbox the store no longer has
    (after the orphan containers above, which used them)."""
    gone = cast(Any, engine.backend("docker")).reap_disks(known)
    for sid in gone:
        engine._record("reaped", None, sandbox_id=sid, backend="docker", what="disk")
    return list(gone)


def reap_run_dirs(engine: Engine, known: Callable[[], set[str]]) -> list[str]:
    """Unmount the run-dir tmpfs of this AIVA_HOME's Docker sandboxes that are gone."""
    gone = cast(Any, engine.backend("docker")).reap_run_dirs(known)
    for sid in gone:
        engine._record("reaped", None, sandbox_id=sid, backend="docker", what="run dir")
    return list(gone)


def _kill_ours(pid_file: Path, marker: str) -> None:
    """SIGKILL the pid in ``pid_file`` only if its command line names ``marker``."""
    try:
        pid = int(pid_file.read_text().strip())
        if marker.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap if it was our child
        time.sleep(0.02)


def reap_vm_dirs(engine: Engine, known: Callable[[], set[str]]) -> list[str]:
    """Kill the VMM and supervisor of VM dirs whose sandbox is gone, then remove the dir
    (``known`` read after listing, as for containers)."""
    gone = []
    root = paths.vms_dir()
    found = sorted(root.iterdir()) if root.is_dir() else []
    ids = known()
    for d in found:
        if not d.is_dir() or d.name in ids:
            continue
        for pid_file in ("qemu.pid", "supervisor.pid"):
            _kill_ours(d / pid_file, str(d))
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(paths.run_dir(d.name), ignore_errors=True)
        engine._record("reaped", None, sandbox_id=d.name, backend="vm", vm_dir=str(d))
        gone.append(d.name)
    return gone


# ---------------------------------------------------------------------- the loop


def tick(engine: Engine, now: float | None = None) -> list[dict[str, Any]]:
    """One pass over every sandbox: reconcile, timeouts, restarts (of sandboxes and of
    deployed services); then reap orphans.
    One sandbox's failure is logged and never stops the pass."""
    from aiva.deploy import services  # it builds on this module

    done: list[dict[str, Any]] = []
    for sb in engine.store.all():
        try:
            sb = engine.reconcile(sb)
            result = _apply_timeout(engine, sb, time.time() if now is None else now) \
                or _apply_restart(engine, sb) or services.check(engine, sb)
        except Exception as exc:
            log.warning("lifetimes: %s: %s", sb.name, exc)
            continue
        if result:
            done.append(result)

    def known() -> set[str]:
        return {sb.id for sb in engine.store.all()}

    for reap in (reap_containers, reap_egress, reap_disks, reap_run_dirs, reap_vm_dirs):
        try:
            done += [{"sandbox_id": sid, "event": "reaped"} for sid in reap(engine, known)]
        except Exception as exc:  # no Docker here, say
            log.debug("lifetimes: %s: %s", reap.__name__, exc)
    return done


async def run_lifetimes(engine: Engine, interval: float = 2.0,
                        stop_event: asyncio.Event | None = None) -> None:
    """The daemon's loop: :func:`tick` on a thread of its own every ``interval`` s, so a
    slow backend neither blocks the event loop nor delays shutdown."""
    step = Step(lambda: tick(engine), "lifetimes tick failed")
    await Periodic("aiva-lifetimes", interval, [step], log).run(stop_event or asyncio.Event())
