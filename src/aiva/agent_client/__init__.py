"""The host side of the agent protocol: one multiplexed connection per sandbox.

All exec and file code lives here, written once; backends only provide a byte stream
(:class:`Transport`) to the agent: a Unix socket for Docker, a virtio-serial socket for
QEMU, a vsock for Firecracker, an SSH channel for remote hosts.

A reader thread demultiplexes frames into per-channel queues, so several threads (and
background processes) share one connection without blocking each other.

The agent lives in the sandbox, so it is treated as an adversary: every reply is checked
(:mod:`aiva.agent_client.replies`), every wait has a deadline, every buffer a cap. A channel's
queue holds at most ``channel_buffer`` bytes; when it is full the reader stops reading the
connection, so a slow consumer slows the agent instead of growing host memory. A call
whose caller stops listening (an iterator closed or dropped, a timeout, Ctrl-C) is
cancelled on the agent with ``SIGNAL {"cancel": true}``.
"""

from __future__ import annotations

import codecs
import enum
import errno
import itertools
import json
import os
import queue
import select
import socket
import stat
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Protocol

from aiva.agent import protocol as p
from aiva.agent_client import replies as r
from aiva.errors import (
    AgentError,
    AgentUnreachable,
    AivaError,
    CommandTimeout,
    ProtocolError,
    remote_error,
)

K = p.FrameKind
OutputCallback = Callable[[str], Any]
StdinSource = bytes | str | IO[bytes] | Iterable[bytes] | None
_CLOSED = -1  # pseudo frame kinds a channel's queue may end with
_STALLED = -2
#: Seconds any agent call waits for its answer (or its next frame) unless told otherwise.
DEFAULT_CALL_TIMEOUT = 60.0
#: Extra time the host waits past a command's own timeout before giving up on the agent.
TIMEOUT_GRACE = 5.0
#: Bytes queued per channel before the reader stops reading the connection.
DEFAULT_CHANNEL_BUFFER = 8 << 20
#: Bytes of each output stream of one command kept in memory (its head and its tail).
DEFAULT_EXEC_OUTPUT = 16 << 20
#: Files and directories one walk (or listing) may return.
DEFAULT_WALK_ENTRIES = 1_000_000
_STOP_POLL = 0.25  # seconds between looks at an exec's ``stop`` event


class Transport(Protocol):
    """A reliable, ordered, bidirectional byte stream."""

    def send(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def close(self) -> None: ...


def _send_all(fd: int, data: bytes, timeout: float | None,
              write: Callable[[memoryview], int]) -> None:
    """Write all of ``data`` without blocking past ``timeout``: a peer that stops reading
    cannot hold a sending thread forever."""
    deadline = None if timeout is None else time.monotonic() + timeout
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[write(view):]
            continue
        except (BlockingIOError, InterruptedError):
            pass
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, f"the peer took nothing for {timeout}s")
        poller.poll(None if left is None else max(1, int(left * 1000)))


