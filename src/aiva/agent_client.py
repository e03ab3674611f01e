"""The host side of the agent protocol: one multiplexed connection per sandbox.

All exec and file code lives here, written once; backends only provide a byte stream
(:class:`Transport`) to the agent: a Unix socket for Docker, a virtio-serial socket for
QEMU, a vsock for Firecracker, an SSH channel for remote hosts.

A reader thread demultiplexes frames into per-channel queues, so several threads (and
background processes) share one connection without blocking each other.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from aiva.agent import protocol as p
from aiva.errors import (
    AgentUnreachable,
    CommandTimeout,
    ProtocolError,
    remote_error,
)

K = p.FrameKind
OutputCallback = Callable[[str], Any]
StdinSource = bytes | str | IO[bytes] | Iterable[bytes] | None
_CLOSED = -1
#: Seconds any agent call waits for its answer (or its next frame) unless told otherwise.
DEFAULT_CALL_TIMEOUT = 60.0
#: Extra time the host waits past a command's own timeout before giving up on the agent.
TIMEOUT_GRACE = 5.0


class Transport(Protocol):
    """A reliable, ordered, bidirectional byte stream."""

    def send(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def close(self) -> None: ...


class SocketTransport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ProcessTransport:
    """The agent's stdin/stdout, e.g. ``python3 -m aiva.agent --stdio`` or ``docker exec -i``."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._in = proc.stdin
        self._out = proc.stdout

    def send(self, data: bytes) -> None:
        self._in.write(data)
        self._in.flush()

    def recv(self, n: int) -> bytes:
        return self._out.read1(n)  # type: ignore[attr-defined,no-any-return]

    def close(self) -> None:
        try:
            self._in.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # only now: closing a reader blocks while the reader thread is inside read1()
        try:
            self._out.close()
        except OSError:
            pass


