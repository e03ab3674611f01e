"""What the daemon and its client must agree on: paths, errors, and value encodings.

Kept free of FastAPI and httpx so either side (and ``daemon_running``) can import it
cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from aiva import errors, paths
from aiva.agent_client import ExecResult
from aiva.agent_client.sync import SyncReport
from aiva.backends.base import LogLine
from aiva.errors import AivaError
from aiva.observe.metrics import SandboxMetrics
from aiva.tasks.models import TaskNotFound, TaskStateError

API = "/v1"
NDJSON = "application/x-ndjson"
#: Header of a file download: the file's stat as JSON, sent before its bytes.
STAT_HEADER = "x-aiva-stat"


def socket_path() -> Path:
    return paths.daemon_socket()


def token_path() -> Path:
    return paths.daemon_token()


def mcp_token_path() -> Path:
    """A second bearer token that opens ``/mcp`` and nothing else: the one to put in an
    MCP client's config, so the client never holds the whole API."""
    return paths.mcp_token()


def pid_path() -> Path:
    return paths.daemon_pid()


def state_path() -> Path:
    """Facts of the running daemon (port, start time) for ``status`` and clients."""
    return paths.daemon_state()


def log_path() -> Path:
    return paths.daemon_log()


def daemon_running(timeout: float = 0.05, *, answer_timeout: float = 2.0) -> bool:
    """Does a daemon answer ``/health`` on this AIVA_HOME's socket? No socket, or nobody
    listening, is known within ``timeout`` (raw socket, no httpx import: cheap on every
    CLI run). Once a listener accepted, a busy daemon gets ``answer_timeout`` to reply,
    so a loaded daemon is not bypassed by a client that then runs its own engine."""
    path = socket_path()
    if not path.exists():
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.settimeout(max(timeout, answer_timeout))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: aiva\r\nConnection: close\r\n\r\n")
        return sock.recv(32).startswith(b"HTTP/1.1 200")
    except OSError:
        return False
    finally:
        sock.close()


def ensure_token(path: Path | None = None) -> str:
    """The TCP bearer token (or the one in ``path``), made at first start; the file is
    created 0600 atomically."""
    import secrets

    path = path or token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        token = path.read_text().strip()
        if token:
            return token
        path.unlink()
        return ensure_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token() -> str | None:
    try:
        return token_path().read_text().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------- errors

#: The only classes an error body may name; the client never imports by arbitrary path.
ERRORS: dict[str, type[AivaError]] = {cls.__name__: cls for cls in (
    errors.AivaError, errors.ConfigError, errors.InvalidValue, errors.SandboxNotFound,
    errors.SandboxExists, errors.InvalidTransition, errors.BackendError,
    errors.BackendUnavailable, errors.ImageError, errors.ImageNotFound,
    errors.ImageUnsupported, errors.AgentError, errors.AgentUnreachable,
    errors.ProtocolError, errors.RemoteError, errors.SandboxFileNotFound,
    errors.SandboxPermissionError, errors.SandboxFileExists, errors.SandboxFileUnsupported,
    errors.CommandTimeout,
    errors.CommandFailed, errors.SyncError, errors.HostFileError, errors.DesktopError,
    errors.NotADesktop,
    TaskNotFound, TaskStateError,
)}

#: Most specific first: the first class the error is an instance of gives the status.
STATUS: list[tuple[type[AivaError], int]] = [
    (errors.SandboxNotFound, 404),
    (errors.SandboxFileNotFound, 404),
    (errors.ImageNotFound, 404),
    (errors.NotADesktop, 404),
    (TaskNotFound, 404),
    (TaskStateError, 409),
    (errors.SandboxExists, 409),
    (errors.SandboxFileExists, 409),
    (errors.SandboxFileUnsupported, 409),
    (errors.InvalidTransition, 409),
    (errors.DesktopError, 409),
    (errors.HostFileError, 409),
    (errors.SandboxPermissionError, 403),
    (errors.InvalidValue, 400),
    (errors.ConfigError, 400),
    (errors.BackendUnavailable, 503),
    (errors.AgentUnreachable, 502),
    (errors.CommandTimeout, 504),
]

#: Extra attributes some errors carry, passed through so ``except`` code keeps working.
_ATTRS = ("name", "state", "action", "kind", "exit_code", "stderr")


def status_of(exc: AivaError) -> int:
    for cls, code in STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"error": {"type", "message", "hint", "attrs"}}``; never a traceback."""
    if not isinstance(exc, AivaError):
        exc = AivaError(f"internal error in the daemon: {type(exc).__name__}: {exc}",
                        hint=f"see {log_path()}")
    name = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in ERRORS
                and ERRORS[c.__name__] is c)
    attrs = {a: getattr(exc, a) for a in _ATTRS if isinstance(getattr(exc, a, None),
                                                               str | int)}
    return {"error": {"type": name, "message": exc.message, "hint": exc.hint,
                      "attrs": attrs}}


def error_from_body(body: Any, status: int) -> AivaError:
    """Rebuild the daemon's error as the same ``AivaError`` subclass, with its hint."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return AivaError(f"the aiva daemon answered HTTP {status}: {str(body)[:300]}")
    cls = ERRORS.get(str(err.get("type")), AivaError)
    exc = cls.__new__(cls)
    AivaError.__init__(exc, str(err.get("message", "")), hint=err.get("hint"))
    if isinstance(exc, errors.RemoteError):
        exc.kind = "Error"
    if isinstance(exc, errors.CommandFailed):
        exc.exit_code, exc.stderr = -1, ""
    for key, value in (err.get("attrs") or {}).items():
        if key in _ATTRS:
            setattr(exc, key, value)
    return exc


# ---------------------------------------------------------------------- values


def exec_exit(res: ExecResult) -> dict[str, Any]:
    """The ``exit`` event: every ExecResult field but the output, which came as chunks."""
    return {"exit_code": res.exit_code, "duration": res.duration, "pid": res.pid,
            "timed_out": res.timed_out}


def exec_result(res: ExecResult) -> dict[str, Any]:
    return dataclasses.asdict(res)


def log_line(line: LogLine) -> dict[str, Any]:
    return {"ts": line.ts.isoformat(), "source": line.source, "text": line.text}


def to_log_line(d: dict[str, Any]) -> LogLine:
    return LogLine(datetime.fromisoformat(d["ts"]), str(d["source"]), str(d["text"]))


def to_metrics(d: dict[str, Any]) -> SandboxMetrics:
    fields = {f.name for f in dataclasses.fields(SandboxMetrics)}
    return SandboxMetrics(**{k: v for k, v in d.items() if k in fields})


def to_sync_report(d: dict[str, Any]) -> SyncReport:
    fields = {f.name for f in dataclasses.fields(SyncReport)}
    return SyncReport(**{k: v for k, v in d.items() if k in fields})


def line(obj: Any) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
