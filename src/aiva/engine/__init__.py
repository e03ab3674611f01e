"""The in-process engine: the one place that joins state, backends and agents.

A request flows CLI -> SDK -> Engine -> (state machine check, Store) -> Backend for
lifecycle, or -> AgentClient for anything inside the sandbox. The daemon will serve this
same interface over HTTP, and its client will implement it, so the SDK and CLI work with
either.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shlex
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from pydantic import ValidationError

from aiva import desktop as desktop_session
from aiva import paths
from aiva.agent.protocol import FrameKind
from aiva.agent_client import (
    AgentClient,
    ExecResult,
    OutputCallback,
    ProcessHandle,
    StdinSource,
    sync,
)
from aiva.backends import detect_backend, make_backend
from aiva.backends.base import Backend, LogLine
from aiva.config import Config, load_config, parse_size
from aiva.deploy import services
from aiva.engine import lifetimes, spec_rules
from aiva.engine.store import Store
from aiva.errors import AivaError, InvalidTransition, InvalidValue, SandboxNotFound
from aiva.models import (
    Event,
    MountSpec,
    OnTimeout,
    PortSpec,
    Runtime,
    SandboxInfo,
    SandboxSpec,
    ServiceSpec,
    State,
    check_action,
    check_mounts,
    check_name,
    check_runtime,
    check_tag,
    utcnow,
)
from aiva.network import egress
from aiva.observe import metrics
from aiva.observe.logs import CommandLog, follow_command_log, merge, read_command_log
from aiva.observe.metrics import SandboxMetrics
from aiva.plugins import manager as plugins

log = logging.getLogger("aiva.engine")
_STREAM = {FrameKind.STDOUT: "stdout", FrameKind.STDERR: "stderr"}
_F = TypeVar("_F", bound=Callable[..., Any])


def _exclusive_op(method: _F) -> _F:
    """Run a lifecycle operation holding its sandbox's lock (see ``Engine._exclusive``)."""

    @functools.wraps(method)
    def run(self: Engine, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._exclusive(name):
            return method(self, name, *args, **kwargs)

    return cast(_F, run)

#: Keys `aiva config NAME set` may change on an existing sandbox, and how they apply.
LIVE_KEYS = {"cpus", "memory"}
SPEC_KEYS = {"cpus", "memory", "disk", "pids_limit", "image", "template", "profile", "ports",
             "workdir", "backend", "network"}


class Engine:
    def __init__(self, config: Config | None = None) -> None:
        self.config = config or load_config()
        self.store = Store(paths.state_db())
        self._backends: dict[str, Backend] = {}
        self._agents: dict[str, AgentClient] = {}
        self._cmdlogs: dict[str, CommandLog] = {}
        self._lock = threading.RLock()
        self._held = threading.local()

    # ------------------------------------------------------------------ locking

    @contextmanager
    def _exclusive(self, name: str, *, wait: bool = True) -> Iterator[bool]:
        """One lifecycle operation per sandbox at a time, across threads and processes
        (flock on ``run/locks/HASH.lock``), so the daemon's reconcile never reads a
        sandbox halfway through a snapshot, restore or start. Re-entrant per thread;
        with ``wait=False`` it yields False instead of waiting. The name is checked
        before anything touches the filesystem, and the file is named by its hash."""
        check_name(name)
        held: set[str] = self._held.__dict__.setdefault("names", set())
        if name in held:
            yield True
            return
        path = paths.lock_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            held.add(name)
            try:
                yield True
            finally:
                held.discard(name)
                fcntl.flock(f, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ backends

    def backend(self, name: str | None = None) -> Backend:
        name = name or self.config.defaults.backend
        with self._lock:
            if name == "auto":
                if "auto" not in self._backends:
                    chosen = detect_backend()
                    self._backends["auto"] = self._backends.setdefault(chosen.name, chosen)
                return self._backends["auto"]
            if name not in self._backends:
                self._backends[name] = make_backend(name)
            return self._backends[name]

    def _backend_of(self, sb: SandboxInfo) -> Backend:
        return self.backend(sb.spec.backend)

    def _record(self, kind: str, sb: SandboxInfo | None = None, **data: Any) -> Event:
        """Store an event, then hand it to plugins: every event goes through here."""
        event = self.store.record(kind, sb, **data)
        plugins.call_hook("on_event", event=event)
        return event

    def record(self, name: str, kind: str, **data: Any) -> Event:
        """Add an event about sandbox ``name`` to the stream (plugins see it too): how
        features built on the engine (an MCP session's audit ...) keep their history."""
        return self._record(kind, self.get(name), **data)

    def record_global(self, kind: str, **data: Any) -> Event:
        """Add an event about no one sandbox (a task's budget alert ...) to the stream."""
        return self._record(kind, None, **data)

    # ------------------------------------------------------------------ spec

    def build_spec(
        self,
        *,
        image: str | None = None,
        template: str | None = None,
        profile: str | None = None,
        cpus: float | None = None,
        memory: str | int | None = None,
        disk: str | int | None = None,
        env: dict[str, str] | None = None,
        ports: list[str] | list[PortSpec] | None = None,
        labels: dict[str, str] | None = None,
        backend: str | None = None,
        network: str = "nat",
        timeout: float | None = None,
        idle_timeout: float | None = None,
        on_timeout: OnTimeout | None = None,
        restart: str | None = None,
        mounts: Sequence[str | MountSpec] | None = None,
        runtime: Runtime | None = None,
    ) -> SandboxSpec:
        """Fill a spec from the arguments, then the config defaults, then the profile.

        ``mounts``: ``DIR[:GUEST_PATH][:ro]`` strings (DIR relative to this process's
        directory) or MountSpecs; each host directory must exist now.
        ``network``: ``nat``, ``none`` or ``allow=HOST[:PORT][,...]`` (see ``aiva.network.egress``).
        ``runtime``: ``runc`` (default) or ``gvisor`` (Docker only).
        """
        d = self.config.defaults
        prof = self.config.profile(profile)
        # explicit limits the host cannot honour are errors; defaults are cut to the host
        if cpus is not None:
            cpus = spec_rules.check_cpus(cpus)
        else:
            cpus = spec_rules.clamp_cpus(d.cpus if d.cpus is not None else prof.cpus)
        mem = (parse_size(memory) if memory is not None
               else spec_rules.clamp_memory(parse_size(d.memory or prof.memory)))
        spec_rules.check_memory(mem)
        size = parse_size(disk if disk is not None else d.disk or prof.disk)
        spec_rules.check_disk(size)
        bind = self.config.networking.default_bind
        port_specs = [p if isinstance(p, PortSpec) else PortSpec.parse(p, bind)
                      for p in ports or []]
        mount_specs = [m.check_host() if isinstance(m, MountSpec) else MountSpec.parse(m)
                       for m in mounts or []]
        check_mounts(mount_specs, SandboxSpec.model_fields["workdir"].default)
        is_desktop = desktop_session.wanted(template, image)
        if is_desktop:
            if _network_mode(network) == "none":
                raise InvalidValue("a desktop sandbox needs a network: its screen is shared "
                                   "through a published port", hint="drop `--network none`")
            if all(p.guest_port != desktop_session.NOVNC_PORT for p in port_specs):
                port_specs.append(desktop_session.novnc_port())
        backend = backend or (d.backend if d.backend != "auto" else self.backend().name)
        runtime = runtime or "runc"
        check_runtime(runtime, backend, desktop=is_desktop)
        try:
            return SandboxSpec(
                backend=backend,
                image=_image_ref(image or template or d.image),
                template=template or _template_name(image),
                profile=profile or d.profile,
                cpus=cpus,
                memory=mem,
                disk=size,
                pids_limit=d.pids_limit,
                env=dict(env or {}),
                ports=port_specs,
                mounts=mount_specs,
                labels=dict(labels or {}),
                network=_network_mode(network),
                desktop=is_desktop,
                timeout=timeout if timeout is not None else d.timeout,
                idle_timeout=idle_timeout if idle_timeout is not None else d.idle_timeout,
                on_timeout=on_timeout or d.on_timeout,
                restart=restart or d.restart,
                runtime=runtime,
            )
        except ValidationError as exc:  # a bad value the user gave: one clear line
            raise _one_line(exc) from None

    # ------------------------------------------------------------------ lifecycle

    @_exclusive_op
    def create(self, name: str, spec: SandboxSpec, *, start: bool = True) -> SandboxInfo:
        """A new sandbox (the name was checked by the lock, before any file was made);
        its spec's limits are checked again, as an API client may send a whole spec.
        The ``created`` event keeps what the spec gives away (``spec_warnings``)."""
        spec_rules.check_limits(spec)
        sb = self.store.add(SandboxInfo(name=check_name(name), spec=spec))
        backend = self._backend_of(sb)
        try:
            runtime = backend.create(sb)
        except BaseException:
            self.store.remove(sb.id)
            raise
        sb = self.store.update(name, runtime=runtime)
        warnings = spec_rules.spec_warnings(spec)
        self._record("created", sb, image=spec.image, backend=backend.name,
                     **({"warnings": warnings} if warnings else {}))
        plugins.call_hook("on_vm_create", sandbox=sb)
        if not start:
            return self.store.transition(name, State.STOPPED)
        return self._boot_new(sb)

    def _boot_new(self, sb: SandboxInfo) -> SandboxInfo:
        """The first boot of a sandbox just made: if it fails, nothing of it stays (no
        record in ``error``, no container, no volume), only the error that says why."""
        try:
            return self._boot(sb)
        except BaseException as exc:
            try:
                self.delete(sb.name, volumes=True)
            except AivaError as gone:
                log.warning("cannot remove %s after its failed start: %s", sb.name, gone)
            if isinstance(exc, AivaError):
                exc.message += " (nothing of the sandbox was kept)"
            raise

    @_exclusive_op
    def start(self, name: str) -> SandboxInfo:
        sb = self.reconcile(self.get(name))
        check_action(name, sb.state, "start")
        return self._boot(sb)

    def _boot(self, sb: SandboxInfo) -> SandboxInfo:
        backend = self._backend_of(sb)
        live = {x.id for x in self.store.all()
                if x.spec.backend == backend.name and x.state != State.STOPPED}
        for gone in backend.reap(live | {sb.id}):
            self._record("reaped", None, sandbox_id=gone, backend=backend.name)
        try:
            runtime = backend.start(sb)
        except AivaError as exc:
            self.store.transition(sb.name, State.ERROR, error=str(exc))
            self._record("error", sb, action="start", message=str(exc))
            raise
        runtime = {**runtime, **lifetimes.boot_runtime(sb.spec)}
        sb = self.store.transition(sb.name, State.RUNNING, runtime=runtime, action="start")
        self._record("started", sb)
        plugins.call_hook("on_vm_start", sandbox=sb)
        if sb.spec.desktop:
            self._start_desktop(sb)
        if sb.spec.service is not None:
            self._start_service(sb)
        return sb

    def _start_service(self, sb: SandboxInfo) -> None:
        """The deployed program; if it cannot start, the sandbox runs on and says why."""
        try:
            services.start(self, sb, fresh=True)
        except AivaError as exc:
            self._record("error", sb, action="service", message=str(exc))

    @_exclusive_op
    def set_service(self, name: str, service: ServiceSpec | None) -> SandboxInfo:
        """Deploy (or remove, with None) the sandbox's program; a running sandbox stops the
        old one and starts the new one now, later boots start it by themselves."""
        sb = self.get(name)
        if sb.spec.service is not None and sb.state == State.RUNNING:
            services.stop(self, sb)
        sb = self.store.update(name, spec=sb.spec.model_copy(update={"service": service}))
        self._record("deployed", sb, command=None if service is None else service.command)
        if service is not None and sb.state == State.RUNNING:
            services.start(self, sb, fresh=True)
        return self.get(name)

    def _start_desktop(self, sb: SandboxInfo) -> None:
        """The desktop session; if it fails the sandbox keeps running, and says why."""
        try:
            desktop_session.start_session(self, sb)
        except AivaError as exc:
            self._record("error", sb, action="desktop", message=str(exc))
            raise
        self._record("desktop_ready", sb)

    def desktop(self, name: str) -> desktop_session.DesktopInfo:
        """The noVNC URL (127.0.0.1 only) and password of a running desktop sandbox."""
        return desktop_session.info(self.get(name))

    @_exclusive_op
    def stop(self, name: str, *, force: bool = False) -> SandboxInfo:
        sb = self.get(name)
        check_action(name, sb.state, "stop")
        self._drop_agent(sb)
        sb = self.store.transition(name, State.STOPPING, action="stop")
        try:
            self._backend_of(sb).stop(sb, force=force, timeout=self.config.defaults.stop_timeout)
        except AivaError as exc:
            self.store.transition(name, State.ERROR, error=str(exc))
            raise
        sb = self.store.transition(name, State.STOPPED)
        self._record("stopped", sb, force=force)
        plugins.call_hook("on_vm_stop", sandbox=sb)
        return sb

    @_exclusive_op
    def pause(self, name: str) -> SandboxInfo:
        return self._freeze(name, "pause", State.PAUSED, "paused")

    @_exclusive_op
    def resume(self, name: str) -> SandboxInfo:
        return self._freeze(name, "resume", State.RUNNING, "resumed")

    def _freeze(self, name: str, action: str, to: State, event: str) -> SandboxInfo:
        """Pause or resume: the backend's method of the same name, then the state."""
        sb = self.get(name)
        check_action(name, sb.state, action)
        getattr(self._backend_of(sb), action)(sb)
        sb = self.store.transition(name, to, action=action)
        self._record(event, sb)
        return sb

    @_exclusive_op
    def delete(self, name: str, *, volumes: bool = False) -> None:
        sb = self.get(name)
        self._drop_agent(sb)
        backend = self._backend_of(sb)
        had_snapshots = volumes and bool(self.store.snapshots(sb.id))
        backend.delete(sb, volumes=volumes)
        if volumes:
            backend.delete_snapshots(sb, self.store.snapshots(sb.id))
            self.store.remove_snapshots(sb.id)
        self.store.remove(sb.id)
        self._record("deleted", sb, volumes=volumes)
        log = self._cmdlogs.pop(sb.id, None)
        if log is not None:
            log.close()
        plugins.call_hook("on_vm_delete", sandbox=sb)  # before its command log goes
        desktop_session.forget(sb)
        shutil.rmtree(paths.logs_dir(sb.id), ignore_errors=True)
        shutil.rmtree(paths.sync_dir(sb.id), ignore_errors=True)
        if sb.spec.backend == "docker" and (had_snapshots or sb.runtime.get("forked_from")):
            from aiva.engine import leftovers  # it may have been the last user of a snapshot image

            leftovers.sweep_snapshot_images(self)

    # ------------------------------------------------------------------ snapshots

    @_exclusive_op
    def snapshot(self, name: str, tag: str | None = None) -> dict[str, Any]:
        """Save a running or stopped sandbox under ``tag`` (default: a timestamp)."""
        sb = self.reconcile(self.get(name))
        if sb.state not in (State.RUNNING, State.STOPPED):
            raise InvalidTransition(name, sb.state.value, "snapshot",
                                    "snapshot a running or a stopped sandbox")
        tag = check_tag(tag or utcnow().strftime("s%Y%m%d-%H%M%S"))
        data = self._backend_of(sb).snapshot(sb, tag)
        record = self.store.add_snapshot(sb, tag, data)
        self._record("snapshot", sb, tag=tag, memory=data.get("memory", False))
        return record

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        return self.store.snapshots(self.get(name).id)

    def _find_snapshot(self, sb: SandboxInfo, tag: str) -> dict[str, Any]:
        check_tag(tag)
        for snap in self.store.snapshots(sb.id):
            if snap["tag"] == tag:
                return snap
        raise InvalidValue(f"sandbox '{sb.name}' has no snapshot '{tag}'",
                           hint=f"list them with `aiva snapshot {sb.name} --list`")

    @_exclusive_op
    def restore(self, name: str, tag: str) -> SandboxInfo:
        """Put a sandbox back to a snapshot, in place."""
        sb = self.reconcile(self.get(name))
        if sb.state not in (State.RUNNING, State.STOPPED):
            raise InvalidTransition(name, sb.state.value, "restore",
                                    "restore a running or a stopped sandbox")
        snap = self._find_snapshot(sb, tag)
        self._drop_agent(sb)
        runtime = self._backend_of(sb).restore(sb, tag, snap)
        sb = self.store.update(name, runtime=runtime)
        self._record("restored", sb, tag=tag, memory=snap.get("memory", False))
        if sb.spec.desktop and sb.state == State.RUNNING and not snap.get("memory", False):
            self._start_desktop(sb)  # a filesystem snapshot brings back no processes
        return sb

    @_exclusive_op
    def fork(self, name: str, source: str, tag: str, *, ports: list[str] | None = None,
             cpus: float | None = None, memory: str | int | None = None,
             env: dict[str, str] | None = None, network: str | None = None,
             timeout: float | None = None) -> SandboxInfo:
        """A new sandbox started from ``source``'s snapshot ``tag``, beside its source: its
        published ports get free host ports unless ``ports`` are given; the other
        arguments override the source's spec (``env`` is added to it)."""
        src = self.get(source)
        snap = self._find_snapshot(src, tag)
        spec = self._fork_spec(src.spec, ports=ports, cpus=cpus, memory=memory, env=env,
                               network=network, timeout=timeout)
        sb = self.store.add(SandboxInfo(name=check_name(name), spec=spec))
        backend = self._backend_of(sb)
        try:
            runtime = backend.create_from_snapshot(sb, src, tag, snap)
        except BaseException:
            self.store.remove(sb.id)
            raise
        sb = self.store.update(name, runtime=runtime | {"forked_from": f"{source}:{tag}"})
        self._record("created", sb, image=sb.spec.image, backend=backend.name,
                     from_snapshot=f"{source}:{tag}")
        plugins.call_hook("on_vm_create", sandbox=sb)
        return self._boot_new(sb)

    def _fork_spec(self, spec: SandboxSpec, *, ports: list[str] | None, cpus: float | None,
                   memory: str | int | None, env: dict[str, str] | None,
                   network: str | None, timeout: float | None) -> SandboxSpec:
        bind = self.config.networking.default_bind
        update: dict[str, Any] = {
            "ports": [PortSpec.parse(p, bind) for p in ports] if ports is not None
            # the source still holds its host ports: the fork takes free ones
            else [p.model_copy(update={"host_port": None}) for p in spec.ports]}
        if cpus is not None:
            update["cpus"] = spec_rules.check_cpus(cpus)
        if memory is not None:
            update["memory"] = spec_rules.check_memory(parse_size(memory))
        if env:
            update["env"] = spec.env | env
        if network is not None:
            update["network"] = _network_mode(network)
        if timeout is not None:
            update["timeout"] = timeout
        try:
            return SandboxSpec.model_validate(spec.model_copy(update=update).model_dump())
        except ValidationError as exc:
            raise _one_line(exc) from None

    def get(self, name: str) -> SandboxInfo:
        return self.store.get(name)

    def exists(self, name: str) -> bool:
        return self.store.find(name) is not None

    def list_all(self, *, reconcile: bool = True) -> list[SandboxInfo]:
        boxes = self.store.all()
        return [self.reconcile(sb) for sb in boxes] if reconcile else boxes

    def status(self, name: str) -> SandboxInfo:
        return self.reconcile(self.get(name))

    def reconcile(self, sb: SandboxInfo) -> SandboxInfo:
        """Make the stored state agree with what the engine really runs (unless an
        operation is changing the sandbox right now: then its word is the newer one)."""
        with self._exclusive(sb.name, wait=False) as mine:
            return self._reconcile(sb) if mine else sb

    def _reconcile(self, sb: SandboxInfo) -> SandboxInfo:
        if sb.state == State.CREATING:
            return sb
        obs = self._backend_of(sb).observe(sb)
        if obs.state == sb.state or (obs.state == State.STOPPED and sb.state == State.ERROR):
            return sb
        self._drop_agent(sb)
        error: str | None
        if obs.state is None or obs.state == State.ERROR:
            new, error = State.ERROR, obs.reason or "the engine lost it"
        elif obs.state == State.STOPPED and sb.state in (State.RUNNING, State.PAUSED):
            clean = obs.exit_code == 0
            new, error = (State.STOPPED, None) if clean else (State.ERROR, obs.reason)
        elif obs.state == State.STOPPED and sb.state == State.STOPPING:
            new, error = State.STOPPED, None
        else:
            new, error = obs.state, None
        try:
            sb = self.store.transition(sb.name, new, error=error)
        except (AivaError, SandboxNotFound):
            return self.get(sb.name)
        self._record("error" if new == State.ERROR else "reconciled", sb,
                     state=new.value, reason=obs.reason)
        return sb

    # ------------------------------------------------------------------ agent

    def agent(self, name: str) -> AgentClient:
        sb = self.get(name)
        check_action(name, sb.state, "use")
        return self._agent(sb)

    def _agent(self, sb: SandboxInfo) -> AgentClient:
        with self._lock:
            client = self._agents.get(sb.id)
            if client is None or client.closed:
                transport = self._backend_of(sb).connect_agent(sb, timeout=5)
                lim = self.config.limits
                client = AgentClient(transport, label=sb.name, call_timeout=lim.call_timeout,
                                     channel_buffer=parse_size(lim.channel_buffer),
                                     exec_output=parse_size(lim.exec_output),
                                     walk_entries=lim.walk_entries)
                self._agents[sb.id] = client
            return client

    def _drop_agent(self, sb: SandboxInfo) -> None:
        with self._lock:
            client = self._agents.pop(sb.id, None)
        if client is not None:
            client.close()

    def _cmdlog(self, sb: SandboxInfo) -> CommandLog:
        with self._lock:
            log = self._cmdlogs.get(sb.id)
            if log is None:
                log = self._cmdlogs[sb.id] = CommandLog(sb.id)
            return log

    def exec(
        self,
        name: str,
        command: str | list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: StdinSource = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        background: bool = False,
        on_bytes: Callable[[int, bytes], None] | None = None,
        keep_output: bool = True,
        stop: threading.Event | None = None,
    ) -> ExecResult | ProcessHandle:
        """Run a command in the sandbox; a string runs through ``/bin/sh -c``.
        ``on_bytes(kind, data)`` gets the raw output (``FrameKind.STDOUT`` or ``STDERR``);
        ``keep_output=False`` keeps none of it in the result (for endless streams); the
        result keeps at most ``limits.exec_output`` bytes a stream (``truncated`` says so).
        ``stop`` set ends a foreground command (its caller went away)."""
        sb = self.get(name)
        check_action(name, sb.state, "use")
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        log = self._cmdlog(sb)
        cmd_id = log.new_command()
        log.write(cmd_id, "cmd", command if isinstance(command, str) else shlex.join(argv))

        def log_bytes(kind: int, data: bytes) -> None:
            log.write(cmd_id, _STREAM[kind], data.decode("utf-8", "replace"))
            if on_bytes is not None:
                on_bytes(kind, data)

        result = self._agent(sb).exec(
            argv,
            env=(sb.spec.env | env) if env else sb.spec.env or None,
            cwd=cwd or sb.spec.workdir,
            cwd_default=cwd is None,
            user=user,
            timeout=timeout,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_bytes=log_bytes,
            background=background,
            keep_output=keep_output,
            stop=stop,
        )
        if isinstance(result, ExecResult):
            log.write(cmd_id, "exit", str(result.exit_code))
            self._record("command", sb, cmd=argv, exit_code=result.exit_code,
                         duration=round(result.duration, 6), timed_out=result.timed_out)
            plugins.call_hook("on_command", sandbox=sb, argv=argv, exit_code=result.exit_code,
                              duration=result.duration)
        else:
            self._record("command", sb, cmd=argv, background=True, pid=result.pid)
        return result

    # files: thin, checked wrappers, so a remote engine can offer the same calls

    def read_file(self, name: str, path: str) -> bytes:
        return self.agent(name).read_file(path)

    def read_stream(self, name: str, path: str) -> tuple[dict[str, Any], Iterator[bytes]]:
        return self.agent(name).read_stream(path)

    def write_file(self, name: str, path: str, data: bytes | str | IO[bytes], *,
                   mode: int | None = None) -> int:
        return self.agent(name).write_file(path, data, mode=mode)

    def list_dir(self, name: str, path: str) -> list[dict[str, Any]]:
        return self.agent(name).list_dir(path)

    def stat(self, name: str, path: str) -> dict[str, Any]:
        return self.agent(name).stat(path)

    def mkdir(self, name: str, path: str) -> None:
        self.agent(name).mkdir(path)

    def remove(self, name: str, path: str, *, recursive: bool = False) -> None:
        self.agent(name).remove(path, recursive=recursive)

    def rename(self, name: str, src: str, dst: str) -> None:
        self.agent(name).rename(src, dst)

    def metrics(self, name: str) -> SandboxMetrics:
        """Host-measured CPU and I/O; in a VM, memory and uptime as its own kernel sees them."""
        sb = self.get(name)
        if sb.state != State.PAUSED:
            check_action(name, sb.state, "use")
        host = self._backend_of(sb).metrics(sb)
        if sb.spec.backend == "docker" or sb.state == State.PAUSED:
            return host  # a container's /proc/meminfo is the host's; a paused VM cannot answer
        return metrics.merge(host, self._agent(sb).metrics())

    # ------------------------------------------------------------------ data

    def sync(
        self,
        name: str,
        local: str | Path,
        remote: str,
        *,
        direction: str = "both",
        delete: bool = False,
        exclude: list[str] | None = None,
        prefer: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        litter: bool = False,
    ) -> sync.SyncReport:
        """``litter``: also carry build litter (``sync.LITTER``: __pycache__, *.pyc ...)."""
        sb = self.get(name)
        client = self.agent(name)
        remote = self._abspath(sb, remote)
        report = sync.sync(
            client, Path(local), remote, direction=direction,  # type: ignore[arg-type]
            delete=delete, exclude=list(exclude or []), prefer=prefer,  # type: ignore[arg-type]
            state_file=paths.sync_state(sb.id, Path(local), remote), progress=progress,
            litter=litter,
        )
        self._record("files_synced", sb, local=str(local), remote=remote,
                     direction=direction, **_counts(report))
        return report

    def copy_in(self, name: str, local: str | Path, remote: str) -> int:
        """``aiva cp LOCAL NAME:REMOTE``: a file, or a directory copied recursively.

        The user named ``local``, so a link there is followed; but only a regular file is
        sent (a FIFO would hang), and without setuid/setgid/sticky bits."""
        src = Path(local)
        sb = self.get(name)
        remote = self._abspath(sb, remote)
        if src.is_dir():
            report = self.sync(name, src, remote, direction="push")
            return report.bytes_sent
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidValue(f"{src} does not exist") from None
        except OSError as exc:
            raise InvalidValue(f"cannot read {src}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidValue(f"{src} is not a regular file or directory")
            os.set_blocking(fd, True)
            client = self.agent(name)
            try:
                if client.stat(remote)["type"] == "dir":
                    remote = f"{remote.rstrip('/')}/{src.name}"
            except FileNotFoundError:
                pass
            n = client.write_file(remote, f, mode=stat.S_IMODE(st.st_mode) & 0o777,
                                  mtime_ns=st.st_mtime_ns)
        self._record("files_synced", sb, local=str(src), remote=remote, direction="push",
                     bytes=n, files=1)
        return n

    def copy_out(self, name: str, remote: str, local: str | Path) -> int:
        """``aiva cp NAME:REMOTE LOCAL``: a directory is a pull; a file goes through
        :func:`sync.pull_file` (exactly the declared size, mode masked, never through a
        link, refused up front if it cannot fit)."""
        sb = self.get(name)
        remote = self._abspath(sb, remote)
        client = self.agent(name)
        dest = Path(local)
        if client.stat(remote)["type"] == "dir":
            report = self.sync(name, dest, remote, direction="pull")
            return report.bytes_received
        done = sync.pull_file(client, remote, dest)
        self._record("files_synced", sb, local=str(dest), remote=remote, direction="pull",
                     bytes=done.size, files=1)
        return done.size

    @staticmethod
    def _abspath(sb: SandboxInfo, remote: str) -> str:
        return remote if remote.startswith("/") else f"{sb.spec.workdir}/{remote}"

    # ------------------------------------------------------------------ logs & config

    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]:
        """Command output, the engine's log and the guest's syslog, ordered by time."""
        sb = self.get(name)
        backend = self._backend_of(sb)
        engine_lines = list(backend.engine_logs(sb, tail=tail))
        return merge(engine_lines, read_command_log(sb.id, tail=tail),
                     backend.guest_syslog(sb, tail=tail), tail=tail)

    def follow_logs(self, name: str) -> Iterator[LogLine]:
        """New command output, engine log and guest syslog lines as they come (until the
        caller stops)."""
        import queue

        q: queue.SimpleQueue[LogLine] = queue.SimpleQueue()

        def pump(it: Iterator[LogLine]) -> None:
            for line in it:
                q.put(line)

        for it in self.log_streams(name):
            threading.Thread(target=pump, args=(it,), daemon=True).start()
        while True:
            yield q.get()

    def log_streams(self, name: str) -> list[Iterator[LogLine]]:
        """One endless iterator of new lines per log of the sandbox: its commands, its
        engine log and its guest syslog. ``follow_logs`` and the daemon merge them."""
        from aiva.observe.logs import follow_jsonl

        sb = self.get(name)
        backend = self._backend_of(sb)
        sources = [follow_command_log(sb.id), backend.engine_logs(sb, tail=0, follow=True)]
        syslog = backend.syslog_path(sb)
        if syslog is not None:  # the guest writes there: follow_jsonl opens it warily
            sources.append(follow_jsonl(syslog, source="syslog"))
        return sources

    def get_setting(self, name: str, key: str) -> Any:
        sb = self.get(name)
        data = sb.spec.model_dump(mode="json")
        head, _, sub = key.partition(".")
        if head in ("env", "labels") and sub:
            return data[head].get(sub)
        if head not in data:
            raise InvalidValue(f"unknown key '{key}'",
                               hint=f"keys: {', '.join(sorted(data))}, env.NAME, labels.NAME")
        return data[head]

    @_exclusive_op
    def set_setting(self, name: str, key: str, value: str) -> SandboxInfo:
        """Change one key; limits apply live, env applies to the next command."""
        sb = self.get(name)
        spec = sb.spec.model_copy(deep=True)
        head, _, sub = key.partition(".")
        if head in ("env", "labels") and sub:
            getattr(spec, head)[sub] = value
        elif head == "cpus":
            try:
                cpus = float(value)
            except ValueError:
                raise InvalidValue(f"cpus must be a number, not '{value}'",
                                   hint="e.g. 1 or 0.5") from None
            spec.cpus = spec_rules.check_cpus(cpus)
        elif head == "memory":
            spec.memory = spec_rules.check_memory(parse_size(value))
        elif head in SPEC_KEYS:
            raise InvalidValue(
                f"'{key}' cannot change on an existing sandbox",
                hint="create a new sandbox with the value you want",
            )
        else:
            raise InvalidValue(f"unknown key '{key}'",
                               hint="settable: cpus, memory, env.NAME, labels.NAME")
        before = sb.spec
        sb = self.store.update(name, spec=spec)
        if head in LIVE_KEYS:
            try:
                self._backend_of(sb).update_resources(sb)
            except BaseException:  # not applied: the record keeps what really runs
                self.store.update(name, spec=before)
                raise
        self._record("config_changed", sb, key=key, value=value)
        return sb

    def close(self) -> None:
        with self._lock:
            for client in self._agents.values():
                client.close()
            self._agents.clear()
            for log in self._cmdlogs.values():
                log.close()
            self._cmdlogs.clear()
        self.store.close()


def _one_line(exc: ValidationError) -> InvalidValue:
    """A spec's first bad value as one line naming its key."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    return InvalidValue(f"{key}: {err['msg'].removeprefix('Value error, ')}")


def _image_ref(ref: str) -> str:
    """A template's name means its image: ``python`` is stored (and shown) as
    ``aiva/python:latest`` however the sandbox was made."""
    from aiva.images.build import TEMPLATES, template_tag

    return template_tag(ref) if ref in TEMPLATES else ref


def _template_name(image: str | None) -> str | None:
    """``--image python`` names the template too."""
    from aiva.images.build import TEMPLATES

    return image if image in TEMPLATES else None


def _network_mode(mode: str) -> str:
    """``nat``, ``none`` or ``allow=HOST[,HOST...]`` (normalized); InvalidValue if bad."""
    return egress.check_network(mode)


def _counts(report: sync.SyncReport) -> dict[str, Any]:
    return {
        "pushed": len(report.pushed),
        "pulled": len(report.pulled),
        "deleted": len(report.deleted_local) + len(report.deleted_remote),
        "conflicts": len(report.conflicts),
        "bytes": report.bytes_sent + report.bytes_received,
    }


_default: Engine | None = None
_default_lock = threading.Lock()


def default_engine() -> Engine:
    """One engine per process, shared by every Sandbox object that is not given one.

    While an aiva daemon runs for this AIVA_HOME this is a ``RemoteEngine`` (the same
    methods, served by the daemon); ``AIVA_NO_DAEMON=1`` keeps the engine in-process.
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = _daemon_engine() or Engine()
        return _default


def _daemon_engine() -> Engine | None:
    import os

    if os.environ.get("AIVA_NO_DAEMON", "") not in ("", "0"):
        return None
    from aiva.daemon.wire import daemon_running  # no httpx/fastapi import: cheap

    if not daemon_running():
        return None
    from aiva.daemon.client import RemoteEngine

    # same public methods and signatures: tests/unit/test_daemon_api.py checks them
    return cast(Engine, RemoteEngine())
