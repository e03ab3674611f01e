"""Run, start, stop and inspect the daemon process.

``serve`` runs one uvicorn server per listener in a single asyncio loop, over the same
app and engine: the Unix socket ``AIVA_HOME/daemon.sock`` (0600, no token) and, with a
port, TCP on 127.0.0.1 (bearer token). A lock file keeps it to one daemon per AIVA_HOME.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from aiva import __version__, paths
from aiva.daemon import wire
from aiva.daemon.bridge import end_streams
from aiva.paths import aiva_home

if TYPE_CHECKING:
    from aiva.engine import Engine
    from aiva.mcp.http import McpEndpoint
from aiva.daemon.wire import daemon_running
from aiva.errors import AivaError, BackendUnavailable
from aiva.guard.private import ensure_home, open_private, write_private

log = logging.getLogger("aiva.daemon")
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def serve(port: int | None = None, *, mcp_allow_dirs: list[str] | None = None) -> None:
    """Run the daemon in this process until SIGTERM or SIGINT. ``mcp_allow_dirs`` and the
    config's ``mcp.allow_dirs``: the host directories ``/mcp``'s sync may touch."""
    from aiva.config import load_config
    from aiva.daemon.app import Gate, create_app
    from aiva.engine import Engine
    from aiva.mcp.grants import Grants

    grants = Grants.resolve(mcp_allow_dirs or [], load_config().mcp.allow_dirs)

    home = ensure_home()
    # held (locked) for the daemon's whole life
    lock = os.fdopen(open_private(paths.daemon_lock(), os.O_WRONLY | os.O_CREAT), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AivaError(f"an aiva daemon already runs for {home}",
                        hint="see `aiva daemon status`; stop it with `aiva daemon stop`"
                        ) from None
    token = wire.ensure_token()
    mcp_token = wire.ensure_token(wire.mcp_token_path())
    unix = _bind_unix(wire.socket_path())
    tcp = _bind_tcp(port) if port is not None else None
    port = tcp.getsockname()[1] if tcp is not None else None
    engine = Engine()
    try:
        states = _reconcile_all(engine)
        engine.store.record("daemon_started", None, pid=os.getpid(), port=port,
                            version=__version__, sandboxes=states)
        write_private(wire.pid_path(), f"{os.getpid()}\n")
        write_private(wire.state_path(), json.dumps({
            "pid": os.getpid(), "port": port, "started_at": time.time(),
            "version": __version__, "socket": str(wire.socket_path())}))
        app = create_app(engine, port=port, mcp_grants=grants)
        listeners: list[tuple[Gate, socket.socket]] = [(Gate(app, token=None), unix)]
        if tcp is not None:
            listeners.append((Gate(app, token=token, mcp_token=mcp_token), tcp))
        servers = [(_Server(uvicorn.Config(
            gate, lifespan="off", log_config=None, access_log=False, interface="asgi3",
            timeout_graceful_shutdown=3)), sock) for gate, sock in listeners]
        log.info("aiva daemon %s (pid %d) on %s%s; mcp granted: %s", __version__,
                 os.getpid(), wire.socket_path(), f" and 127.0.0.1:{port}" if port else "",
                 ", ".join(str(d) for d in grants.dirs) or "none")
        asyncio.run(_run(servers, engine, app.state.mcp))
    finally:
        engine.close()
        for path in (wire.socket_path(), wire.pid_path(), wire.state_path()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        lock.close()
        log.info("aiva daemon stopped")


def _reconcile_all(engine: Any) -> dict[str, str]:
    """``Engine.list_all()``, one sandbox at a time, so one bad backend cannot stop the
    daemon from starting: it adopts what still runs and marks what died."""
    states: dict[str, str] = {}
    for sb in engine.list_all(reconcile=False):
        try:
            sb = engine.reconcile(sb)
        except AivaError as exc:
            log.warning("cannot reconcile %s: %s", sb.name, exc)
        states[sb.name] = sb.state.value
    return states


def _bind_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # stale: the lock proves no daemon owns it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: never a moment others may connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _bind_tcp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise AivaError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}",
                        hint="pick another --port") from exc
    return sock


class _Server(uvicorn.Server):
    """Signals are handled once for all servers by :func:`_run`, not per server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _run(servers: list[tuple[_Server, socket.socket]], engine: Engine,
               mcp: McpEndpoint | None = None) -> None:
    """Serve every listener, with the metrics sampler, the lifetimes pass and the task
    scheduler (``aiva.tasks.scheduler``) beside them, until a signal. MCP
    sessions end first, so their open streams do not hold up the servers' shutdown."""
    from aiva.engine.lifetimes import run_lifetimes
    from aiva.observe.collector import run_sampler
    from aiva.tasks.scheduler import run_scheduler

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    settings = engine.config.collector
    sampler = asyncio.create_task(
        run_sampler(engine, settings.interval, settings.retention, stop))
    lifetimes = asyncio.create_task(run_lifetimes(engine, 2.0, stop))
    # the task queue: scheduler tick every second, the warm pool's maintain every 5 s
    tasks = asyncio.create_task(run_scheduler(engine, stop))

    def shut_down() -> None:
        stop.set()
        if mcp is not None:
            mcp.close()
        end_streams(BackendUnavailable(
            "the aiva daemon is shutting down", hint="start it again with `aiva daemon start`"))
        for server, _ in servers:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shut_down)
    try:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))
    finally:
        stop.set()
        if mcp is not None:
            await mcp.wait_closed()
        await sampler
        await lifetimes
        await tasks  # running tasks go back to the queue, their commands killed