class SocketTransport:
    """A connected stream socket. ``sock`` stays reachable so a backend can check whom it
    reached (``SO_PEERCRED``) before trusting the connection."""

    def __init__(self, sock: socket.socket, *, send_timeout: float | None = DEFAULT_CALL_TIMEOUT
                 ) -> None:
        self.sock = sock
        self.send_timeout = send_timeout

    def send(self, data: bytes) -> None:
        sock = self.sock
        _send_all(sock.fileno(), data, self.send_timeout,
                  lambda view: sock.send(view, socket.MSG_DONTWAIT))

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

    def __init__(self, proc: subprocess.Popen[bytes], *,
                 send_timeout: float | None = DEFAULT_CALL_TIMEOUT) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._in = proc.stdin
        self._out = proc.stdout
        self.send_timeout = send_timeout
        self._in_fd = self._in.fileno()
        os.set_blocking(self._in_fd, False)  # sends are bounded: see _send_all

    def send(self, data: bytes) -> None:
        fd = self._in_fd
        _send_all(fd, data, self.send_timeout, lambda view: os.write(fd, view))

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

    The path is opened without following a link and must be a socket: the directory it
    sits in is one the sandbox can write, so it could plant ``agent.sock -> some host
    socket``; that is refused, never connected. ``alive`` lets the caller stop the wait
    early when the sandbox has died.
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
        except BaseException:
            sock.close()
            raise
        if time.monotonic() > deadline or (alive is not None and not alive()):
            raise AgentUnreachable(
                f"the sandbox agent is not answering on {path}: {last}",
                hint="check `aiva logs NAME`; the image needs python3 >= 3.8",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _connect(sock: socket.socket, path: str) -> None:
    """Connect to the socket inode at ``path`` itself, never through a symlink; by its
    descriptor, so a path longer than a socket address may be works too."""
    if not hasattr(os, "O_PATH"):  # not Linux: check, then connect (no fd-relative way)
        st = os.lstat(path)
        _check_socket(path, st.st_mode)
        sock.connect(path)
        return
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_socket(path, os.fstat(fd).st_mode)
        sock.connect(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _check_socket(path: str, mode: int) -> None:
    if stat.S_ISSOCK(mode):
        return
    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a socket"
    raise ProtocolError(
        f"{path} is {what}, not the agent's socket; refusing to connect through it",
        hint="something in the sandbox replaced the agent's socket; restart the sandbox")


@dataclass
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    duration: float
    pid: int
    timed_out: bool = False
    truncated: bool = False  # output was cut to limits.exec_output (a marker says where)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# --------------------------------------------------------------------------- buffers


class _ChannelQueue:
    """One channel's frames, at most ``cap`` payload bytes of them (one frame always fits).

    ``put`` blocks the reader thread while the queue is full, which stops it reading the
    connection: that is the backpressure. Once closed (the consumer is gone) frames are
    dropped, and ``last`` — the channel's end — is still delivered.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._items: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition(threading.RLock())

    def put(self, item: tuple[int, bytes], timeout: float | None = None) -> bool:
        """Queue ``item``; False if the consumer let it stay full for ``timeout``."""
        n = len(item[1])
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed and self._items and self._bytes + n > self.cap:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            if not self._closed:
                self._items.append(item)
                self._bytes += n
                self._cond.notify_all()
            return True

    def close(self, last: tuple[int, bytes] | None = None) -> None:
        with self._cond:
            if last is not None and not (self._closed and self._ends()):
                self._items.append(last)
            self._closed = True
            self._cond.notify_all()

    def _ends(self) -> bool:
        return bool(self._items) and self._items[-1][0] in (_CLOSED, _STALLED)

    def get(self, timeout: float | None = None) -> tuple[int, bytes]:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._closed:  # cancelled: nothing more will come
                    return _CLOSED, b"the call was cancelled"
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise queue.Empty
                self._cond.wait(left)
            item = self._items.popleft()
            self._bytes -= len(item[1])
            self._cond.notify_all()
            return item

    def get_nowait(self) -> tuple[int, bytes]:
        return self.get(0)

    def empty(self) -> bool:
        return not self._items

    @property
    def queued(self) -> int:
        return self._bytes


class _Channel:
    def __init__(self, id: int, cap: int = DEFAULT_CHANNEL_BUFFER) -> None:
        self.id = id
        self.q = _ChannelQueue(cap)
        self.in_callback = False  # its consumer is busy in the caller's own code

    @contextmanager
    def busy(self) -> Iterator[None]:
        """While the caller's callback runs (e.g. writing output to a pipe nobody reads
        yet), a full queue waits for it: the host is slow, not the agent."""
        self.in_callback = True
        try:
            yield
        finally:
            self.in_callback = False


class OutputBuffer:
    """Up to ``cap`` bytes of one output stream: its first and its last half; what lies
    between is counted and replaced, when read, by a line saying how much was cut."""

    def __init__(self, cap: int = DEFAULT_EXEC_OUTPUT, what: str = "output") -> None:
        self.what = what
        self.cap = cap
        self._head_cap = cap // 2
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_len = 0
        self.dropped = 0

    def add(self, data: bytes) -> None:
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if not data:
            return
        self._tail.append(data)
        self._tail_len += len(data)
        while self._tail_len > self._tail_cap:
            excess = self._tail_len - self._tail_cap
            first = self._tail[0]
            if len(first) <= excess:
                self._tail.popleft()
                cut = len(first)
            else:
                self._tail[0] = first[excess:]
                cut = excess
            self._tail_len -= cut
            self.dropped += cut

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    def text(self) -> str:
        head = bytes(self._head)
        tail = b"".join(self._tail)
        if not self.dropped:
            return (head + tail).decode("utf-8", "replace")
        return (head.decode("utf-8", "replace") + cut_marker(self.dropped, self.what)
                + tail.decode("utf-8", "replace"))


def cut_marker(dropped: int, what: str = "output") -> str:
    return (f"\n[aiva: {dropped} bytes of {what} cut here; limits.exec_output keeps the "
            f"first and last part]\n")


def cap_text(text: str, cap: int, what: str = "output") -> tuple[str, bool]:
    """``text`` cut to ``cap`` bytes as :class:`OutputBuffer` would; and whether it was."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= cap:
        return text, False
    buf = OutputBuffer(cap, what)
    buf.add(raw)
    return buf.text(), True


class _OutputCollector:
    """Decodes streamed output incrementally, keeps a capped copy, and forwards it all to
    callbacks (they see every byte; only what is kept is cut)."""

    def __init__(self, on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                 on_bytes: Callable[[int, bytes], Any] | None = None, *,
                 keep: bool = True, cap: int = DEFAULT_EXEC_OUTPUT) -> None:
        self.keep = keep  # False: pass output on only (a long session must not pile up)
        self.kept = {K.STDOUT: OutputBuffer(cap, "stdout"), K.STDERR: OutputBuffer(cap, "stderr")}
        self.decoders = {
            K.STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
            K.STDERR: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self.callbacks = {K.STDOUT: on_stdout, K.STDERR: on_stderr}
        self.on_bytes = on_bytes

    def feed(self, kind: int, data: bytes) -> None:
        if kind not in self.kept:
            raise ProtocolError(f"the sandbox agent sent frame kind {kind} inside a command")
        if self.on_bytes is not None:
            self.on_bytes(kind, data)
        if self.keep:
            self.kept[kind].add(data)
        cb = self.callbacks[kind]
        if cb is not None:
            text = self.decoders[kind].decode(data)
            if text:
                cb(text)

    def text(self, kind: int) -> str:
        cb = self.callbacks[kind]
        if cb is not None:
            tail = self.decoders[kind].decode(b"", final=True)
            if tail:
                cb(tail)
        return self.kept[kind].text() if self.keep else ""

    @property
    def truncated(self) -> bool:
        return any(b.truncated for b in self.kept.values())


# --------------------------------------------------------------------------- processes


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
        try:
            while not self._done.is_set():
                # no deadline of its own: it may run for days; a dead agent still ends it
                kind, payload = self.client._next(chan, None)
                with chan.busy():
                    self._on_frame(kind, payload)
        except AivaError as exc:
            self._error = exc
            self._done.set()
        except Exception as exc:  # a callback failed: stop listening, say why
            self.client._cancel(chan)
            self._error = AgentError(f"reading process {self.pid}'s output failed: {exc!r}")
            self._done.set()

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind in (K.STDOUT, K.STDERR) and self._collector is not None:
            self._collector.feed(kind, payload)
        elif kind == K.RESULT:
            res = r.exec_result(r.json_object(payload, "exec result"))
            if res["pid"] != self.pid:
                raise r.fail("exec result", f"pid {res['pid']} for process {self.pid}")
            col = self._collector
            self._result = ExecResult(
                exit_code=res["exit_code"],
                stdout=col.text(K.STDOUT) if col else "",
                stderr=col.text(K.STDERR) if col else "",
                duration=res["duration"], pid=res["pid"], timed_out=res["timed_out"],
                truncated=col.truncated if col else False,
            )
            self._done.set()
        elif kind in (K.ERROR, _CLOSED, _STALLED):
            self._error = _error_from(kind, payload)
            self._done.set()
        elif kind not in (K.STDOUT, K.STDERR):
            raise r.fail("process output", f"frame kind {kind}")

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the process to end; its output is what the agent kept for it."""
        finished = self._chan is not None and self._done.wait(timeout)
        if finished and self._result is not None:
            return self._result
        if self._chan is None or isinstance(self._error, AgentUnreachable):
            return self.client.wait_process(self.pid, timeout=timeout)
        if self._error is not None:
            raise self._error
        raise CommandTimeout(f"process {self.pid} still running after {timeout}s")

    def kill(self, signal: int = 9) -> None:
        self.client.call("proc.kill", pid=self.pid, signal=signal)

    @property
    def done(self) -> bool:
        return self._done.is_set()


def _error_from(kind: int, payload: bytes) -> AivaError:
    """The error a channel ended with: the agent's own, a lost link, or a stall."""
    if kind == _CLOSED:
        return AgentUnreachable(payload.decode(errors="replace")
                                or "connection to the sandbox agent closed")
    if kind == _STALLED:
        return CommandTimeout(payload.decode(errors="replace"))
    if kind != K.ERROR:
        return r.fail("answer", f"frame kind {kind} where a result belongs")
    try:
        err_kind, message = r.error(r.json_object(payload, "error report"))
    except ProtocolError as exc:
        return exc
    return remote_error(err_kind, message)


class _Unset(enum.Enum):
    TOKEN = 0


_UNSET = _Unset.TOKEN


class _FileChunks(Iterator[bytes]):
    """A file's bytes as the agent sends them, never more than it declared. Closing it,
    or dropping it unfinished, cancels the read on the agent."""

    def __init__(self, client: AgentClient, ch: _Channel, size: int,
                 deadline: float | None) -> None:
        self._client = client
        self._ch: _Channel | None = ch
        self._size = size
        self._deadline = deadline
        self._got = 0

    def __iter__(self) -> _FileChunks:
        return self

    def __next__(self) -> bytes:
        ch = self._ch
        if ch is None:
            raise StopIteration
        client = self._client
        try:
            kind, payload = client._next(ch, client._frame_deadline(self._deadline))
            if kind == K.DATA:
                self._got += len(payload)
                if self._got > self._size:
                    raise r.fail("file", f"more than the {self._size} bytes it declared")
                return payload
            if kind == K.RESULT:
                sent = r.integer(r.json_object(payload, "read result"), "bytes", "read result")
                if sent != self._got:
                    raise r.fail("read result", f"{sent} bytes claimed, {self._got} sent")
                self._ch = None
                raise StopIteration
            raise _error_from(kind, payload)
        except BaseException:
            if self._ch is not None:
                self.close()
            raise

    def close(self) -> None:
        ch, self._ch = self._ch, None
        if ch is not None:
            self._client._cancel(ch)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- the client


class AgentClient:
    def __init__(self, transport: Transport, *, label: str = "sandbox",
                 call_timeout: float | None = None, channel_buffer: int | None = None,
                 exec_output: int | None = None, walk_entries: int | None = None) -> None:
        self.transport = transport
        self.label = label
        self.call_timeout = DEFAULT_CALL_TIMEOUT if call_timeout is None else call_timeout
        self.channel_buffer = channel_buffer or DEFAULT_CHANNEL_BUFFER
        self.exec_output = exec_output or DEFAULT_EXEC_OUTPUT
        self.walk_entries = walk_entries or DEFAULT_WALK_ENTRIES
        if hasattr(transport, "send_timeout"):
            transport.send_timeout = self.call_timeout
        self.dropped_frames = 0  # frames for channels nobody listens to (late or bogus)
        self.cancels_sent = 0
        self._channels: dict[int, _Channel] = {}
        self._ids = itertools.count(1, 2)
        self._send_lock = threading.Lock()
        self._closed: str | None = None
        self._cancels: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name=f"aiva-agent-{label}",
                                        daemon=True)
        self._reader.start()
        threading.Thread(target=self._cancel_loop, name=f"aiva-agent-cancel-{label}",
                         daemon=True).start()

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
                    self._deliver(kind, chan, payload)
        except OSError as exc:
            reason = f"connection to the sandbox agent lost: {exc}"
        except Exception as exc:  # never die silently: fail every waiter
            reason = f"agent connection failed: {exc!r}"
        if not self._closed:
            self._closed = reason
        for ch in list(self._channels.values()):
            ch.q.close((_CLOSED, self._closed.encode()))
        self._channels.clear()
        self._cancels.put(None)

    def _deliver(self, kind: int, chan: int, payload: bytes) -> None:
        ch = self._channels.get(chan)
        if ch is None:
            self.dropped_frames += 1
            return
        if kind in (K.RESULT, K.ERROR):
            self._channels.pop(chan, None)
        while not ch.q.put((kind, payload), timeout=self.call_timeout):
            if not ch.in_callback:  # nobody takes from it: a held, abandoned stream
                self._cancel(ch, (_STALLED, (
                    f"the reader of a call to {self.label} took nothing for "
                    f"{self.call_timeout:g}s; the call was cancelled").encode()))
                return

    def _cancel(self, ch: _Channel, last: tuple[int, bytes] | None = None) -> None:
        """Forget a channel; if the agent still serves it, tell it to stop (from another
        thread: this may run in a finalizer or in the reader itself)."""
        if self._channels.pop(ch.id, None) is not None and not self._closed:
            self._cancels.put(ch.id)
        ch.q.close(last)

    def _cancel_loop(self) -> None:
        while True:
            chan = self._cancels.get()
            if chan is None:
                return
            try:
                self._send(p.encode_json(K.SIGNAL, chan, {"cancel": True}))
                self.cancels_sent += 1
            except AivaError:
                pass

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise AgentUnreachable(self._closed)
        try:
            with self._send_lock:
                self.transport.send(data)
        except TimeoutError as exc:  # half a frame may be out: the stream is unusable
            self._broken(f"the sandbox agent took nothing for {self.call_timeout:g}s")
            raise AgentUnreachable(f"cannot send to the sandbox agent in {self.label}: "
                                   "it stopped reading") from exc
        except OSError as exc:
            raise AgentUnreachable(f"cannot send to the sandbox agent: {exc}") from exc

    def _broken(self, reason: str) -> None:
        if not self._closed:
            self._closed = reason
        threading.Thread(target=self.transport.close, daemon=True).start()

    def _open(self, op: str, req: dict[str, Any]) -> _Channel:
        if self._closed:
            raise AgentUnreachable(self._closed, hint="is the sandbox running? `aiva status`")
        ch = _Channel(next(self._ids), self.channel_buffer)
        self._channels[ch.id] = ch
        body = dict(req, op=op)
        try:
            self._send(p.encode(K.OPEN, ch.id, json.dumps(body, separators=(",", ":")).encode()))
        except BaseException:
            self._channels.pop(ch.id, None)
            raise
        return ch

    def _next(self, ch: _Channel, deadline: float | None,
              stop: threading.Event | None = None) -> tuple[int, bytes]:
        """The channel's next frame by ``deadline``; with none, wait as long as the agent
        answers a ping whenever nothing came for ``call_timeout``. Any failure here (a
        timeout, Ctrl-C, ``stop`` set) cancels the channel."""
        try:
            idle_since = time.monotonic()
            while True:
                now = time.monotonic()
                if deadline is not None:
                    until = deadline
                else:
                    until = idle_since + self.call_timeout
                if stop is not None:
                    if stop.is_set():
                        raise AgentError("the call was cancelled: its caller went away")
                    until = min(until, now + _STOP_POLL)
                try:
                    return ch.q.get(timeout=max(0.0, until - now))
                except queue.Empty:
                    pass
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise CommandTimeout(
                        f"no answer from the agent in {self.label} in time",
                        hint="the sandbox may be overloaded or paused; see `aiva status`")
                if deadline is None and now >= idle_since + self.call_timeout:
                    self._probe()
                    idle_since = time.monotonic()
        except BaseException:
            self._cancel(ch)
            raise

    def _probe(self) -> None:
        """Whether the agent still answers (it does while a command runs). It may wait up
        to twice ``call_timeout``: the reader can be held that long by another call's
        stalled consumer before that call is cancelled."""
        try:
            self.ping(timeout=2 * self.call_timeout)
        except (CommandTimeout, AgentUnreachable) as exc:
            raise AgentUnreachable(
                f"the agent in {self.label} sent nothing for {self.call_timeout:g}s and "
                f"does not answer a ping: {exc}",
                hint="the sandbox may be paused, overloaded, or its agent replaced") from exc

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _frame_deadline(self, overall: float | None) -> float:
        """When a stream's next frame must have come: a stalled stream times out."""
        soon = time.monotonic() + self.call_timeout
        return soon if overall is None else min(soon, overall)

    def _timeout(self, timeout: float | _Unset | None) -> float | None:
        return self.call_timeout if isinstance(timeout, _Unset) else timeout

    def _finish(self, ch: _Channel, deadline: float | None,
                on_frame: Callable[[int, bytes], None] | None = None, *,
                per_frame: bool = False, stop: threading.Event | None = None,
                what: str = "answer") -> dict[str, Any]:
        """Frames until the channel's RESULT (a JSON object) or its error."""
        while True:
            kind, payload = self._next(
                ch, self._frame_deadline(deadline) if per_frame else deadline, stop)
            try:
                if kind == K.RESULT:
                    return r.json_object(payload, what)
                if kind in (K.ERROR, _CLOSED, _STALLED):
                    raise _error_from(kind, payload)
                if on_frame is None:
                    raise r.fail(what, f"frame kind {kind} where a result belongs")
                with ch.busy():
                    on_frame(kind, payload)
            except BaseException:
                self._cancel(ch)
                raise

    def call(self, op: str, *, timeout: float | _Unset | None = _UNSET, **req: Any
             ) -> dict[str, Any]:
        """A request with one JSON answer, by ``timeout`` (default: ``call_timeout``;
        None: no deadline, but the agent must keep answering pings)."""
        ch = self._open(op, req)
        return self._finish(ch, self._deadline(self._timeout(timeout)), what=f"{op} answer")

    def close(self) -> None:
        if not self._closed:
            self._closed = "the connection was closed by the client"
        reason = self._closed.encode()
        for ch in list(self._channels.values()):
            ch.q.close((_CLOSED, reason))  # wakes a reader blocked on a full queue
        self.transport.close()
        self._cancels.put(None)
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
        stop: threading.Event | None = None,
    ) -> ExecResult | ProcessHandle:
        """Run a command. The output kept in the result is cut to ``exec_output`` bytes a
        stream (head and tail); callbacks see all of it. With ``timeout`` the host gives up
        ``TIMEOUT_GRACE`` after it; without, it waits while the agent answers pings.
        ``stop`` set (e.g. the caller went away) cancels a foreground command."""
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
        collector = _OutputCollector(on_stdout, on_stderr, on_bytes, keep=keep_output,
                                     cap=self.exec_output)
        ch = self._open("exec", req)
        try:
            if stdin is not None:
                self._feed_stdin(ch, stdin)
            deadline = self._deadline(None if timeout is None else timeout + TIMEOUT_GRACE)
            kind, payload = self._next(ch, self._frame_deadline(deadline), stop)
            if kind != K.EVENT:
                raise _error_from(kind, payload)
            pid = r.started(r.json_object(payload, "exec start"))
            if background:
                return ProcessHandle(self, pid, ch, collector)
            res = r.exec_result(self._finish(ch, deadline, collector.feed, stop=stop,
                                             what="exec result"))
            if res["pid"] != pid:
                raise r.fail("exec result", f"pid {res['pid']} for process {pid}")
        except BaseException:
            self._cancel(ch)
            raise
        return ExecResult(
            exit_code=res["exit_code"],
            stdout=collector.text(K.STDOUT),
            stderr=collector.text(K.STDERR),
            duration=res["duration"],
            pid=pid,
            timed_out=res["timed_out"],
            truncated=collector.truncated,
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
                    if ch.id not in self._channels:
                        return  # the command ended or was cancelled
                    self._send(p.encode(K.STDIN, ch.id, chunk))
                self._send(p.encode(K.EOF, ch.id, bytes([K.STDIN])))
            except Exception:  # the command ended or the link dropped; the caller sees it
                return

        threading.Thread(target=pump, daemon=True, name="aiva-stdin").start()

    def signal(self, pid: int, signal: int) -> None:
        self.call("proc.kill", pid=pid, signal=signal)

    def processes(self) -> list[dict[str, Any]]:
        """The processes the agent knows: ``pid``, ``exit_code`` (None while running)."""
        return r.processes(self.call("proc.list"), self.walk_entries)

    def wait_process(self, pid: int, *, timeout: float | None = None) -> ExecResult:
        """Ask the agent for a background process's end and the output it kept."""
        res = r.wait_result(self.call("proc.wait", pid=pid, timeout=timeout))
        out, cut_out = cap_text(res["stdout"], self.exec_output, "stdout")
        err, cut_err = cap_text(res["stderr"], self.exec_output, "stderr")
        return ExecResult(res["exit_code"], out, err, res["duration"], res["pid"],
                          res["timed_out"], truncated=cut_out or cut_err)

    # ------------------------------------------------------------------ files

    def read_stream(self, path: str, *, timeout: float | None = None
                    ) -> tuple[dict[str, Any], Iterator[bytes]]:
        """Start reading a file: its stat now (checked: ``size``, ``mode``, ``mtime_ns``),
        its bytes as an iterator of chunks, never more than ``size``. Each chunk must come
        within ``call_timeout``; ``timeout`` bounds the whole read. Close the iterator (or
        drop it) to stop early: the agent is told to stop."""
        ch = self._open("fs.read", {"path": path})
        deadline = self._deadline(timeout)
        try:
            kind, payload = self._next(ch, self._frame_deadline(deadline))
            if kind != K.EVENT:
                raise _error_from(kind, payload)
            meta = r.file_meta(r.json_object(payload, "file read header"))
        except BaseException:
            self._cancel(ch)
            raise
        return meta, _FileChunks(self, ch, meta["size"], deadline)

    def read_file(self, path: str, *, timeout: float | None = None) -> bytes:
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
        timeout: float | None = None,
    ) -> int:
        """Write a file atomically (temp file + rename), streamed in chunks. A source that
        fails midway cancels the write: the agent removes its temp file."""
        req: dict[str, Any] = {"path": path, "mkdirs": mkdirs}
        if mode is not None:
            req["mode"] = mode
        if mtime_ns is not None:
            req["mtime_ns"] = mtime_ns
        if append:
            req["append"] = True
        ch = self._open("fs.write", req)
        try:
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
        except BaseException:
            self._cancel(ch)
            raise
        deadline = self._frame_deadline(self._deadline(timeout))
        return r.written(self._finish(ch, deadline, what="write answer"))

    def stat(self, path: str) -> dict[str, Any]:
        return r.stat_entry(self.call("fs.stat", path=path))

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return r.entries(self.call("fs.list", path=path), self.walk_entries)

    def walk(self, path: str, *, timeout: float | None = None
             ) -> tuple[dict[str, list[int]], list[str]]:
        """All regular files under ``path``: relpath -> [size, mtime_ns, mode]; and dirs.

        Every path is checked to be relative and to stay below ``path``; at most
        ``walk_entries`` entries; each batch must come within ``call_timeout``."""
        ch = self._open("fs.walk", {"path": path})
        walk = r.WalkCollector(self.walk_entries)

        def on_frame(kind: int, payload: bytes) -> None:
            if kind != K.EVENT:
                raise r.fail("walk", f"frame kind {kind}")
            walk.batch(r.json_object(payload, "walk batch"))

        res = self._finish(ch, self._deadline(timeout), on_frame, per_frame=True,
                           what="walk result")
        return walk.result(res)

    def hash_files(self, root: str, paths: list[str]) -> dict[str, str | None]:
        timeout = 10 * self.call_timeout  # hashing big files takes the agent a while
        return r.hashes(self.call("fs.hash", root=root, paths=paths, timeout=timeout), paths)

    def mkdir(self, path: str, *, parents: bool = True) -> None:
        self.call("fs.mkdir", path=path, parents=parents)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        self.call("fs.remove", path=path, recursive=recursive)

    def rename(self, src: str, dst: str) -> None:
        self.call("fs.rename", src=src, dst=dst)

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        return r.ping(self.call("ping", timeout=timeout))

    def metrics(self) -> dict[str, Any]:
        return r.metrics(self.call("sys.metrics"))


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
