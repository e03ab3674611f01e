"""``aiva mcp run -- COMMAND...``: a stdio MCP server inside a fresh sandbox, bridged to ours.

Any MCP client config can swap ``npx some-server`` for ``aiva mcp run -- npx some-server``:
the client talks to this process's stdin and stdout as it would to the server, and the
server runs in a sandbox with no network unless asked (``--network nat`` or
``allow=HOST,...``). The bridge never changes a byte; it only reads the lines going past
to write the audit trail (:mod:`aiva.mcp.audit`) into the event stream. When the client
hangs up (stdin ends), the server gets EOF, then SIGTERM, then SIGKILL, and the sandbox
is destroyed unless ``keep``.

This runs on the in-process engine even when a daemon is up: the bridge needs the
agent's stream itself. The sandbox and its events land in the same store, so the daemon
and the dashboard see them.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from aiva.agent.protocol import FrameKind
from aiva.agent_client import ExecResult, ProcessHandle
from aiva.engine import Engine
from aiva.errors import AivaError, CommandTimeout, InvalidValue
from aiva.mcp.audit import KIND, Auditor, LineSplitter

EXIT_GRACE = 5.0  # seconds a server may take to exit after its stdin closed
TERM_GRACE = 3.0  # then after SIGTERM, before SIGKILL
MCP_LABEL = "aiva.mcp"


@dataclass
class RunOptions:
    command: list[str]
    name: str | None = None
    template: str | None = None
    image: str | None = None
    network: str = "none"
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    cpus: float | None = None
    memory: str | None = None
    keep: bool = False


def default_name(command: list[str]) -> str:
    """``mcp-<program>-<4 hex>``: says what runs in it, and never collides."""
    prog = os.path.basename(command[0]) if command else "server"
    if prog in ("npx", "uvx", "python3", "python", "node", "pipx") and len(command) > 1:
        prog = next((os.path.basename(a) for a in command[1:] if not a.startswith("-")), prog)
    slug = re.sub(r"[^a-z0-9-]+", "-", prog.lower()).strip("-")[:24] or "server"
    return f"mcp-{slug}-{secrets.token_hex(2)}"


class Bridge:
    """Our stdin -> the server's stdin, the server's stdout -> our stdout, stderr to
    stderr; every line in either direction goes past the auditor."""

    def __init__(self, auditor: Auditor, stdin: IO[bytes], stdout: IO[bytes],
                 stderr: IO[bytes]) -> None:
        self.auditor = auditor
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.client_gone = threading.Event()
        self._from_client, self._from_server = LineSplitter(), LineSplitter()
        self._lock = threading.Lock()

    def client_chunks(self) -> Iterator[bytes]:
        """What the client writes, as it comes; ends (and marks the client gone) on EOF."""
        fd = self.stdin.fileno()
        try:
            while chunk := os.read(fd, 65536):
                with self._lock:
                    for line in self._from_client.feed(chunk):
                        self.auditor.see("client", line)
                yield chunk
        except OSError:
            pass
        finally:
            self.client_gone.set()

    def on_output(self, kind: int, data: bytes) -> None:
        if kind == FrameKind.STDERR:
            self._write(self.stderr, data)
            return
        self._write(self.stdout, data)
        with self._lock:
            for line in self._from_server.feed(data):
                self.auditor.see("server", line)

    def _write(self, out: IO[bytes], data: bytes) -> None:
        try:
            out.write(data)
            out.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.client_gone.set()  # nobody reads any more: end the session

    def close(self) -> None:
        with self._lock:
            for sender, splitter in (("client", self._from_client),
                                     ("server", self._from_server)):
                if rest := splitter.rest():
                    self.auditor.see(sender, rest)  # type: ignore[arg-type]
            self.auditor.close()


def run(engine: Engine, opts: RunOptions, *, stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None,
        say: Any = None) -> int:
    """Create the sandbox, run the server, bridge until either side ends; returns the
    server's exit code (or 1 if the sandbox could not be made)."""
    if not opts.command:
        raise InvalidValue("no server command given", hint="aiva mcp run -- COMMAND ARGS...")
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    tell = say or (lambda msg: None)
    name = opts.name or default_name(opts.command)
    spec = engine.build_spec(template=opts.template, image=opts.image, network=opts.network,
                             cpus=opts.cpus, memory=opts.memory, mounts=opts.mounts,
                             labels={MCP_LABEL: "run"})
    t0 = time.monotonic()
    sb = engine.create(name, spec)
    try:
        tell(f"sandbox {name} ready in {time.monotonic() - t0:.1f}s "
             f"(network {spec.network}); running {' '.join(opts.command)}")
        auditor = Auditor(lambda rec: engine.record(name, KIND, **rec))
        bridge = Bridge(auditor, stdin, stdout, stderr)
        engine.record(name, "mcp_session", state="started", command=opts.command)
        proc = engine.exec(name, opts.command, env=opts.env or None, cwd=opts.cwd,
                           stdin=bridge.client_chunks(), on_bytes=bridge.on_output,
                           background=True, keep_output=False)
        assert isinstance(proc, ProcessHandle)
        result = _serve(proc, bridge)
        bridge.close()
        engine.record(name, "mcp_session", state="ended", exit_code=result.exit_code)
        return result.exit_code
    finally:
        if opts.keep:
            tell(f"kept sandbox {sb.name}: `aiva mcp audit {sb.name}`, `aiva rm {sb.name}`")
        else:
            _destroy(engine, name, tell)


def _serve(proc: ProcessHandle, bridge: Bridge) -> ExecResult:
    """Until the server exits, or the client is gone and the server does not follow."""
    gone_at: float | None = None
    signals = [(EXIT_GRACE, signal.SIGTERM), (EXIT_GRACE + TERM_GRACE, signal.SIGKILL)]
    while True:
        try:
            return proc.wait(timeout=0.25)
        except CommandTimeout:
            pass
        if not bridge.client_gone.is_set():
            continue
        gone_at = gone_at or time.monotonic()
        while signals and time.monotonic() - gone_at >= signals[0][0]:
            _, sig = signals.pop(0)
            try:
                proc.kill(int(sig))
            except AivaError:
                pass


def _destroy(engine: Engine, name: str, tell: Any) -> None:
    """Delete the sandbox; Ctrl-C, SIGTERM or SIGHUP arriving meanwhile must not leak it
    (MCP clients send SIGTERM 2 s after closing our stdin)."""
    blocked = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    main = threading.current_thread() is threading.main_thread()
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in blocked} if main else {}
    try:
        engine.delete(name, volumes=True)
        tell(f"sandbox {name} destroyed")
    except AivaError as exc:
        tell(f"could not destroy {name}: {exc}")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