# ---------------------------------------------------------------------- control


def start(port: int | None = None, *, foreground: bool = False, timeout: float = 60.0,
          mcp_allow_dirs: list[str] | None = None) -> dict[str, Any]:
    """Start the daemon (detached unless ``foreground``) and wait until it answers."""
    if daemon_running():
        raise AivaError(f"an aiva daemon already runs for {aiva_home()}",
                        hint="see `aiva daemon status`; stop it with `aiva daemon stop`")
    if foreground:
        serve(port, mcp_allow_dirs=mcp_allow_dirs)
        return {"running": False}
    ensure_home()
    cmd = [sys.executable, "-m", "aiva.daemon"]
    if port is not None:
        cmd += ["--port", str(port)]
    for d in mcp_allow_dirs or []:  # absolute: the daemon's directory is not the caller's
        cmd += ["--mcp-allow-dir", os.path.abspath(os.path.expanduser(d))]
    log_fd = open_private(wire.log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with os.fdopen(log_fd, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "AIVA_NO_DAEMON": "1"})
    _spawned[proc.pid] = proc
    write_private(wire.pid_path(), f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while not daemon_running(timeout=0.5, answer_timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise BackendUnavailable(
                f"the aiva daemon did not start (exit code {proc.returncode}): {_log_tail()}",
                hint=f"see {wire.log_path()}")
        time.sleep(0.02)
    return status()


def stop(timeout: float = 10.0) -> bool:
    """SIGTERM the recorded daemon (only if that pid really is one), then SIGKILL."""
    pid = recorded_pid()
    stopped = False
    if pid is not None and is_daemon(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            log.warning("daemon %d ignored SIGTERM; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        stopped = True
    if not daemon_running():
        for path in (wire.pid_path(), wire.state_path()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return stopped


def status() -> dict[str, Any]:
    """pid, uptime, socket, port, version and sandbox count; ``running`` False if none."""
    from aiva.daemon.client import RemoteEngine

    if not daemon_running():
        return {"running": False, "socket": str(wire.socket_path()), "pid": None}
    with RemoteEngine() as remote:
        return {"running": True, **remote.daemon_info()}


def recorded_pid() -> int | None:
    try:
        return int(wire.pid_path().read_text().strip())
    except (OSError, ValueError):
        return None


def is_daemon(pid: int) -> bool:
    """Is ``pid`` a live aiva daemon process (and not a reused pid)?"""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"aiva.daemon" in args and state != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        proc = _spawned.get(pid)
        if proc is not None and proc.poll() is not None:
            _spawned.pop(pid, None)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not is_daemon(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _log_tail(n: int = 5) -> str:
    try:
        lines = wire.log_path().read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-n:])
