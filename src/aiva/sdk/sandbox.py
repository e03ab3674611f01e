"""``Sandbox``: the Python face of aiva, in the shape users of E2B expect.

    with Sandbox.create(template="python") as sb:
        result = sb.commands.run("python3 -c 'print(6*7)'")
        sb.files.write("/workspace/a.txt", "hi")

A sandbox made by ``Sandbox.create`` is destroyed when its ``with`` block ends; one found
with ``Sandbox.connect`` is left as it was.
"""

from __future__ import annotations

import builtins
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiva.agent_client import ExecResult, OutputCallback, ProcessHandle, StdinSource
from aiva.agent_client.sync import SyncReport
from aiva.backends.base import LogLine
from aiva.desktop import DesktopInfo
from aiva.engine import Engine, default_engine
from aiva.errors import CommandFailed, CommandTimeout
from aiva.models import SandboxInfo, State, parse_runtime
from aiva.observe.metrics import SandboxMetrics


class Commands:
    """``sb.commands``: run processes inside the sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    def run(
        self,
        cmd: str | list[str],
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = 60.0,
        background: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: StdinSource = None,
        check: bool = False,
    ) -> Any:
        """Run ``cmd`` (a shell string or an argv list) and return an ``ExecResult``.

        With ``background=True`` it returns a ``ProcessHandle`` at once (``wait``/``kill``).
        A command that outlives ``timeout`` has its whole process group killed and raises
        ``CommandTimeout``; ``check=True`` raises ``CommandFailed`` on a non-zero exit.
        """
        result = self._sb._engine.exec(
            self._sb.name, cmd, env=env, cwd=cwd, user=user, stdin=stdin,
            timeout=None if background else timeout,
            on_stdout=on_stdout, on_stderr=on_stderr, background=background,
        )
        if isinstance(result, ProcessHandle):
            return result
        if result.timed_out:
            err = CommandTimeout(
                f"command timed out after {timeout}s and was killed",
                hint="raise timeout=..., or run it with background=True",
            )
            err.result = result  # type: ignore[attr-defined]
            raise err
        if check and result.exit_code != 0:
            raise CommandFailed(
                f"command exited with code {result.exit_code}: {result.stderr.strip()[-500:]}",
                exit_code=result.exit_code, stderr=result.stderr,
            )
        return result

    def kill(self, pid: int, signal: int = 9) -> None:
        self._sb._engine.agent(self._sb.name).signal(pid, signal)


class Files:
    """``sb.files``: files inside the sandbox, streamed both ways."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    @property
    def _e(self) -> Engine:
        return self._sb._engine

    def read(self, path: str, *, format: str = "text") -> Any:
        """The file's content: ``str`` (format="text") or ``bytes`` (format="bytes")."""
        data = self._e.read_file(self._sb.name, path)
        return data.decode() if format == "text" else data

    def read_stream(self, path: str) -> Iterator[bytes]:
        return self._e.read_stream(self._sb.name, path)[1]

    def write(self, path: str, data: bytes | str | IO[bytes], *, mode: int | None = None
              ) -> int:
        """Write atomically (parents created); returns the number of bytes written."""
        return self._e.write_file(self._sb.name, path, data, mode=mode)

    def list(self, path: str = ".") -> builtins.list[dict[str, Any]]:
        return self._e.list_dir(self._sb.name, self._abs(path))

    def stat(self, path: str) -> dict[str, Any]:
        return self._e.stat(self._sb.name, self._abs(path))

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def mkdir(self, path: str) -> None:
        self._e.mkdir(self._sb.name, self._abs(path))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self._e.remove(self._sb.name, self._abs(path), recursive=recursive)

    def rename(self, src: str, dst: str) -> None:
        self._e.rename(self._sb.name, self._abs(src), self._abs(dst))

    def upload(self, local: str | Path, remote: str) -> int:
        return self._e.copy_in(self._sb.name, local, remote)

    def download(self, remote: str, local: str | Path) -> int:
        return self._e.copy_out(self._sb.name, remote, local)

    def _abs(self, path: str) -> str:
        return path if path.startswith("/") else f"{self._sb.info.spec.workdir}/{path}"


