"""aiva's sandboxes as MCP tools: ``aiva mcp serve`` (stdio) and the daemon's ``/mcp``.

Every tool is a thin call into an engine: the in-process :class:`~aiva.engine.Engine`, or
the daemon's ``RemoteEngine`` (the same methods), so the tools behave the same either way.
Each call runs on a thread of its own (:func:`aiva.daemon.bridge.run_sync`), so a command
that runs for minutes never blocks the protocol or other calls.

What goes back to the agent is bounded (:mod:`aiva.mcp.limits`): output cut to a byte
budget with a note, timeouts capped. An :class:`~aiva.errors.AivaError` comes back as a
tool error (``isError``) with its message and hint, never as a traceback.
"""

from __future__ import annotations

import base64
import binascii
import functools
import inspect
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, ParamSpec

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
    UnexpectedToolError,
)
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from aiva import __version__
from aiva.agent_client import ExecResult
from aiva.config import format_size
from aiva.daemon.bridge import run_sync
from aiva.engine.spec_rules import spec_warnings
from aiva.errors import AivaError, InvalidValue, SandboxFileNotFound, SandboxNotFound
from aiva.mcp.grants import Grants
from aiva.mcp.limits import Limits, clip_output, file_window, window_note
from aiva.mcp.scope import Scope
from aiva.models import check_name

if TYPE_CHECKING:
    from aiva.agent_client.sync import SyncReport
    from aiva.backends.base import LogLine
    from aiva.engine import Engine
    from aiva.models import SandboxInfo

log = logging.getLogger("aiva.mcp")
P = ParamSpec("P")

INSTRUCTIONS = """\
aiva runs isolated Linux sandboxes (containers or microVMs) for you.
Make one with sandbox_create, run commands in it with exec, move files with file_read,
file_write and sync, save and roll back with snapshot_create / snapshot_restore.
A sandbox stays until sandbox_destroy: destroy the ones you made when you are done.
Relative paths inside a sandbox are relative to its workdir (/workspace).
Output is cut to a budget; for large output redirect it to a file and read that with
file_read and offset. Errors come with a hint saying what to do next.
The recent log of a sandbox (commands, their output, the guest's syslog) is the resource
aiva://sandboxes/{name}/logs."""

# ---------------------------------------------------------------------- outputs


class SandboxOut(BaseModel):
    name: str
    id: str
    state: str = Field(description="creating, running, paused, stopping, stopped or error")
    backend: str
    image: str
    cpus: float
    memory: str
    network: str
    runtime: str = Field(default="runc", description="runc, or gvisor (gVisor's own kernel)")
    workdir: str
    ports: list[str] = Field(description="published ports, HOST:PORT->GUEST")
    error: str | None = None
    created_at: str


class CreateOut(SandboxOut):
    warnings: list[str] = Field(
        default_factory=list, description="what the sandbox's settings give away of the host")


class SandboxListOut(BaseModel):
    sandboxes: list[SandboxOut]


class DestroyOut(BaseModel):
    destroyed: str


class ExecOut(BaseModel):
    exit_code: int = Field(description="the command's exit code; negative: killed by a signal")
    stdout: str
    stderr: str
    duration: float = Field(description="seconds")
    timed_out: bool = Field(description="killed at the timeout (with its process group)")
    truncated: bool = Field(description="stdout or stderr was cut to the output budget")
    stdout_bytes: int = Field(description="bytes the command wrote to stdout, kept or not")
    stderr_bytes: int
    timeout: float = Field(description="the timeout the command ran with, in seconds")


class FileReadOut(BaseModel):
    path: str
    size: int = Field(description="the whole file, in bytes")
    offset: int
    length: int = Field(description="bytes of the file in content")
    encoding: Literal["text", "base64"]
    content: str
    truncated: bool = Field(description="more of the file follows: read on from next_offset")
    next_offset: int | None


class FileWriteOut(BaseModel):
    path: str
    bytes: int


