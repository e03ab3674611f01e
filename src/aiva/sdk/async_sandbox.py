"""``AsyncSandbox``: the same names as :class:`Sandbox`, awaitable.

Each call runs the synchronous engine in a worker thread (``asyncio.to_thread``), so an
event loop is never blocked by Docker or by a long command; output callbacks run in that
worker thread. A test keeps the public names of both classes identical.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiva.agent_client import OutputCallback, StdinSource
from aiva.agent_client.sync import SyncReport
from aiva.backends.base import LogLine
from aiva.desktop import DesktopInfo
from aiva.engine import Engine
from aiva.models import SandboxInfo, State
from aiva.observe.metrics import SandboxMetrics
from aiva.sdk.sandbox import Sandbox


class AsyncCommands:
    def __init__(self, sync_sb: Sandbox) -> None:
        self._c = sync_sb.commands

    async def run(
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
        return await asyncio.to_thread(
            self._c.run, cmd, on_stdout=on_stdout, on_stderr=on_stderr, timeout=timeout,
            background=background, env=env, cwd=cwd, user=user, stdin=stdin, check=check,
        )

    async def kill(self, pid: int, signal: int = 9) -> None:
        await asyncio.to_thread(self._c.kill, pid, signal)


class AsyncFiles:
    def __init__(self, sync_sb: Sandbox) -> None:
        self._f = sync_sb.files

    async def read(self, path: str, *, format: str = "text") -> Any:
        return await asyncio.to_thread(self._f.read, path, format=format)

    async def read_stream(self, path: str) -> list[bytes]:
        return await asyncio.to_thread(lambda: list(self._f.read_stream(path)))

    async def write(self, path: str, data: bytes | str | IO[bytes], *,
                    mode: int | None = None) -> int:
        return await asyncio.to_thread(self._f.write, path, data, mode=mode)

    async def list(self, path: str = ".") -> builtins.list[dict[str, Any]]:
        return await asyncio.to_thread(self._f.list, path)

    async def stat(self, path: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._f.stat, path)

    async def exists(self, path: str) -> bool:
        return await asyncio.to_thread(self._f.exists, path)

    async def mkdir(self, path: str) -> None:
        await asyncio.to_thread(self._f.mkdir, path)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await asyncio.to_thread(self._f.remove, path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await asyncio.to_thread(self._f.rename, src, dst)

    async def upload(self, local: str | Path, remote: str) -> int:
        return await asyncio.to_thread(self._f.upload, local, remote)

    async def download(self, remote: str, local: str | Path) -> int:
        return await asyncio.to_thread(self._f.download, remote, local)


class AsyncSandbox:
    def __init__(self, sync_sb: Sandbox) -> None:
        self._sb = sync_sb
        self.commands = AsyncCommands(sync_sb)
        self.files = AsyncFiles(sync_sb)

    @classmethod
    async def create(
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
    ) -> AsyncSandbox:
        sb = await asyncio.to_thread(
            Sandbox.create, name, template=template, image=image, profile=profile, cpus=cpus,
            memory=memory, disk=disk, env=env, ports=ports, labels=labels, backend=backend,
            network=network, timeout=timeout, idle_timeout=idle_timeout,
            on_timeout=on_timeout, restart=restart, mounts=mounts, runtime=runtime,
            engine=engine,
        )
        return cls(sb)

    @classmethod
    async def connect(cls, name: str, *, engine: Engine | None = None) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.connect, name, engine=engine))

    @classmethod
    async def list(cls, *, engine: Engine | None = None) -> builtins.list[SandboxInfo]:
        return await asyncio.to_thread(Sandbox.list, engine=engine)

    @property
    def name(self) -> str:
        return self._sb.name

    @property
    def id(self) -> str:
        return self._sb.id

    @property
    def info(self) -> SandboxInfo:
        return self._sb.info

    @property
    def state(self) -> State:
        return self._sb.info.state

    async def status(self) -> SandboxInfo:
        return await asyncio.to_thread(self._sb.status)

    async def is_running(self) -> bool:
        return await asyncio.to_thread(self._sb.is_running)

    async def start(self) -> None:
        await asyncio.to_thread(self._sb.start)

    async def stop(self, *, force: bool = False) -> None:
        await asyncio.to_thread(self._sb.stop, force=force)

    async def pause(self) -> None:
        await asyncio.to_thread(self._sb.pause)

    async def resume(self) -> None:
        await asyncio.to_thread(self._sb.resume)

    async def destroy(self, *, volumes: bool = True) -> None:
        await asyncio.to_thread(self._sb.destroy, volumes=volumes)

    kill = destroy

    async def snapshot(self, tag: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self._sb.snapshot, tag)

    async def restore(self, tag: str) -> None:
        await asyncio.to_thread(self._sb.restore, tag)

    async def snapshots(self) -> builtins.list[dict[str, Any]]:
        return await asyncio.to_thread(self._sb.snapshots)

    @classmethod
    async def from_snapshot(cls, source: str, tag: str, name: str | None = None, *,
                            engine: Engine | None = None) -> AsyncSandbox:
        return cls(await asyncio.to_thread(Sandbox.from_snapshot, source, tag, name,
                                           engine=engine))

    async def sync(
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
        return await asyncio.to_thread(self._sb.sync, local, remote, direction=direction,
                                       delete=delete, exclude=exclude, prefer=prefer,
                                       progress=progress)

    async def logs(self, *, tail: int | None = None) -> builtins.list[LogLine]:
        return await asyncio.to_thread(self._sb.logs, tail=tail)

    async def metrics(self) -> SandboxMetrics:
        return await asyncio.to_thread(self._sb.metrics)

    async def desktop(self) -> DesktopInfo:
        return await asyncio.to_thread(self._sb.desktop)

    async def record_screen(self, path: str | Path, *, duration: float | None = None,
                            stop: threading.Event | None = None) -> int:
        return await asyncio.to_thread(self._sb.record_screen, path, duration=duration,
                                       stop=stop)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self._sb.__exit__, exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"AsyncSandbox(name={self.name!r})"