class Sandbox:
    def __init__(self, info: SandboxInfo, *, engine: Engine | None = None,
                 owned: bool = False) -> None:
        self._engine = engine or default_engine()
        self._info = info
        self._owned = owned
        self.commands = Commands(self)
        self.files = Files(self)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        name: str | None = None,
        *,
        template: str | None = None,
        image: str | None = None,
        profile: str | None = None,
        cpus: float | None = None,
        memory: str | int | None = None,
        disk: str | int | None = None,
        env: dict[str, str] | None = None,
        ports: builtins.list[str] | None = None,
        labels: dict[str, str] | None = None,
        backend: str | None = None,
        network: str = "nat",
        timeout: float | None = None,
        idle_timeout: float | None = None,
        on_timeout: str | None = None,
        restart: str | None = None,
        mounts: builtins.list[str] | None = None,
        runtime: str | None = None,
        engine: Engine | None = None,
    ) -> Sandbox:
        """Create and start a sandbox; destroyed on leaving a ``with`` block.
        ``mounts``: host directories, ``DIR[:GUEST_PATH][:ro]`` each.
        ``network``: ``nat``, ``none`` or ``allow=HOST[:PORT][,...]`` (only those).
        ``runtime``: ``runc`` (default) or ``gvisor`` (Docker under gVisor's kernel)."""
        engine = engine or default_engine()
        spec = engine.build_spec(image=image, template=template, profile=profile, cpus=cpus,
                                 memory=memory, disk=disk, env=env, ports=ports, labels=labels,
                                 backend=backend, network=network, timeout=timeout,
                                 idle_timeout=idle_timeout,
                                 on_timeout=on_timeout,  # type: ignore[arg-type]
                                 restart=restart, mounts=mounts,
                                 runtime=parse_runtime(runtime))
        info = engine.create(name or f"sb-{uuid.uuid4().hex[:8]}", spec)
        return cls(info, engine=engine, owned=True)

    @classmethod
    def connect(cls, name: str, *, engine: Engine | None = None) -> Sandbox:
        """Attach to an existing sandbox; it is not destroyed when this object goes."""
        engine = engine or default_engine()
        return cls(engine.status(name), engine=engine)

    @classmethod
    def list(cls, *, engine: Engine | None = None) -> builtins.list[SandboxInfo]:
        return (engine or default_engine()).list_all()

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def info(self) -> SandboxInfo:
        return self._info

    @property
    def state(self) -> State:
        return self.status().state

    def status(self) -> SandboxInfo:
        self._info = self._engine.status(self.name)
        return self._info

    def is_running(self) -> bool:
        return self.state == State.RUNNING

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._info = self._engine.start(self.name)

    def stop(self, *, force: bool = False) -> None:
        self._info = self._engine.stop(self.name, force=force)

    def pause(self) -> None:
        self._info = self._engine.pause(self.name)

    def resume(self) -> None:
        self._info = self._engine.resume(self.name)

    def destroy(self, *, volumes: bool = True) -> None:
        """Remove the sandbox (and by default its data volume)."""
        self._engine.delete(self.name, volumes=volumes)

    kill = destroy

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, tag: str | None = None) -> dict[str, Any]:
        """Save the sandbox (disk and memory on VMs, filesystem on Docker)."""
        return self._engine.snapshot(self.name, tag)

    def restore(self, tag: str) -> None:
        self._info = self._engine.restore(self.name, tag)

    def snapshots(self) -> builtins.list[dict[str, Any]]:
        return self._engine.snapshots(self.name)

    @classmethod
    def from_snapshot(cls, source: str, tag: str, name: str | None = None, *,
                      engine: Engine | None = None) -> Sandbox:
        """A new sandbox started from ``source``'s snapshot (a fork); destroyed on exit."""
        engine = engine or default_engine()
        info = engine.fork(name or f"sb-{uuid.uuid4().hex[:8]}", source, tag)
        return cls(info, engine=engine, owned=True)

    # ------------------------------------------------------------------ data & logs

    def sync(
        self,
        local: str | Path,
        remote: str,
        *,
        direction: str = "both",
        delete: bool = False,
        exclude: builtins.list[str] | None = None,
        prefer: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> SyncReport:
        """Two-way incremental sync (``direction`` "push"/"pull" for one way)."""
        return self._engine.sync(self.name, local, remote, direction=direction, delete=delete,
                                 exclude=exclude, prefer=prefer, progress=progress)

    def logs(self, *, tail: int | None = None) -> builtins.list[LogLine]:
        """Command output, the engine's log and the guest's syslog, ordered by time."""
        return self._engine.logs(self.name, tail=tail)

    def metrics(self) -> SandboxMetrics:
        """CPU, memory, disk and network I/O, uptime; ``.source`` says where each came from."""
        return self._engine.metrics(self.name)

    # ------------------------------------------------------------------ desktop

    def desktop(self) -> DesktopInfo:
        """How to watch a desktop sandbox: the noVNC URL (127.0.0.1 only) and password."""
        return self._engine.desktop(self.name)

    def record_screen(self, path: str | Path, *, duration: float | None = None,
                      stop: threading.Event | None = None) -> int:
        """Record the desktop to a video file (.mp4, .mkv, .webm) until ``duration``
        passes or ``stop`` is set; returns the bytes written."""
        from aiva.desktop.record import record

        return record(self._engine, self.name, path, duration=duration, stop=stop)

    # ------------------------------------------------------------------ context

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._owned and self._engine.exists(self.name):
            self.destroy()

    def __repr__(self) -> str:
        return f"Sandbox(name={self.name!r}, state={self._info.state.value!r})"


__all__ = ["Commands", "ExecResult", "Files", "Sandbox"]