class FileEntry(BaseModel):
    name: str
    type: str = Field(description="file, dir, symlink or other")
    size: int
    mode: str = Field(description="permission bits in octal")
    modified: str


class FileListOut(BaseModel):
    path: str
    entries: list[FileEntry]
    total: int
    truncated: bool


class SyncOut(BaseModel):
    local: str
    remote: str
    direction: str
    pushed: list[str]
    pulled: list[str]
    deleted_local: list[str]
    deleted_remote: list[str]
    conflicts: list[str] = Field(description="changed on both sides: left alone unless prefer")
    bytes_sent: int
    bytes_received: int
    unchanged: int
    duration: float
    truncated: bool = Field(description="a path list was cut to the entry budget")


class SnapshotOut(BaseModel):
    sandbox: str
    tag: str
    created_at: str
    memory: bool = Field(description="true: processes and memory too (VMs); false: files only")


class SnapshotListOut(BaseModel):
    snapshots: list[SnapshotOut]


# ---------------------------------------------------------------------- arguments

SandboxArg = Annotated[str, Field(description="the sandbox's name")]
PathArg = Annotated[str, Field(
    description="a path inside the sandbox; relative paths start at its workdir")]


# ---------------------------------------------------------------------- results


def _result(model: BaseModel, text: str | None = None) -> CallToolResult:
    data = model.model_dump(mode="json")
    return CallToolResult(
        content=[TextContent(type="text", text=text if text is not None
                             else json.dumps(data, indent=1, ensure_ascii=False))],
        structured_content=data)


#: CLI commands in a hint, and what an agent has instead (it has no shell on the host)
_TOOL_FOR = [
    (re.compile(r"`aiva rm ([^`\s]+)[^`]*`"), r"the sandbox_destroy tool (sandbox \1)"),
    (re.compile(r"`aiva (?:status|inspect) ([^`\s]+)[^`]*`"), r"sandbox_status (sandbox \1)"),
    (re.compile(r"`aiva ls[^`]*`"), "sandbox_list"),
    (re.compile(r"`aiva exec ([^`\s]+)[^`]*`"), r"the exec tool (sandbox \1)"),
    (re.compile(r"`aiva snapshot ([^`\s]+)[^`]*`"), r"snapshot_create (sandbox \1)"),
    (re.compile(r"`aiva restore ([^`\s]+)[^`]*`"), r"snapshot_restore (sandbox \1)"),
    (re.compile(r"`aiva (?:cp|data) [^`]*`"), "file_read, file_write or sync"),
    (re.compile(r"`aiva logs ([^`\s]+)[^`]*`"), r"the resource aiva://sandboxes/\1/logs"),
]


def agent_hint(hint: str | None) -> str | None:
    """A hint worded for an MCP client: each ``aiva ...`` command it could not run
    becomes the tool that does the same; one no tool does is marked as the user's."""
    if not hint:
        return hint
    for pattern, tool in _TOOL_FOR:
        hint = pattern.sub(tool, hint)
    return re.sub(r"`(aiva [^`]+)`", r"`\1` (a command for the user, not a tool)", hint)


def error_result(exc: BaseException) -> CallToolResult:
    """A tool error the agent can act on: the error's kind, message and hint."""
    hint: str | None
    if isinstance(exc, SandboxNotFound):  # its own hint names CLI commands
        message, hint = exc.message, "sandbox_list shows the names; sandbox_create makes one"
    elif isinstance(exc, SandboxFileNotFound):
        message, hint = exc.message, "file_list shows what a directory holds"
    elif isinstance(exc, AivaError):
        message, hint = exc.message, agent_hint(exc.hint)
    elif isinstance(exc, OSError) and exc.strerror:
        message = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        hint = None
    else:
        message, hint = str(exc) or type(exc).__name__, None
    kind = type(exc).__name__
    text = f"{kind}: {message}" + (f"\nhint: {hint}" if hint else "")
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content={"error": {"type": kind, "message": message, "hint": hint}},
        is_error=True)


