"""The host's agent connection against the real agent, run as a local process on a Unix
socket: a consumer that stops reading slows the agent instead of growing host memory;
an abandoned call is cancelled on the agent; a long command keeps answering pings; kept
output is capped; the socket is reached only as a socket, never through a link; and the
daemon's streaming routes cancel their agent call when the HTTP client goes away.

Every wait polls a condition against a deadline; nothing sleeps for luck.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import aiva.agent
from aiva.agent_client import AgentClient, ExecResult, _Channel, connect_unix
from aiva.errors import AgentError, CommandTimeout, ProtocolError

AGENT_DIR = Path(aiva.agent.__file__).parent
MB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    dir: Path
    path: str
    clients: list[AgentClient]

    def connect(self, **kw: Any) -> AgentClient:
        c = AgentClient(connect_unix(self.path, timeout=10,
                                     alive=lambda: self.proc.poll() is None), **kw)
        self.clients.append(c)
        return c

    def file_pos(self, path: Path) -> int | None:
        """Where the agent's descriptor for ``path`` stands; None once it is closed."""
        fds = f"/proc/{self.proc.pid}/fd"
        for fd in os.listdir(fds):
            try:
                if os.readlink(f"{fds}/{fd}") == str(path):
                    with open(f"/proc/{self.proc.pid}/fdinfo/{fd}") as f:
                        return int(f.readline().split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
        return None

    def has_open(self, path: Path) -> bool:
        return self.file_pos(path) is not None


@pytest.fixture
def agent() -> Iterator[Agent]:
    d = Path(tempfile.mkdtemp(prefix="aiva-ac-"))  # short: sun_path is ~108 bytes
    path = str(d / "a.sock")
    with open(d / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(AGENT_DIR), "--listen", f"unix:{path}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    a = Agent(proc, d, path, [])
    try:
        yield a
    finally:
        for c in a.clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def big(tmp_path: Path) -> Path:
    f = tmp_path / "big"
    with open(f, "wb") as out:
        out.truncate(200 * MB)  # sparse: reads as 200 MB of zeros, costs no disk
    return f


def only_channel(client: AgentClient) -> _Channel:
    (ch,) = client._channels.values()
    return ch


# --------------------------------------------------------------------------- backpressure


def test_a_reader_that_stops_slows_the_agent_not_host_memory(agent: Agent, big: Path) -> None:
    client = agent.connect(channel_buffer=4 * MB, call_timeout=60)
    client.ping()
    gc.collect()
    before = rss()
    meta, chunks = client.read_stream(str(big))
    assert meta["size"] == 200 * MB
    next(chunks)
    ch = only_channel(client)
    wait_for(lambda: ch.q.queued >= 3 * MB, what="the channel's queue to fill")
    # the queue is full and the reader has stopped; the agent must stop with it
    watch_until = time.monotonic() + 2.0
    while time.monotonic() < watch_until:
        pos = agent.file_pos(big)
        assert pos is not None and pos < 64 * MB, f"the agent read on to {pos}"
        assert ch.q.queued <= 4 * MB + MB
        time.sleep(0.05)
    assert rss() - before < 64 * MB
    chunks.close()  # type: ignore[attr-defined]
    wait_for(lambda: not agent.has_open(big), what="the agent to close the file")
    assert client.ping()["version"]
    assert client.cancels_sent == 1


def test_a_stalled_reader_is_cancelled_after_the_call_timeout(agent: Agent, big: Path) -> None:
    client = agent.connect(channel_buffer=MB, call_timeout=1.0)
    _, chunks = client.read_stream(str(big))
    next(chunks)
    ch = only_channel(client)
    wait_for(lambda: ch.id not in client._channels, what="the stalled channel to go")
    wait_for(lambda: not agent.has_open(big), what="the agent to close the file")
    assert client.ping()["version"]  # the connection serves other calls again
    with pytest.raises(CommandTimeout, match="took nothing"):
        for _ in chunks:
            pass


def test_a_slow_callback_is_waited_for_not_cancelled(agent: Agent) -> None:
    """A consumer busy in its own callback (output to a pipe nobody reads yet) slows the
    command down; it is the host being slow, not the agent, so nothing is cancelled."""
    client = agent.connect(channel_buffer=MB, call_timeout=0.5)
    seen = [0]
    stalled = threading.Event()

    def on_bytes(_kind: int, data: bytes) -> None:
        seen[0] += len(data)
        if not stalled.is_set():
            ch = only_channel(client)
            wait_for(lambda: ch.q.queued >= MB // 2, what="the queue to fill")
            time.sleep(4 * client.call_timeout)  # the slow consumer this test is about
            stalled.set()

    res = client.exec(["head", "-c", str(8 * MB), "/dev/zero"], on_bytes=on_bytes,
                      keep_output=False)
    assert isinstance(res, ExecResult) and res.exit_code == 0 and stalled.is_set()
    assert seen[0] == 8 * MB


# --------------------------------------------------------------------------- cancel


def test_a_dropped_read_is_cancelled(agent: Agent, big: Path) -> None:
    client = agent.connect()
    _, chunks = client.read_stream(str(big))
    next(chunks)
    del chunks
    gc.collect()
    wait_for(lambda: not agent.has_open(big), what="the agent to close the file")
    _, never_read = client.read_stream(str(big))
    wait_for(lambda: agent.has_open(big), what="the second read to open the file")
    del never_read
    wait_for(lambda: not agent.has_open(big), what="the agent to close it again")
    small = big.with_name("small")
    small.write_bytes(b"hello")
    assert client.read_file(str(small)) == b"hello"  # the connection is still good


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_caller_that_fails_mid_command_ends_the_command(agent: Agent,
                                                          exc: type[BaseException]) -> None:
    client = agent.connect()
    pids: list[int] = []

    def on_stdout(text: str) -> None:
        pids.append(int(text.split()[0]))
        raise exc("caller gone")

    with pytest.raises(exc):
        client.exec(["sh", "-c", "echo $$; exec sleep 60"], on_stdout=on_stdout)
    wait_for(lambda: not alive(pids[0]), what="the command to be killed")
    assert client.ping()["version"]


def test_a_stop_event_ends_a_silent_command(agent: Agent) -> None:
    client = agent.connect()
    stop = threading.Event()
    pid_file = agent.dir / "pid"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            client.exec(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"], stop=stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip()
                   and int(pid_file.read_text()), what="the command to start")
    stop.set()
    t.join(20)
    assert not t.is_alive() and isinstance(errors[0], AgentError)
    wait_for(lambda: not alive(pid), what="the command to be killed")


# --------------------------------------------------------------------------- deadlines


def test_a_long_command_outlives_the_call_timeout_while_the_agent_answers_pings(
        agent: Agent) -> None:
    client = agent.connect(call_timeout=0.3)
    res = client.exec(["sleep", "2"])  # ~6 call timeouts of silence, pinged through
    assert isinstance(res, ExecResult) and res.exit_code == 0
    h = client.exec(["sleep", "2"], background=True)
    assert client.ping(timeout=5)["version"]  # answered while the command runs
    assert h.wait(20).exit_code == 0  # type: ignore[union-attr]


def test_a_paused_agent_ends_a_command_without_timeout(agent: Agent) -> None:
    """SIGSTOP the agent: no frames, no ping answers; the host gives up, not hangs."""
    client = agent.connect(call_timeout=0.5)
    errors: list[BaseException] = []
    running = threading.Event()

    def run() -> None:
        try:
            client.exec(["sh", "-c", "echo up; exec sleep 60"],
                        on_stdout=lambda _text: running.set())
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert running.wait(20), "the command did not start"
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        t.join(30)
        assert not t.is_alive(), "exec still waiting on a stopped agent"
        assert type(errors[0]).__name__ == "AgentUnreachable", errors
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


# --------------------------------------------------------------------------- output caps


def test_kept_output_is_capped_but_callbacks_see_it_all(agent: Agent) -> None:
    client = agent.connect(exec_output=64 * 1024)
    seen = [0]
    res = client.exec(["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a; echo END"],
                      on_bytes=lambda _k, d: seen.__setitem__(0, seen[0] + len(d)))
    assert isinstance(res, ExecResult)
    assert seen[0] == 1000004
    assert res.truncated and res.stdout.startswith("a" * 1000) and res.stdout.endswith("aEND\n")
    assert f"{1000004 - 64 * 1024} bytes of stdout cut here" in res.stdout
    assert len(res.stdout) < 64 * 1024 + 200
    small = client.exec(["echo", "hi"])
    assert isinstance(small, ExecResult) and small.stdout == "hi\n" and not small.truncated


def test_background_output_is_capped_too(agent: Agent) -> None:
    client = agent.connect(exec_output=10_000)
    h = client.exec(["sh", "-c", "head -c 50000 /dev/zero | tr '\\0' b"], background=True)
    res = h.wait(20)  # type: ignore[union-attr]
    assert res.truncated and "40000 bytes of stdout cut here" in res.stdout
    waited = client.wait_process(h.pid, timeout=10)  # the agent's own copy, capped here
    assert waited.truncated and len(waited.stdout) < 10_200


# --------------------------------------------------------------------------- the socket


def test_connect_refuses_a_link_to_a_socket_and_a_non_socket(agent: Agent) -> None:
    agent.connect().ping()
    link = agent.dir / "link.sock"
    link.symlink_to(agent.path)
    with pytest.raises(ProtocolError, match="symbolic link"):
        connect_unix(str(link), timeout=1)
    plain = agent.dir / "plain.sock"
    plain.write_text("")
    with pytest.raises(ProtocolError, match="not a socket"):
        connect_unix(str(plain), timeout=1)


def test_connect_works_on_a_path_longer_than_a_socket_address(agent: Agent) -> None:
    agent.connect().ping()  # listening
    deep = agent.dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    os.link(agent.path, deep / "a.sock")  # the same socket inode, a long way down
    assert len(str(deep / "a.sock")) > 108
    tr = connect_unix(str(deep / "a.sock"), timeout=5)
    assert isinstance(tr.sock, socket.socket)
    client = AgentClient(tr)
    agent.clients.append(client)
    assert client.ping()["version"]


# --------------------------------------------------------------------------- the daemon


@contextmanager
def daemon_on(client: AgentClient, sock: str) -> Iterator[httpx.Client]:
    """The daemon's real app on a real Unix socket, with an engine whose agent calls go
    to ``client`` (only the parts these routes use)."""
    import uvicorn

    from aiva.daemon.app import Gate, create_app
    from aiva.daemon.control import _Server
    from aiva.engine import Engine
    from aiva.models import State

    eng = Engine()
    eng.get = lambda name: SimpleNamespace(state=State.RUNNING)  # type: ignore[method-assign]
    eng.read_stream = lambda name, path: client.read_stream(path)  # type: ignore[method-assign]
    eng.exec = lambda name, cmd, **kw: client.exec(  # type: ignore[method-assign]
        ["/bin/sh", "-c", cmd], **kw)
    server = _Server(uvicorn.Config(Gate(create_app(eng), token=None), uds=sock,
                                    lifespan="off", log_config=None, access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_for(lambda: server.started, what="the daemon to listen")
    http = httpx.Client(base_url="http://aiva", transport=httpx.HTTPTransport(uds=sock),
                        timeout=30)
    try:
        yield http
    finally:
        http.close()
        server.should_exit = True
        t.join(10)
        eng.close()


def test_an_abandoned_daemon_file_read_stops_reading(agent: Agent, big: Path) -> None:
    client = agent.connect(channel_buffer=2 * MB)
    with daemon_on(client, str(agent.dir / "d.sock")) as http:
        with http.stream("GET", "/v1/sandboxes/x/files/content",
                         params={"path": str(big)}) as r:
            assert r.status_code == 200
            assert json.loads(r.headers["x-aiva-stat"])["size"] == 200 * MB
            next(r.iter_bytes())
        wait_for(lambda: not agent.has_open(big), what="the agent to close the file")
        assert client.ping()["version"]


def test_an_abandoned_daemon_exec_ends_the_command(agent: Agent) -> None:
    client = agent.connect()
    with daemon_on(client, str(agent.dir / "d.sock")) as http:
        with http.stream("POST", "/v1/sandboxes/x/exec",
                         json={"command": "echo $$; exec sleep 60"}) as r:
            assert r.status_code == 200
            line = next(r.iter_lines())
            pid = int(json.loads(line)["stdout"])
            assert alive(pid)
        wait_for(lambda: not alive(pid), what="the command to be killed")
