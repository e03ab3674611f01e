"""The client's plumbing: one httpx connection pool to the daemon, its error mapping,
and the handles (agent, background process) that call back through it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from aiva.agent_client import ExecResult, ProcessHandle, StdinSource
from aiva.daemon import wire
from aiva.daemon.wire import daemon_running
from aiva.errors import BackendUnavailable
from aiva.models import check_name

CHUNK = 1 << 20
__all__ = ["DaemonHTTP", "RemoteAgent", "RemoteProcess", "daemon_running", "stdin_fields"]


class DaemonHTTP:
    """Requests to the daemon: the Unix socket by default, or 127.0.0.1:PORT + token."""

    def __init__(self, *, port: int | None = None, token: str | None = None,
                 socket_path: str | Path | None = None) -> None:
        timeout = httpx.Timeout(None, connect=5.0)  # commands may run (silently) for hours
        if port is not None:
            token = token or wire.read_token()
            self.where = f"127.0.0.1:{port}"
            self.http = httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=timeout, trust_env=False,
                headers={"authorization": f"Bearer {token}"} if token else {},
                transport=httpx.HTTPTransport(verify=False))
        else:
            path = str(socket_path or wire.socket_path())
            self.where = path
            self.http = httpx.Client(base_url="http://aiva", timeout=timeout, trust_env=False,
                                     transport=httpx.HTTPTransport(uds=path, verify=False))

    @staticmethod
    def sb(name: str, rest: str = "") -> str:
        """The URL path of a sandbox (or of ``rest`` under it). The name is checked
        first: '..' must not climb to another route."""
        path = f"{wire.API}/sandboxes/{quote(check_name(name), safe='')}"
        return path + (f"/{rest}" if rest else "")

    def unreachable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"the aiva daemon is not answering on {self.where}: {exc}",
            hint="start it with `aiva daemon start`, or set AIVA_NO_DAEMON=1 to work "
            "without it")

    @staticmethod
    def raise_for(r: httpx.Response) -> None:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise wire.error_from_body(body, r.status_code)

    def call(self, method: str, path: str, *, json: Any = None,
             params: dict[str, Any] | None = None, content: Any = None) -> Any:
        """One request, one JSON answer; an error body raises its AivaError."""
        try:
            r = self.http.request(method, path, json=json, content=content,
                                  params={k: v for k, v in (params or {}).items()
                                          if v is not None})
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        self.raise_for(r)
        return r.json()

    @contextmanager
    def stream(self, method: str, path: str, **kw: Any) -> Iterator[httpx.Response]:
        try:
            with self.http.stream(method, path, **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    self.raise_for(r)
                yield r
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc

    def open(self, path: str, params: dict[str, Any]) -> httpx.Response:
        """A streamed response the caller closes (when the meta must come before the body)."""
        try:
            r = self.http.send(self.http.build_request("GET", path, params=params),
                               stream=True)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc
        if r.status_code >= 400:
            r.read()
            r.close()
            self.raise_for(r)
        return r

    @staticmethod
    def events(r: httpx.Response) -> Iterator[dict[str, Any]]:
        """NDJSON events; an ``{"error": ...}`` event raises its AivaError."""
        for text in r.iter_lines():
            if text.strip():  # blank lines are the daemon's heartbeats
                event: dict[str, Any] = json.loads(text)
                if "error" in event:
                    raise wire.error_from_body(event, 500)
                yield event

    def close(self) -> None:
        self.http.close()


class RemoteAgent:
    """What ``Engine.agent(name)`` offers that the SDK uses: signalling a process."""

    def __init__(self, api: DaemonHTTP, name: str) -> None:
        self._api = api
        self._name = name

    def signal(self, pid: int, signal: int) -> None:
        self._api.call("POST", self._api.sb(self._name, f"procs/{pid}/kill"),
                       json={"signal": signal})


class RemoteProcess(ProcessHandle):
    """A background command the daemon started; ``wait`` and ``kill`` go through it.

    A subclass so ``isinstance(x, ProcessHandle)`` code keeps working, but with no agent
    connection of its own."""

    def __init__(self, api: DaemonHTTP, name: str, pid: int) -> None:
        self.pid = pid
        self.client = RemoteAgent(api, name)  # type: ignore[assignment]
        self._api = api
        self._name = name
        self._result: ExecResult | None = None

    def wait(self, timeout: float | None = None) -> ExecResult:
        if self._result is None:
            data = self._api.call("POST", self._api.sb(self._name, f"procs/{self.pid}/wait"),
                                  params={"timeout": timeout})
            self._result = ExecResult(**data)
        return self._result

    def kill(self, signal: int = 9) -> None:
        RemoteAgent(self._api, self._name).signal(self.pid, signal)

    @property
    def done(self) -> bool:
        """False also when the daemon restarted since (it no longer tracks the process)."""
        if self._result is not None:
            return True
        data = self._api.call("GET", self._api.sb(self._name, f"procs/{self.pid}"))
        return bool(data.get("done"))


def stdin_fields(stdin: StdinSource) -> dict[str, Any]:
    """Stdin for the JSON exec request; a file or iterable is read to its end first."""
    if stdin is None:
        return {}
    if isinstance(stdin, str):
        return {"stdin": stdin}
    if isinstance(stdin, bytes | bytearray | memoryview):
        data = bytes(stdin)
    elif hasattr(stdin, "read"):
        data = b"".join(iter(lambda: stdin.read(CHUNK), b""))
    else:
        data = b"".join(stdin)
    return {"stdin_base64": base64.b64encode(data).decode()}