def _guarded(fn: Callable[P, Awaitable[CallToolResult]]) -> Callable[P, Awaitable[CallToolResult]]:
    """Errors the agent can act on become tool errors; anything else is the SDK's crash
    path (a generic error to the client, the traceback in the server's log)."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> CallToolResult:
        try:
            return await fn(*args, **kwargs)
        except (AivaError, OSError, ValueError) as exc:  # ValueError: also bad base64 ...
            log.info("mcp tool %s failed: %s", fn.__name__, exc)
            return error_result(exc)

    return call


class _Server(MCPServer):
    """The SDK's server, with arguments that fail the input schema answered as one line
    naming the argument (not a raw pydantic dump with a URL)."""

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            return _bad_arguments(name, cause)


def _bad_arguments(tool: str, err: ValidationError) -> CallToolResult:
    problems = []
    for e in err.errors():
        where = ".".join(str(part) for part in e["loc"]) or "arguments"
        problems.append(f"missing argument '{where}'" if e["type"] == "missing"
                        else f"argument '{where}': {e['msg']}")
    message = f"{tool}: " + "; ".join(problems)
    hint = "tools/list gives each tool's arguments and their types"
    return CallToolResult(
        content=[TextContent(type="text", text=f"InvalidArguments: {message}\nhint: {hint}")],
        structured_content={"error": {"type": "InvalidArguments", "message": message,
                                      "hint": hint}},
        is_error=True)


def _with_context(fn: Callable[..., Awaitable[Any]], scope: Scope) -> Callable[..., Any]:
    """``fn`` with one more keyword parameter, ``ctx: Context``, that the SDK fills in;
    the call runs with its session as the current one (``Scope.enter``)."""
    sig = inspect.signature(fn, eval_str=True)  # the SDK reads the annotations from here

    @functools.wraps(fn)
    async def call(*args: Any, ctx: Context, **kwargs: Any) -> Any:
        token = scope.enter(scope.session_of(ctx))
        try:
            return await fn(*args, **kwargs)
        finally:
            scope.leave(token)

    param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)
    call.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[*sig.parameters.values(), param])
    call.__annotations__ = {**fn.__annotations__, "ctx": Context}
    return call


def _in_session(fn: Callable[P, Awaitable[CallToolResult]], scope: Scope
                ) -> Callable[P, Awaitable[CallToolResult]]:
    return _with_context(fn, scope)


def _resource_in_session(scope: Scope) -> Callable[[Callable[..., Awaitable[str]]],
                                                   Callable[..., Awaitable[str]]]:
    return lambda fn: _with_context(fn, scope)


def sandbox_out(sb: SandboxInfo, cls: type[SandboxOut] = SandboxOut) -> SandboxOut:
    spec = sb.spec
    return cls(
        name=sb.name, id=sb.id, state=sb.state.value, backend=spec.backend, image=spec.image,
        cpus=spec.cpus, memory=format_size(spec.memory), network=spec.network,
        runtime=spec.runtime, workdir=spec.workdir,
        ports=[str(p) for p in sb.runtime.get("ports") or []],
        error=sb.error, created_at=sb.created_at.isoformat())


def _inside(workdir: str, path: str) -> str:
    if not path:
        raise InvalidValue("the path is empty", hint="give a path inside the sandbox")
    return path if path.startswith("/") else posixpath.normpath(f"{workdir}/{path}")


def _snapshot_out(snap: dict[str, Any]) -> SnapshotOut:
    return SnapshotOut(sandbox=str(snap.get("sandbox", "")), tag=str(snap["tag"]),
                       created_at=str(snap.get("created_at", "")),
                       memory=bool(snap.get("memory", False)))


def format_log_line(line: LogLine) -> str:
    stamp = line.ts.strftime("%H:%M:%S.%f")[:-3]
    text = line.text.rstrip("\n")
    if line.source == "cmd":
        return f"{stamp} $ {text}"
    if line.source == "exit":
        return f"{stamp} exit {text}"
    if line.source in ("stdout", "stderr"):
        return f"{stamp} {line.source}: {text}"
    return f"{stamp} [{line.source}] {text}"


def clip_log(lines: list[LogLine], limit: int) -> str:
    """Log lines as text in ``limit`` bytes: each line cut to a share of it, then the
    newest lines kept (a command's huge output cannot push out everything else)."""
    per_line = max(256, limit // 16)
    text = "\n".join(clip_line(format_log_line(line), per_line) for line in lines)
    data = text.encode()
    if len(data) <= limit:
        return text
    cut = data[len(data) - limit:].decode("utf-8", "ignore")
    cut = cut[cut.find("\n") + 1:] if "\n" in cut else cut  # start at a whole line
    return f"[... {len(data) - len(cut.encode())} earlier bytes omitted ...]\n{cut}"


def clip_line(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    head = data[:limit].decode("utf-8", "ignore")
    return f"{head} [... {len(data) - len(head.encode())} more bytes]"


def _exec_text(out: ExecOut) -> str:
    head = f"exit code {out.exit_code} ({out.duration:.2f}s)"
    if out.timed_out:
        head += f"; timed out after {out.timeout:g}s, its process group was killed"
    parts = [head]
    if out.stdout:
        parts.append(f"--- stdout ---\n{out.stdout}")
    if out.stderr:
        parts.append(f"--- stderr ---\n{out.stderr}")
    if not out.stdout and not out.stderr:
        parts.append("(no output)")
    return "\n".join(parts)


# ---------------------------------------------------------------------- server


def build_server(engine: Engine, limits: Limits | None = None,
                 grants: Grants | None = None, scope: Scope | None = None) -> MCPServer:
    """The MCP server over ``engine``: tools, and the logs as resources. ``grants``: the
    host directories the ``sync`` tool may touch (none by default); no other tool
    touches a host path. ``scope``: which sandboxes a session reaches (by default only
    those it created, see :mod:`aiva.mcp.scope`)."""
    lim = limits or Limits()
    allowed = grants or Grants()
    mine = scope or Scope()
    server: MCPServer = _Server(
        name="aiva", title="aiva sandboxes", version=__version__, instructions=INSTRUCTIONS)
    budget = format_size(lim.max_output)

    def tool(name: str, description: str, *, read_only: bool = False,
             destructive: bool = False, idempotent: bool = False
             ) -> Callable[[Callable[P, Awaitable[CallToolResult]]],
                           Callable[P, Awaitable[CallToolResult]]]:
        def register(fn: Callable[P, Awaitable[CallToolResult]]
                     ) -> Callable[P, Awaitable[CallToolResult]]:
            guarded = _in_session(_guarded(fn), mine)
            server.add_tool(guarded, name=name, description=description,
                            annotations=ToolAnnotations(
                                read_only_hint=read_only, destructive_hint=destructive,
                                idempotent_hint=idempotent, open_world_hint=False))
            return guarded

        return register

    async def owned(sandbox: str) -> SandboxInfo:
        """The sandbox, if this session may use it (else: no such sandbox)."""
        return mine.check(await run_sync(engine.get, sandbox))

    async def resolve(sandbox: str, path: str) -> str:
        """An absolute path in the sandbox: a relative one starts at its workdir."""
        sb = await owned(sandbox)
        if path.startswith("/"):
            return posixpath.normpath(path)
        return _inside(sb.spec.workdir, path)

    # ------------------------------------------------------------------ lifecycle

    @tool("sandbox_create", "Create and start a sandbox: an isolated Linux machine with "
          "python3, where you can run commands and keep files. Returns its name and state. "
          "No host directory is mounted into it and no port is published beyond this "
          "machine. Destroy it with sandbox_destroy when done.")
    async def sandbox_create(
        name: Annotated[str | None, Field(
            description="letters, digits, '_', '.', '-'; default: a new sb-xxxxxxxx")] = None,
        template: Annotated[str | None, Field(
            description="minimal, python (the default image) or desktop")] = None,
        image: Annotated[str | None, Field(
            description="a local container image instead of a template")] = None,
        cpus: Annotated[float | None, Field(description="CPU cores, e.g. 1 or 0.5")] = None,
        memory: Annotated[str | None, Field(description="e.g. 512MB or 2GB")] = None,
        network: Annotated[str, Field(
            description="nat: outbound network; none: no network at all; "
                        "allow=HOST[:PORT],...: only those destinations")] = "nat",
        timeout: Annotated[float | None, Field(
            description="seconds of life, then it stops (enforced by the aiva daemon)")] = None,
        runtime: Annotated[Literal["runc", "gvisor"] | None, Field(
            description="runc (default), or gvisor: a user-space kernel between the code "
                        "and the host's, for code nobody has read (Docker only)")] = None,
    ) -> Annotated[CallToolResult, SandboxOut]:
        labels = mine.labels()  # read here: the session is this coroutine's

        def create() -> CreateOut:
            spec = engine.build_spec(template=template, image=image, cpus=cpus, memory=memory,
                                     network=network, timeout=timeout, labels=labels,
                                     runtime=runtime)
            sb = engine.create(check_name(name or f"sb-{uuid.uuid4().hex[:8]}"), spec)
            out = sandbox_out(sb, CreateOut)
            assert isinstance(out, CreateOut)
            out.warnings = spec_warnings(sb.spec)
            return out

        return _result(await run_sync(create))

    @tool("sandbox_list", "List all sandboxes with their state.", read_only=True)
    async def sandbox_list() -> Annotated[CallToolResult, SandboxListOut]:
        boxes = [sb for sb in await run_sync(engine.list_all) if mine.sees(sb)]
        return _result(SandboxListOut(sandboxes=[sandbox_out(sb) for sb in boxes]))

    @tool("sandbox_status", "One sandbox's state (checked against what really runs), "
          "resources, ports and error if any.", read_only=True)
    async def sandbox_status(sandbox: SandboxArg) -> Annotated[CallToolResult, SandboxOut]:
        await owned(sandbox)
        return _result(sandbox_out(await run_sync(engine.status, sandbox)))

    @tool("sandbox_destroy", "Stop and remove a sandbox with all its files and snapshots. "
          "Cannot be undone.", destructive=True)
    async def sandbox_destroy(sandbox: SandboxArg) -> Annotated[CallToolResult, DestroyOut]:
        await owned(sandbox)
        await run_sync(engine.delete, sandbox, volumes=True)
        return _result(DestroyOut(destroyed=sandbox))

    # ------------------------------------------------------------------ exec

    @tool("exec", "Run a command in a running sandbox and wait for it. Returns exit code, "
          f"stdout, stderr and duration. Each stream keeps at most {budget} (head and tail "
          "with a note in between); redirect large output to a file and use file_read. "
          f"Timeout: {lim.exec_timeout:g}s unless given, at most {lim.max_exec_timeout:g}s. "
          "A non-zero exit code is a normal result, not a tool error.")
    async def exec_(
        sandbox: SandboxArg,
        command: Annotated[str | list[str], Field(
            description="a shell command line, run with /bin/sh -c (pipes, &&, redirects "
                        "work); or an argv array, run without a shell")],
        cwd: Annotated[str | None, Field(
            description="working directory; default: the sandbox's workdir")] = None,
        env: Annotated[dict[str, str] | None, Field(
            description="extra environment variables")] = None,
        timeout: Annotated[float | None, Field(
            description="seconds until the command's process group is killed")] = None,
        stdin: Annotated[str | None, Field(
            description="text for the command's standard input")] = None,
    ) -> Annotated[CallToolResult, ExecOut]:
        if not command or (isinstance(command, list) and not command[0]):
            raise InvalidValue("the command is empty", hint='e.g. "ls -la" or ["ls", "-la"]')
        limit = lim.timeout_for(timeout)
        if cwd is not None:
            cwd = await resolve(sandbox, cwd)
        await owned(sandbox)
        res = await run_sync(engine.exec, sandbox, command, env=env, cwd=cwd, timeout=limit,
                             stdin=stdin)
        assert isinstance(res, ExecResult)
        out, err = (clip_output(res.stdout, lim.max_output, stream="stdout"),
                    clip_output(res.stderr, lim.max_output, stream="stderr"))
        result = ExecOut(exit_code=res.exit_code, stdout=out.text, stderr=err.text,
                         duration=round(res.duration, 3), timed_out=res.timed_out,
                         truncated=out.truncated or err.truncated, stdout_bytes=out.total,
                         stderr_bytes=err.total, timeout=limit)
        return _result(result, _exec_text(result))

    # ------------------------------------------------------------------ files

    @tool("file_read", f"Read a file from a sandbox: UTF-8 text as is, anything else as "
          f"base64. At most {budget} per call; read on with offset=next_offset.",
          read_only=True)
    async def file_read(
        sandbox: SandboxArg,
        path: PathArg,
        offset: Annotated[int, Field(ge=0, description="first byte to read")] = 0,
        length: Annotated[int | None, Field(
            description="bytes to read; default and maximum: the output budget")] = None,
        encoding: Annotated[Literal["auto", "text", "base64"], Field(
            description="auto: text if the bytes are UTF-8, else base64; text: invalid bytes "
                        "replaced; base64: always")] = "auto",
    ) -> Annotated[CallToolResult, FileReadOut]:
        want = lim.max_output if length is None else min(max(length, 0), lim.max_output)
        full = await resolve(sandbox, path)

        def read() -> tuple[bytes, int]:
            meta, chunks = engine.read_stream(sandbox, full)
            kept = bytearray()
            pos = 0
            try:
                for chunk in chunks:
                    start, end = max(offset - pos, 0), min(offset + want - pos, len(chunk))
                    if end > start:
                        kept += chunk[start:end]
                    pos += len(chunk)
                    if pos >= offset + want:
                        break  # the window is full: the rest is never read
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # an abandoned stream cancels its channel in the agent
            return bytes(kept), max(pos, int(meta.get("size", 0)))

        data, size = await run_sync(read)
        w = file_window(data, offset=offset, size=size, encoding=encoding)
        result = FileReadOut(path=full, size=w.size, offset=w.offset, length=w.length,
                             encoding=w.encoding, content=w.content, truncated=w.truncated,
                             next_offset=w.next_offset)
        text = w.content if w.encoding == "text" else (
            f"base64 of {w.length} bytes from offset {w.offset}:\n{w.content}")
        return _result(result, text + window_note(w))

    @tool("file_write", "Write a file in a sandbox (created or replaced atomically; parent "
          "directories are made).", idempotent=True)
    async def file_write(
        sandbox: SandboxArg,
        path: PathArg,
        content: Annotated[str, Field(description="the whole new content")],
        encoding: Annotated[Literal["text", "base64"], Field(
            description="text (written as UTF-8) or base64 for binary content")] = "text",
        mode: Annotated[str | None, Field(
            description="permission bits in octal, e.g. 755 for a script")] = None,
    ) -> Annotated[CallToolResult, FileWriteOut]:
        try:
            data = (base64.b64decode(content, validate=True) if encoding == "base64"
                    else content.encode())
        except binascii.Error:
            raise InvalidValue("content is not valid base64",
                               hint='send encoding="text" for plain text') from None
        try:
            bits = None if mode is None else int(mode, 8)
        except ValueError:
            raise InvalidValue(f"mode '{mode}' is not octal", hint="e.g. 644 or 755") from None
        full = await resolve(sandbox, path)
        n = await run_sync(engine.write_file, sandbox, full, data, mode=bits)
        return _result(FileWriteOut(path=full, bytes=n))

    @tool("file_list", "List a directory in a sandbox: name, type, size, mode, modified.",
          read_only=True)
    async def file_list(
        sandbox: SandboxArg,
        path: Annotated[str, Field(
            description="a directory inside the sandbox; default: its workdir")] = ".",
    ) -> Annotated[CallToolResult, FileListOut]:
        full = await resolve(sandbox, path)
        entries = await run_sync(engine.list_dir, sandbox, full)
        shown = [FileEntry(name=str(e["name"]), type=str(e.get("type", "other")),
                           size=int(e.get("size", 0)), mode=f"{int(e.get('mode', 0)):o}",
                           modified=datetime.fromtimestamp(float(e.get("mtime", 0)),
                                                           UTC).isoformat())
                 for e in entries[:lim.max_entries]]
        return _result(FileListOut(path=full, entries=shown, total=len(entries),
                                   truncated=len(entries) > len(shown)))

    @tool("sync", "Sync a directory on the machine running this MCP server with a "
          "directory in a sandbox; only changed files cross. push: local to sandbox, pull: "
          "sandbox to local, both: each way (changes on both sides are conflicts). "
          f"{allowed.describe()}")
    async def sync(
        sandbox: SandboxArg,
        local: Annotated[str, Field(
            description="absolute path of a directory on the server's machine, at or "
                        "below a granted directory")],
        remote: PathArg,
        direction: Annotated[Literal["push", "pull", "both"], Field(
            description="push, pull or both")] = "both",
        exclude: Annotated[list[str] | None, Field(
            description="gitignore-style patterns to leave out, e.g. [\".git\", \"*.pyc\"]")
        ] = None,
        delete: Annotated[bool, Field(
            description="also delete files on the other side that were deleted")] = False,
        prefer: Annotated[Literal["local", "remote", "newer"] | None, Field(
            description="how to resolve conflicts; default: leave them and report them")
        ] = None,
    ) -> Annotated[CallToolResult, SyncOut]:
        path = str(allowed.check(local))  # before anything touches the host
        full = await resolve(sandbox, remote)
        report: SyncReport = await run_sync(engine.sync, sandbox, path, full,
                                            direction=direction, delete=delete,
                                            exclude=exclude, prefer=prefer)
        n = lim.max_entries
        lists = (report.pushed, report.pulled, report.deleted_local, report.deleted_remote,
                 report.conflicts)
        return _result(SyncOut(
            local=path, remote=full, direction=direction, pushed=report.pushed[:n],
            pulled=report.pulled[:n], deleted_local=report.deleted_local[:n],
            deleted_remote=report.deleted_remote[:n], conflicts=report.conflicts[:n],
            bytes_sent=report.bytes_sent, bytes_received=report.bytes_received,
            unchanged=report.unchanged, duration=round(report.duration, 3),
            truncated=any(len(x) > n for x in lists)))

    # ------------------------------------------------------------------ snapshots

    @tool("snapshot_create", "Save a running or stopped sandbox under a tag, to restore "
          "later. On containers only the files are saved, not running processes.")
    async def snapshot_create(
        sandbox: SandboxArg,
        tag: Annotated[str | None, Field(description="default: a timestamp")] = None,
    ) -> Annotated[CallToolResult, SnapshotOut]:
        await owned(sandbox)
        return _result(_snapshot_out(await run_sync(engine.snapshot, sandbox, tag)))

    @tool("snapshot_list", "A sandbox's snapshots, oldest first.", read_only=True)
    async def snapshot_list(sandbox: SandboxArg) -> Annotated[CallToolResult, SnapshotListOut]:
        await owned(sandbox)
        snaps = await run_sync(engine.snapshots, sandbox)
        return _result(SnapshotListOut(snapshots=[_snapshot_out(s) for s in snaps]))

    @tool("snapshot_restore", "Put a sandbox back to one of its snapshots, in place: "
          "changes made since are lost.", destructive=True, idempotent=True)
    async def snapshot_restore(
        sandbox: SandboxArg,
        tag: Annotated[str, Field(description="the snapshot's tag (see snapshot_list)")],
    ) -> Annotated[CallToolResult, SandboxOut]:
        await owned(sandbox)
        return _result(sandbox_out(await run_sync(engine.restore, sandbox, tag)))

    # ------------------------------------------------------------------ resources

    @server.resource("aiva://sandboxes", name="sandboxes", mime_type="application/json",
                     description="The sandboxes of this session with their state, as JSON "
                                 "(over HTTP with several sessions: the sandbox_list tool).")
    async def sandboxes_resource() -> str:
        # a static resource has no session: on stdio it is the server's one session
        token = mine.enter(mine.fallback)
        try:
            boxes = [sb for sb in await run_sync(engine.list_all)
                     if mine.all_sandboxes or (mine.one_session() and mine.sees(sb))]
        except AivaError as exc:
            raise ResourceError(_resource_message(exc)) from None
        finally:
            mine.leave(token)
        return json.dumps([sandbox_out(sb).model_dump(mode="json") for sb in boxes],
                          indent=1)

    @server.resource("aiva://sandboxes/{name}/logs{?tail}", name="sandbox_logs",
                     mime_type="text/plain",
                     description="A sandbox's recent log, oldest first: its commands and "
                                 "their output, the engine's log and the guest's syslog. "
                                 f"?tail=N lines (default {lim.log_lines}).")
    @_resource_in_session(mine)
    async def logs_resource(name: str, tail: int = lim.log_lines) -> str:
        try:
            await owned(name)
            lines = await run_sync(engine.logs, name, tail=max(1, tail))
        except SandboxNotFound as exc:
            raise ResourceNotFoundError(_resource_message(exc)) from None
        except AivaError as exc:
            raise ResourceError(_resource_message(exc)) from None
        return clip_log(lines, lim.max_output) or "(no log lines yet)"

    return server


def _resource_message(exc: AivaError) -> str:
    return exc.message + (f" (hint: {exc.hint})" if exc.hint else "")


# ---------------------------------------------------------------------- stdio


def serve_stdio(limits: Limits | None = None, allow_dirs: list[str] | None = None,
                all_sandboxes: bool = False) -> None:
    """``aiva mcp serve``: the server on stdin/stdout until the client closes them.

    Nothing but protocol reaches stdout (the SDK diverts fd 1 to stderr while it serves);
    the SDK's own log goes to ``AIVA_HOME/aiva.log``, its warnings also to stderr.
    ``allow_dirs`` (``--allow-dir``) and the config's ``mcp.allow_dirs`` are the host
    directories ``sync`` may touch, resolved now."""
    import signal

    import anyio

    from aiva.engine import default_engine
    from aiva.observe.logquery import log_handler

    # the CLI lets SIGPIPE kill it (for `aiva ls | head`); a server must see EPIPE instead
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    root = logging.getLogger()
    if not root.handlers:  # keeps the SDK from installing its own (rich, INFO) handler
        root.addHandler(logging.NullHandler())
    sdk = logging.getLogger("mcp")
    sdk.setLevel(logging.INFO)
    sdk.addHandler(log_handler())
    console = logging.StreamHandler()
    console.setLevel(logging.WARNING)
    sdk.addHandler(console)

    from aiva.config import load_config

    settings = load_config().mcp
    grants = Grants.resolve(allow_dirs or [], settings.allow_dirs)
    engine = default_engine()
    if limits is None:
        limits = Limits.from_settings(settings)
    scope = Scope(all_sandboxes=all_sandboxes or settings.all_sandboxes)
    server = build_server(engine, limits, grants, scope)
    log.info("mcp serve (stdio) over %s engine; granted: %s; sandboxes: %s",
             type(engine).__name__, ", ".join(str(d) for d in grants.dirs) or "none",
             "all" if scope.all_sandboxes else "its own")
    try:
        anyio.run(server.run_stdio_async)
    finally:
        engine.close()