def connect_unix(path: str, *, timeout: float = 10.0, alive: Callable[[], bool] | None = None
                 ) -> SocketTransport:
    """Connect to an agent socket, waiting (up to ``timeout``) for the agent to listen.

    ``alive`` lets the caller stop the wait early when the sandbox has died.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    last: OSError | None = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _connect(sock, path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            return SocketTransport(sock)
        except OSError as exc:
            sock.close()
            last = exc
        if time.monotonic() > deadline or (alive is not None and not alive()):
            raise AgentUnreachable(
                f"the sandbox agent is not answering on {path}: {last}",
                hint="check `aiva logs NAME`; the image needs python3 >= 3.8",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _connect(sock: socket.socket, path: str) -> None:
    """Connect even when ``path`` is longer than a Unix socket address may be."""
    if len(path.encode()) < 100:
        sock.connect(path)
        return
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
    finally:
        os.close(dfd)


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    pid: int
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class _Channel:
    id: int
    q: queue.SimpleQueue[tuple[int, bytes]] = field(default_factory=queue.SimpleQueue)


class _OutputCollector:
    """Decodes streamed output incrementally, keeps it, and forwards it to callbacks."""

    def __init__(self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                 on_bytes: Callable[[int, bytes], Any] | None = None, *,
                 keep: bool = True) -> None:
        import codecs

        self.keep = keep  # False: pass output on only (a long session must not pile up)
        self.parts: dict[int, list[str]] = {K.STDOUT: [], K.STDERR: []}
        self.decoders = {
            K.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            K.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.callbacks = {K.STDOUT: on_stdout, K.STDERR: on_stderr}
        self.on_bytes = on_bytes

    def feed(self, kind: int, data: bytes) -> None:
        if self.on_bytes is not None:
            self.on_bytes(kind, data)
        cb = self.callbacks[kind]
        if cb is None and not self.keep:
            return
        text = self.decoders[kind].decode(data)
        if text:
            if self.keep:
                self.parts[kind].append(text)
            if cb is not None:
                cb(text)

    def text(self, kind: int) -> str:
        tail = self.decoders[kind].decode(b"", final=True)
        if tail:
            self.parts[kind].append(tail)
        return "".join(self.parts[kind])


class ProcessHandle:
    """A command started with ``background=True``: wait for it or kill it later."""

    def __init__(self, client: AgentClient, pid: int, chan: _Channel | None,
                 collector: _OutputCollector | None) -> None:
        self.client = client
        self.pid = pid
        self._chan = chan
        self._collector = collector
        self._done = threading.Event()
        self._result: ExecResult | None = None
        self._error: BaseException | None = None
        if chan is not None:
            threading.Thread(target=self._drain, args=(chan,), daemon=True,
                             name=f"aiva-proc-{pid}").start()

    def _drain(self, chan: _Channel) -> None:
        while not self._done.is_set():
            kind, payload = chan.q.get()
            self._on_frame(kind, payload)

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind in (K.STDOUT, K.STDERR) and self._collector is not None:
            self._collector.feed(kind, payload)
        elif kind == K.RESULT:
            res = p.decode_json(payload)
            col = self._collector
            self._result = ExecResult(
                exit_code=res["exit_code"],
                stdout=col.text(K.STDOUT) if col else "",
                stderr=col.text(K.STDERR) if col else "",
                duration=res["duration"], pid=res["pid"], timed_out=res["timed_out"],
            )
            self._done.set()
        elif kind in (K.ERROR, _CLOSED):
            self._error = _error_from(kind, payload)
            self._done.set()

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the process to end; its output is what the agent kept for it."""
        finished = self._chan is not None and self._done.wait(timeout)
        if finished and self._result is not None:
            return self._result
        if self._chan is None or isinstance(self._error, AgentUnreachable):
            res = self.client.call("proc.wait", pid=self.pid,
                                   timeout=None if timeout is None else timeout)
            return ExecResult(res["exit_code"], res["stdout"], res["stderr"], res["duration"],
                              res["pid"], res["timed_out"])
        if self._error is not None:
            raise self._error
        raise CommandTimeout(f"process {self.pid} still running after {timeout}s")

    def kill(self, signal: int = 9) -> None:
        self.client.call("proc.kill", pid=self.pid, signal=signal)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def _error_from(kind: int, payload: bytes) -> Exception:
    if kind == _CLOSED:
        return AgentUnreachable(payload.decode() or "connection to the sandbox agent closed")
    try:
        err = p.decode_json(payload)
        return remote_error(str(err.get("kind", "Error")), str(err.get("message", "")))
    except ValueError:
        return ProtocolError("the agent sent an unreadable error")


