"""``RemoteEngine``: the Engine's methods, served by a running daemon.

The SDK and CLI call the same methods with the same arguments and get the same types
back (``SandboxInfo``, ``ExecResult``, a ``ProcessHandle``, ``SyncReport`` ...); errors
come back as the same ``AivaError`` subclasses, with their hints. Output of a command
reaches ``on_stdout``/``on_stderr`` while it runs.

Local paths (``sync``, ``copy_in``/``copy_out``) are made absolute here and used by the
daemon itself: it runs on this host, as this user.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import httpx

from aiva.agent.protocol import FrameKind
from aiva.agent_client import (
    ExecResult,
    OutputBuffer,
    OutputCallback,
    ProcessHandle,
    StdinSource,
)
from aiva.agent_client.sync import SyncReport
from aiva.backends.base import Backend, LogLine
from aiva.config import load_config, parse_size
from aiva.daemon import wire
from aiva.daemon.transport import (
    CHUNK,
    DaemonHTTP,
    RemoteAgent,
    RemoteProcess,
    daemon_running,
    stdin_fields,
)
from aiva.desktop import DesktopInfo
from aiva.errors import AgentError, BackendUnavailable, InvalidValue, SandboxNotFound
from aiva.models import (
    Event,
    MountSpec,
    OnTimeout,
    PortSpec,
    Runtime,
    SandboxInfo,
    SandboxSpec,
    ServiceSpec,
    check_tag,
)
from aiva.observe.metrics import SandboxMetrics


def connect(port: int | None = None, token: str | None = None) -> RemoteEngine:
    """A client of the daemon: over its Unix socket, or over TCP with ``port``."""
    return RemoteEngine(port=port, token=token)


class _RemoteStore:
    """``engine.store.events(...)`` for code written against the in-process engine."""

    def __init__(self, engine: RemoteEngine) -> None:
        self._engine = engine

    def events(self, *, sandbox_id: str | None = None, after: int = 0,
               limit: int | None = None) -> list[Event]:
        return self._engine.events(sandbox_id=sandbox_id, after=after, limit=limit)


_KINDS = {"stdout": int(FrameKind.STDOUT), "stderr": int(FrameKind.STDERR)}


class RemoteEngine:
    def __init__(self, *, port: int | None = None, token: str | None = None,
                 socket_path: str | Path | None = None) -> None:
        self._api = DaemonHTTP(port=port, token=token, socket_path=socket_path)
        self.store = _RemoteStore(self)
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def daemon_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._api.call("GET", f"{wire.API}/daemon")
        return info

    def events(self, *, sandbox_id: str | None = None, after: int = 0,
               limit: int | None = None) -> list[Event]:
        data = self._api.call("GET", f"{wire.API}/events",
                          params={"sandbox_id": sandbox_id, "after": after, "limit": limit})
        return [Event.model_validate(e) for e in data]

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ backends & spec

    def backend(self, name: str | None = None) -> Backend:
        """A backend object of *this* process, for host-side work such as building images;
        lifecycle calls never use it (the daemon's engine does those)."""
        from aiva.backends import detect_backend, make_backend
        from aiva.config import load_config

        name = name or load_config().defaults.backend
        with self._lock:
            if name not in self._backends:
                self._backends[name] = detect_backend() if name == "auto" else make_backend(name)
            return self._backends[name]

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
        """The spec the daemon would build: its config and profiles fill the gaps.
        Mounts are parsed here, so a relative DIR means this process's directory."""
        body = {"image": image, "template": template, "profile": profile, "cpus": cpus,
                "memory": memory, "disk": disk, "env": env, "labels": labels,
                "backend": backend, "network": network, "timeout": timeout,
                "idle_timeout": idle_timeout, "on_timeout": on_timeout, "restart": restart,
                "runtime": runtime,
                "ports": None if ports is None else [
                    p.model_dump(mode="json") if isinstance(p, PortSpec) else p
                    for p in ports],
                "mounts": None if mounts is None else [
                    (m if isinstance(m, MountSpec) else MountSpec.parse(m)).model_dump(mode="json")
                    for m in mounts]}
        return SandboxSpec.model_validate(self._api.call("POST", f"{wire.API}/spec", json=body))

    # ------------------------------------------------------------------ lifecycle

    def _info(self, method: str, path: str, **kw: Any) -> SandboxInfo:
        return SandboxInfo.model_validate(self._api.call(method, path, **kw))

    def create(self, name: str, spec: SandboxSpec, *, start: bool = True) -> SandboxInfo:
        return self._info("POST", f"{wire.API}/sandboxes", json={
            "name": name, "spec": spec.model_dump(mode="json"), "start": start})

    def start(self, name: str) -> SandboxInfo:
        return self._info("POST", self._api.sb(name, "start"))

    def stop(self, name: str, *, force: bool = False) -> SandboxInfo:
        return self._info("POST", self._api.sb(name, "stop"), params={"force": force})

    def pause(self, name: str) -> SandboxInfo:
        return self._info("POST", self._api.sb(name, "pause"))

    def resume(self, name: str) -> SandboxInfo:
        return self._info("POST", self._api.sb(name, "resume"))

    def delete(self, name: str, *, volumes: bool = False) -> None:
        self._api.call("DELETE", self._api.sb(name), params={"volumes": volumes})

    def snapshot(self, name: str, tag: str | None = None) -> dict[str, Any]:
        snap: dict[str, Any] = self._api.call("POST", self._api.sb(name, "snapshots"),
                                          json={"tag": tag})
        return snap

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        snaps: list[dict[str, Any]] = self._api.call("GET", self._api.sb(name, "snapshots"))
        return snaps

    def restore(self, name: str, tag: str) -> SandboxInfo:
        return self._info("POST", self._api.sb(name, f"{_snapshot(tag)}/restore"))

    def fork(self, name: str, source: str, tag: str, *, ports: list[str] | None = None,
             cpus: float | None = None, memory: str | int | None = None,
             env: dict[str, str] | None = None, network: str | None = None,
             timeout: float | None = None) -> SandboxInfo:
        return self._info("POST", self._api.sb(source, f"{_snapshot(tag)}/fork"),
                          json={"name": name, "ports": ports, "cpus": cpus, "memory": memory,
                                "env": env, "network": network, "timeout": timeout})

    def get(self, name: str) -> SandboxInfo:
        return self._info("GET", self._api.sb(name), params={"reconcile": False})

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except SandboxNotFound:
            return False
        return True

    def list_all(self, *, reconcile: bool = True) -> list[SandboxInfo]:
        data = self._api.call("GET", f"{wire.API}/sandboxes", params={"reconcile": reconcile})
        return [SandboxInfo.model_validate(sb) for sb in data]

    def status(self, name: str) -> SandboxInfo:
        return self._info("GET", self._api.sb(name))

    def reconcile(self, sb: SandboxInfo) -> SandboxInfo:
        return self.status(sb.name)

    # ------------------------------------------------------------------ inside

    def agent(self, name: str) -> RemoteAgent:
        return RemoteAgent(self._api, name)

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
        """Run a command through the daemon; output reaches the callbacks as it comes.
        A file or iterable ``stdin`` is read to its end before the command starts. A
        background command's output is not streamed (``wait`` returns what was kept).
        ``stop``, looked at as output comes, hangs up: the daemon then ends the command."""
        req: dict[str, Any] = {
            "command": command if isinstance(command, str) else list(command),
            "env": env, "cwd": cwd, "user": user, "timeout": timeout,
            "background": background, **stdin_fields(stdin)}
        path = self._api.sb(name, "exec")
        if background:
            pid = int(self._api.call("POST", path, json=req)["pid"])
            return RemoteProcess(self._api, name, pid)
        cap = parse_size(load_config().limits.exec_output)
        parts = {key: OutputBuffer(cap, key) for key in ("stdout", "stderr")}
        callbacks = {"stdout": on_stdout, "stderr": on_stderr}
        with self._api.stream("POST", path, json=req) as r:
            for event in self._api.events(r):
                if stop is not None and stop.is_set():
                    raise AgentError("the command was cancelled: its caller went away")
                if "exit" in event:
                    x = event["exit"]
                    return ExecResult(int(x["exit_code"]), parts["stdout"].text(),
                                      parts["stderr"].text(), float(x["duration"]),
                                      int(x["pid"]), bool(x["timed_out"]),
                                      truncated=any(b.truncated for b in parts.values()))
                for key in ("stdout", "stderr"):
                    if key in event:
                        if keep_output:
                            parts[key].add(str(event[key]).encode("utf-8", "surrogateescape"))
                        cb = callbacks[key]
                        if cb is not None:
                            cb(event[key])
                        if on_bytes is not None:
                            on_bytes(_KINDS[key], event[key].encode())
        raise BackendUnavailable("the aiva daemon ended the command's stream without a result",
                                 hint="see `aiva daemon status` and AIVA_HOME/daemon.log")

    def read_file(self, name: str, path: str) -> bytes:
        return b"".join(self.read_stream(name, path)[1])

    def read_stream(self, name: str, path: str) -> tuple[dict[str, Any], Iterator[bytes]]:
        """The file's stat now, its bytes as they arrive."""
        r = self._api.open(self._api.sb(name, "files/content"), {"path": path})
        meta: dict[str, Any] = json.loads(r.headers.get(wire.STAT_HEADER, "{}"))

        def chunks() -> Iterator[bytes]:
            try:
                yield from r.iter_bytes(CHUNK)
            except httpx.TransportError as exc:  # a cut-off body: the read failed midway
                raise self._api.unreachable(exc) from exc
            finally:
                r.close()

        return meta, chunks()

    def write_file(self, name: str, path: str, data: bytes | str | IO[bytes], *,
                   mode: int | None = None) -> int:
        """Streamed upload; the daemon writes it atomically (parents made)."""
        content: bytes | Iterator[bytes]
        if isinstance(data, str):
            content = data.encode()
        elif isinstance(data, bytes | bytearray | memoryview):
            content = bytes(data)
        else:
            content = iter(lambda: data.read(CHUNK), b"")
        res = self._api.call("PUT", self._api.sb(name, "files/content"), content=content,
                         params={"path": path, "mode": mode})
        return int(res["bytes"])

    def list_dir(self, name: str, path: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self._api.call("GET", self._api.sb(name, "files/list"),
                                                   params={"path": path})
        return entries

    def stat(self, name: str, path: str) -> dict[str, Any]:
        st: dict[str, Any] = self._api.call("GET", self._api.sb(name, "files/stat"),
                                        params={"path": path})
        return st

    def mkdir(self, name: str, path: str) -> None:
        self._api.call("POST", self._api.sb(name, "files/mkdir"), json={"path": path})

    def remove(self, name: str, path: str, *, recursive: bool = False) -> None:
        self._api.call("DELETE", self._api.sb(name, "files"),
                   params={"path": path, "recursive": recursive})

    def rename(self, name: str, src: str, dst: str) -> None:
        self._api.call("POST", self._api.sb(name, "files/rename"), json={"src": src, "dst": dst})

    def metrics(self, name: str) -> SandboxMetrics:
        return wire.to_metrics(self._api.call("GET", self._api.sb(name, "metrics")))

    def set_service(self, name: str, service: ServiceSpec | None) -> SandboxInfo:
        body = None if service is None else service.model_dump(mode="json")
        return self._info("PUT", self._api.sb(name, "service"), json=body)

    def desktop(self, name: str) -> DesktopInfo:
        return DesktopInfo(**self._api.call("GET", self._api.sb(name, "desktop")))

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
    ) -> SyncReport:
        req = {"local": os.path.abspath(local), "remote": remote, "direction": direction,
               "delete": delete, "exclude": exclude, "prefer": prefer,
               "progress": progress is not None, "litter": litter}
        with self._api.stream("POST", self._api.sb(name, "sync"), json=req) as r:
            for event in self._api.events(r):
                if "report" in event:
                    return wire.to_sync_report(event["report"])
                if progress is not None and "progress" in event:
                    path, done, total = event["progress"]
                    progress(str(path), int(done), int(total))
        raise BackendUnavailable("the aiva daemon ended the sync's stream without a report")

    def copy_in(self, name: str, local: str | Path, remote: str) -> int:
        res = self._api.call("POST", self._api.sb(name, "files/copy-in"),
                         json={"local": os.path.abspath(local), "remote": remote})
        return int(res["bytes"])

    def copy_out(self, name: str, remote: str, local: str | Path) -> int:
        res = self._api.call("POST", self._api.sb(name, "files/copy-out"),
                         json={"local": os.path.abspath(local), "remote": remote})
        return int(res["bytes"])

    # ------------------------------------------------------------------ logs & config

    def logs(self, name: str, *, tail: int | None = None) -> list[LogLine]:
        data = self._api.call("GET", self._api.sb(name, "logs"), params={"tail": tail})
        return [wire.to_log_line(x) for x in data]

    def follow_logs(self, name: str) -> Iterator[LogLine]:
        """New lines as they come, until the caller stops iterating."""
        with self._api.stream("GET", self._api.sb(name, "logs/follow")) as r:
            for event in self._api.events(r):
                yield wire.to_log_line(event)

    def get_setting(self, name: str, key: str) -> Any:
        return self._api.call("GET", self._api.sb(name, _setting(key)))["value"]

    def set_setting(self, name: str, key: str, value: str) -> SandboxInfo:
        return self._info("PUT", self._api.sb(name, _setting(key)), json={"value": value})


def _snapshot(tag: str) -> str:
    """A snapshot's URL path: the tag is checked, so '..' cannot climb to another route."""
    return f"snapshots/{quote(check_tag(tag), safe='')}"


def _setting(key: str) -> str:
    """A setting's URL path; '.' and '..' would climb to another route."""
    if key.strip(".") == "":
        raise InvalidValue(f"unknown key '{key}'", hint="e.g. cpus, memory or env.NAME")
    return f"settings/{quote(key, safe='')}"


__all__ = ["RemoteAgent", "RemoteEngine", "RemoteProcess", "connect", "daemon_running"]