class AgentClient:
    def __init__(self, transport: Transport, *, label: str = "sandbox",
                 call_timeout: float | None = None) -> None:
        self.transport = transport
        self.label = label
        self.call_timeout = DEFAULT_CALL_TIMEOUT if call_timeout is None else call_timeout
        self._channels: dict[int, _Channel] = {}
        self._ids = itertools.count(1, 2)
        self._send_lock = threading.Lock()
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"aiva-agent-{label}",
                                        daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ plumbing

    def _read_loop(self) -> None:
        decoder = p.Decoder()
        reason = "the sandbox agent closed the connection"
        try:
            while True:
                data = self.transport.recv(1 << 20)
                if not data:
                    break
                for kind, chan, payload in decoder.feed(data):
                    ch = self._channels.get(chan)
                    if ch is None:
                        continue
                    if kind in (K.RESULT, K.ERROR):
                        self._channels.pop(chan, None)
                    ch.q.put((kind, payload))
        except OSError as exc:
            reason = f"connection to the sandbox agent lost: {exc}"
        except Exception as exc:  # never die silently: fail every waiter
            reason = f"agent connection failed: {exc!r}"
        self._closed = reason
        for ch in list(self._channels.values()):
            ch.q.put((_CLOSED, reason.encode()))
        self._channels.clear()

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise AgentUnreachable(self._closed)
        try:
            with self._send_lock:
                self.transport.send(data)
        except OSError as exc:
            raise AgentUnreachable(f"cannot send to the sandbox agent: {exc}") from exc

    def _open(self, op: str, req: dict[str, Any]) -> _Channel:
        if self._closed:
            raise AgentUnreachable(self._closed, hint="is the sandbox running? `aiva status`")
        ch = _Channel(next(self._ids))
        self._channels[ch.id] = ch
        body = dict(req, op=op)
        self._send(p.encode(K.OPEN, ch.id, json.dumps(body, separators=(",", ":")).encode()))
        return ch

    def _next(self, ch: _Channel, deadline: float | None) -> tuple[int, bytes]:
        try:
            if deadline is None:
                return ch.q.get()
            return ch.q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self._channels.pop(ch.id, None)
            raise CommandTimeout(
                f"no answer from the agent in {self.label} in time",
                hint="the sandbox may be overloaded or paused; see `aiva status`",
            ) from None

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _finish(self, ch: _Channel, deadline: float | None,
                on_frame: Callable[[int, bytes], None] | None = None) -> dict[str, Any]:
        while True:
            kind, payload = self._next(ch, deadline)
            if kind == K.RESULT:
                return p.decode_json(payload)
            if kind in (K.ERROR, _CLOSED):
                raise _error_from(kind, payload)
            if on_frame is not None:
                on_frame(kind, payload)

    def call(self, op: str, *, timeout: float | None = 60.0, **req: Any) -> dict[str, Any]:
        """A request with one JSON answer."""
        ch = self._open(op, req)
        return self._finish(ch, self._deadline(timeout))

    def close(self) -> None:
        if not self._closed:
            self._closed = "the connection was closed by the client"
        self.transport.close()
        self._reader.join(timeout=2)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # ------------------------------------------------------------------ exec

    def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        cwd_default: bool = False,
        user: str | None = None,
        timeout: float | None = None,
        stdin: StdinSource = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_bytes: Callable[[int, bytes], Any] | None = None,
        background: bool = False,
        keep_output: bool = True,
    ) -> ExecResult | ProcessHandle:
        req: dict[str, Any] = {"argv": argv, "stdin": stdin is not None}
        if env:
            req["env"] = env
        if cwd:
            req["cwd"] = cwd
            req["cwd_default"] = cwd_default
        if user:
            req["user"] = user
        if timeout:
            req["timeout"] = timeout
        if background:
            req["background"] = True
        ch = self._open("exec", req)
        collector = _OutputCollector(on_stdout, on_stderr, on_bytes, keep=keep_output)
        if stdin is not None:
            self._feed_stdin(ch, stdin)
        deadline = self._deadline(None if timeout is None else timeout + TIMEOUT_GRACE)
        kind, payload = self._next(ch, deadline)
        if kind != K.EVENT:
            raise _error_from(kind, payload) if kind in (K.ERROR, _CLOSED) else ProtocolError(
                f"unexpected frame {kind} before the process started")
        pid = int(p.decode_json(payload)["started"])
        if background:
            return ProcessHandle(self, pid, ch, collector)
        res = self._finish(ch, deadline, collector.feed)
        return ExecResult(
            exit_code=res["exit_code"],
            stdout=collector.text(K.STDOUT),
            stderr=collector.text(K.STDERR),
            duration=res["duration"],
            pid=pid,
            timed_out=res["timed_out"],
        )

    def _feed_stdin(self, ch: _Channel, stdin: StdinSource) -> None:
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if isinstance(stdin, bytes | bytearray | memoryview):
            data = bytes(stdin)
            for i in range(0, len(data), p.CHUNK):
                self._send(p.encode(K.STDIN, ch.id, data[i:i + p.CHUNK]))
            self._send(p.encode(K.EOF, ch.id, bytes([K.STDIN])))
            return

        source: IO[bytes] | Iterable[bytes] = stdin  # type: ignore[assignment]

        def pump() -> None:
            try:
                for chunk in _chunks(source):
                    self._send(p.encode(K.STDIN, ch.id, chunk))
                self._send(p.encode(K.EOF, ch.id, bytes([K.STDIN])))
            except Exception:  # the command ended or the link dropped; the caller sees it
                return

        threading.Thread(target=pump, daemon=True, name="aiva-stdin").start()

    def signal(self, pid: int, signal: int) -> None:
        self.call("proc.kill", pid=pid, signal=signal)

    # ------------------------------------------------------------------ files

    def read_stream(self, path: str, *, timeout: float | None = 300.0
                    ) -> tuple[dict[str, Any], Iterator[bytes]]:
        """Start reading a file: its stat now, its bytes as an iterator of chunks."""
        ch = self._open("fs.read", {"path": path})
        deadline = self._deadline(timeout)
        kind, payload = self._next(ch, deadline)
        if kind != K.EVENT:
            raise _error_from(kind, payload)
        meta = p.decode_json(payload)

        def chunks() -> Iterator[bytes]:
            while True:
                kind, payload = self._next(ch, deadline)
                if kind == K.DATA:
                    yield payload
                elif kind == K.RESULT:
                    return
                else:
                    raise _error_from(kind, payload)

        return meta, chunks()

    def read_file(self, path: str, *, timeout: float | None = 300.0) -> bytes:
        _, chunks = self.read_stream(path, timeout=timeout)
        return b"".join(chunks)

    def write_file(
        self,
        path: str,
        data: bytes | str | IO[bytes] | Iterable[bytes],
        *,
        mode: int | None = None,
        mtime_ns: int | None = None,
        mkdirs: bool = True,
        append: bool = False,
        timeout: float | None = 300.0,
    ) -> int:
        """Write a file atomically (temp file + rename), streamed in chunks."""
        req: dict[str, Any] = {"path": path, "mkdirs": mkdirs}
        if mode is not None:
            req["mode"] = mode
        if mtime_ns is not None:
            req["mtime_ns"] = mtime_ns
        if append:
            req["append"] = True
        ch = self._open("fs.write", req)
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes | bytearray | memoryview):
            view = memoryview(data)
            for i in range(0, len(view), p.CHUNK * 4):
                self._send(p.encode(K.DATA, ch.id, bytes(view[i:i + p.CHUNK * 4])))
        else:
            for chunk in _chunks(data):
                if ch.id not in self._channels:
                    break  # the agent already failed this write
                self._send(p.encode(K.DATA, ch.id, chunk))
        self._send(p.encode(K.EOF, ch.id, bytes([K.DATA])))
        return int(self._finish(ch, self._deadline(timeout))["bytes"])

    def stat(self, path: str) -> dict[str, Any]:
        return self.call("fs.stat", path=path)

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return list(self.call("fs.list", path=path)["entries"])

    def walk(self, path: str, *, timeout: float | None = 300.0
             ) -> tuple[dict[str, list[int]], list[str]]:
        """All regular files under ``path``: relpath -> [size, mtime_ns, mode]; and dirs."""
        ch = self._open("fs.walk", {"path": path})
        files: dict[str, list[int]] = {}
        dirs: list[str] = []

        def on_frame(kind: int, payload: bytes) -> None:
            if kind == K.EVENT:
                batch = p.decode_json(payload)
                files.update(batch.get("files", {}))
                dirs.extend(batch.get("dirs", []))

        self._finish(ch, self._deadline(timeout), on_frame)
        return files, dirs

    def hash_files(self, root: str, paths: list[str]) -> dict[str, str | None]:
        return dict(self.call("fs.hash", root=root, paths=paths, timeout=600)["hashes"])

    def mkdir(self, path: str, *, parents: bool = True) -> None:
        self.call("fs.mkdir", path=path, parents=parents)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self.call("fs.remove", path=path, recursive=recursive)

    def rename(self, src: str, dst: str) -> None:
        self.call("fs.rename", src=src, dst=dst)

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        return self.call("ping", timeout=timeout)

    def metrics(self) -> dict[str, Any]:
        return self.call("sys.metrics")


def _chunks(source: IO[bytes] | Iterable[bytes]) -> Iterator[bytes]:
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            chunk = read(p.CHUNK * 4)
            if not chunk:
                return
            yield chunk
    else:
        for chunk in source:
            for i in range(0, len(chunk), p.CHUNK * 4):
                yield chunk[i:i + p.CHUNK * 4]
