"""The real in-sandbox agent, run locally as a subprocess: over stdio (one client, the
agent lives as long as the stream) and over a Unix socket (many clients, the agent stays).

Nothing here sleeps for luck: every wait polls a condition against a deadline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiva.agent
from aiva.agent import protocol as p
from aiva.agent_client import (
    AgentClient,
    ExecResult,
    ProcessHandle,
    ProcessTransport,
    _Channel,
    connect_unix,
)
from aiva.errors import (
    CommandTimeout,
    RemoteError,
    SandboxFileNotFound,
    SandboxPermissionError,
)

K = p.FrameKind
AGENT_DIR = Path(aiva.agent.__file__).parent
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to switch users")
pytestmark = pytest.mark.timeout(60)  # a broken agent fails a test, never hangs the run


# --------------------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie nobody has reaped yet counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def socket_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # closed while we looked
            pass
    return n


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def drop_to_nobody() -> None:  # preexec_fn: runs in the child before exec
    pw = nobody()
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)


def stop_process(proc: subprocess.Popen[bytes], client: AgentClient | None = None,
                 *, terminate: bool = False) -> None:
    """Close the client, make sure the agent is gone: wait, then kill it by its own pid.

    A watchdog kills the agent if closing the client blocks (a pipe write to an agent that
    stopped reading), so teardown cannot hang whatever state a failed test left behind.
    """
    watchdog = threading.Timer(10, lambda: proc.poll() is None and proc.kill())
    watchdog.daemon = True
    watchdog.start()
    try:
        if client is not None:
            client.close()
        if terminate and proc.poll() is None:
            proc.terminate()
    finally:
        watchdog.cancel()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


@dataclass
class StdioAgent:
    proc: subprocess.Popen[bytes]
    client: AgentClient
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def stdio_agent(log_path: Path, *, python: str = sys.executable, agent_dir: Path = AGENT_DIR,
                preexec_fn: Callable[[], None] | None = None,
                cwd: str | None = None) -> Iterator[StdioAgent]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([python, str(agent_dir), "--stdio"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, preexec_fn=preexec_fn,
                                cwd=cwd)
    client = None
    try:
        client = AgentClient(ProcessTransport(proc), label="test-agent")
        yield StdioAgent(proc, client, log_path)
    finally:
        stop_process(proc, client)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[StdioAgent]:
    with stdio_agent(tmp_path / "agent.log") as a:
        yield a


@pytest.fixture
def client(agent: StdioAgent) -> AgentClient:
    return agent.client


@dataclass
class UnixAgent:
    proc: subprocess.Popen[bytes]
    dir: Path
    path: str
    clients: list[AgentClient] = field(default_factory=list)

    def connect(self) -> AgentClient:
        tr = connect_unix(self.path, timeout=10, alive=lambda: self.proc.poll() is None)
        c = AgentClient(tr, label=f"unix-{len(self.clients)}")
        self.clients.append(c)
        return c

    def log(self) -> str:
        return (self.dir / "agent.log").read_text(errors="replace")


@contextmanager
def unix_agent_running() -> Iterator[UnixAgent]:
    d = Path(tempfile.mkdtemp(prefix="aiva-agent-"))  # short: sun_path is ~108 bytes
    path = str(d / "a.sock")
    with open(d / "agent.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(AGENT_DIR), "--listen", f"unix:{path}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log)
    ua = UnixAgent(proc, d, path)
    try:
        yield ua
    finally:
        try:
            for c in ua.clients:
                c.close()
        finally:
            stop_process(proc, terminate=True)
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def unix_agent() -> Iterator[UnixAgent]:
    with unix_agent_running() as ua:
        yield ua


@pytest.fixture(scope="module")
def shared_unix_agent() -> Iterator[UnixAgent]:
    with unix_agent_running() as ua:
        yield ua


# raw protocol access: the client's own plumbing, for frames its API never sends


def raw_open(client: AgentClient, op: str, **req: Any) -> _Channel:
    return client._open(op, req)


def next_frame(client: AgentClient, ch: _Channel, timeout: float = 10.0) -> tuple[int, bytes]:
    return client._next(ch, time.monotonic() + timeout)


def finish(client: AgentClient, ch: _Channel, timeout: float = 10.0) -> dict[str, Any]:
    return client._finish(ch, time.monotonic() + timeout)


def listen(client: AgentClient, chan: int) -> _Channel:
    """Catch anything the agent sends on ``chan`` (an even id: the client only uses odd)."""
    assert chan % 2 == 0
    ch = _Channel(chan)
    client._channels[chan] = ch
    return ch


def started_pid(client: AgentClient, ch: _Channel) -> int:
    kind, payload = next_frame(client, ch)
    assert kind == K.EVENT, (kind, payload)
    return int(p.decode_json(payload)["started"])


def drain(ch: _Channel) -> list[tuple[int, bytes]]:
    out = []
    while not ch.q.empty():
        out.append(ch.q.get_nowait())
    return out


def run(client: AgentClient, argv: list[str], **kw: Any) -> ExecResult:
    kw.setdefault("timeout", 30)
    res = client.exec(argv, **kw)
    assert isinstance(res, ExecResult)
    return res


def assert_clean_log(log: str) -> None:
    assert "internal error" not in log
    assert "Traceback" not in log
    assert "abort failed" not in log
    assert "timer failed" not in log


# --------------------------------------------------------------------------- basics


def test_ping(agent: StdioAgent) -> None:
    info = agent.client.ping()
    assert info["version"] == "1"
    assert info["pid"] == agent.proc.pid
    assert info["uid"] == os.getuid()
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))


def test_exec_keeps_stdout_and_stderr_apart(client: AgentClient) -> None:
    seen: dict[str, list[str]] = {"out": [], "err": []}
    res = run(client, ["sh", "-c", "printf o1; printf e1 >&2; printf o2; printf e2 >&2"],
              on_stdout=seen["out"].append, on_stderr=seen["err"].append)
    assert (res.stdout, res.stderr) == ("o1o2", "e1e2")
    assert ("".join(seen["out"]), "".join(seen["err"])) == ("o1o2", "e1e2")
    assert res.ok and res.exit_code == 0 and not res.timed_out
    assert res.pid > 0 and res.duration >= 0


@pytest.mark.parametrize("code", [0, 1, 7, 255])
def test_exit_codes(client: AgentClient, code: int) -> None:
    res = run(client, ["sh", "-c", f"exit {code}"])
    assert res.exit_code == code
    assert res.ok == (code == 0)


def test_death_by_signal_is_a_negative_exit_code(client: AgentClient) -> None:
    assert run(client, ["sh", "-c", "kill -TERM $$"]).exit_code == -signal.SIGTERM


def test_missing_program_is_file_not_found(client: AgentClient) -> None:
    with pytest.raises(SandboxFileNotFound, match="no-such-program"):
        client.exec(["/nonexistent/no-such-program"])
    assert client.ping()


def test_large_output_arrives_whole(client: AgentClient) -> None:
    raw: list[bytes] = []
    res = run(client, ["sh", "-c", "head -c 5000000 /dev/zero | tr '\\0' a; echo done >&2"],
              on_bytes=lambda kind, data: raw.append(data) if kind == K.STDOUT else None)
    assert res.stdout == "a" * 5_000_000
    assert b"".join(raw) == b"a" * 5_000_000
    assert res.stderr == "done\n"


def test_stdin_bytes(client: AgentClient) -> None:
    assert run(client, ["cat"], stdin=b"hello\x00world\n").stdout == "hello\x00world\n"
    assert run(client, ["cat"], stdin="text é").stdout == "text é"
    assert run(client, ["wc", "-c"], stdin=b"").stdout.strip() == "0"


def test_large_stdin_bytes_in_order(client: AgentClient) -> None:
    data = random.Random(1).randbytes(3_000_000)  # many frames, more than any pipe buffer
    res = run(client, ["sha256sum"], stdin=data)
    assert res.stdout.split()[0] == sha(data)


def test_stdin_from_a_file_object_and_an_iterable(client: AgentClient, tmp_path: Path) -> None:
    data = random.Random(2).randbytes(2_500_000)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with open(src, "rb") as f:
        assert run(client, ["sha256sum"], stdin=f).stdout.split()[0] == sha(data)
    assert run(client, ["sha256sum"], stdin=io.BytesIO(data)).stdout.split()[0] == sha(data)
    parts = [b"a" * 10, b"", b"b" * 2_000_000]
    assert run(client, ["wc", "-c"], stdin=iter(parts)).stdout.strip() == "2000010"


def test_env(client: AgentClient) -> None:
    res = run(client, ["sh", "-c", 'printf "%s|%s" "$AIVA_T" "$PATH"'],
              env={"AIVA_T": "v a=l'\"ue"})
    value, path = res.stdout.split("|")
    assert value == "v a=l'\"ue"
    assert path  # the agent's own environment is inherited underneath


def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    assert run(client, ["pwd"], cwd=str(tmp_path)).stdout.strip() == os.path.realpath(tmp_path)
    missing = str(tmp_path / "nope")
    with pytest.raises(SandboxFileNotFound, match="nope") as exc:
        client.exec(["pwd"], cwd=missing)
    assert isinstance(exc.value, FileNotFoundError)
    # cwd_default: a missing directory falls back to the agent's own
    assert run(client, ["pwd"], cwd=missing, cwd_default=True).stdout.strip() == os.getcwd()


@needs_root
def test_user(client: AgentClient) -> None:
    pw = nobody()
    res = run(client, ["sh", "-c", 'id -u; id -g; echo "$HOME $USER"'], user="nobody")
    assert res.stdout.split("\n")[:3] == [str(pw.pw_uid), str(pw.pw_gid),
                                          f"{pw.pw_dir} {pw.pw_name}"]
    assert run(client, ["id", "-u"], user=str(pw.pw_uid)).stdout.strip() == str(pw.pw_uid)
    assert run(client, ["id", "-u"]).stdout.strip() == "0"
    with pytest.raises(RemoteError, match="no-such-user") as exc:
        client.exec(["true"], user="no-such-user")
    assert exc.value.kind == "LookupError"


def test_timeout_kills_the_whole_process_group(client: AgentClient, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    inner = tmp_path / "inner.sh"
    inner.write_text('echo "inner $$"\nsleep 30 &\necho "sleep $!"\nwait $!\n'
                     'echo late > "$1"\n')
    res = run(client, ["sh", "-c", 'sh "$0" "$1" & echo "outer $$"; wait',
                       str(inner), str(marker)], timeout=1.5)
    assert res.timed_out
    assert res.exit_code == -signal.SIGKILL
    pids = {name: int(pid) for name, pid in (line.split() for line in res.stdout.splitlines())}
    assert set(pids) == {"outer", "inner", "sleep"}
    for name, pid in pids.items():
        wait_for(lambda pid=pid: not alive(pid), what=f"{name} ({pid}) to die")
    # the grandchild that would have written the marker is dead, so it never will
    assert not marker.exists()


def test_no_timeout_means_no_kill(client: AgentClient) -> None:
    res = run(client, ["sh", "-c", "echo fine"], timeout=30)
    assert not res.timed_out and res.exit_code == 0


def test_signal_frame_to_a_foreground_process(client: AgentClient) -> None:
    ch = raw_open(client, "exec", argv=["sleep", "30"], stdin=False)
    pid = started_pid(client, ch)
    assert alive(pid)
    client._send(p.encode_json(K.SIGNAL, ch.id, {"signal": int(signal.SIGTERM)}))
    res = finish(client, ch)
    assert res["exit_code"] == -signal.SIGTERM
    assert res["pid"] == pid
    wait_for(lambda: not alive(pid), what="the signalled process to go")


def test_client_signal_while_exec_blocks(client: AgentClient) -> None:
    printed: list[str] = []
    out: dict[str, ExecResult] = {}

    def target() -> None:
        out["res"] = run(client, ["sh", "-c", 'echo $$; exec sleep 30'],
                         on_stdout=printed.append, timeout=20)

    t = threading.Thread(target=target)
    t.start()
    try:
        text = wait_for(lambda: "\n" in "".join(printed) and "".join(printed),
                        what="the command to print its pid")
        pid = int(text)
        client.signal(pid, signal.SIGINT)
    finally:
        t.join(30)
    assert out["res"].exit_code == -signal.SIGINT
    assert not out["res"].timed_out


# --------------------------------------------------------------------------- background


def test_background_wait(client: AgentClient) -> None:
    h = client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], background=True)
    assert isinstance(h, ProcessHandle)
    res = h.wait(timeout=10)
    assert (res.exit_code, res.stdout, res.stderr) == (3, "out\n", "err\n")
    assert h.done
    # the agent keeps a finished background process's result for a later proc.wait
    again = client.call("proc.wait", pid=h.pid)
    assert (again["exit_code"], again["stdout"], again["stderr"]) == (3, "out\n", "err\n")


def test_background_kill(client: AgentClient) -> None:
    h = client.exec(["sleep", "30"], background=True)
    assert isinstance(h, ProcessHandle)
    assert alive(h.pid)
    procs = client.call("proc.list")["procs"]
    assert [pr["background"] for pr in procs if pr["pid"] == h.pid] == [True]
    h.kill()
    res = h.wait(timeout=10)
    assert res.exit_code == -signal.SIGKILL
    wait_for(lambda: not alive(h.pid), what="the killed process to go")


def test_background_wait_times_out_then_succeeds(client: AgentClient, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    h = client.exec(["sh", "-c", f'while [ ! -e "{flag}" ]; do sleep 0.01; done; echo ok'],
                    background=True)
    assert isinstance(h, ProcessHandle)
    with pytest.raises(CommandTimeout):
        h.wait(timeout=0.05)
    flag.touch()
    assert h.wait(timeout=10).stdout == "ok\n"


def test_proc_wait_and_kill_unknown_pid(client: AgentClient) -> None:
    for op in ("proc.wait", "proc.kill"):
        with pytest.raises(RemoteError) as exc:
            client.call(op, pid=999_999_999)
        assert exc.value.kind == "ProcessLookupError"


# --------------------------------------------------------------------------- files


def test_large_file_write_and_read(client: AgentClient, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(50 * 1024 * 1024)
    path = str(tmp_path / "big" / "file.bin")
    assert client.write_file(path, data) == len(data)
    assert sha(Path(path).read_bytes()) == sha(data)
    meta, chunks = client.read_stream(path)
    assert meta["size"] == len(data)
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
    assert (n, h.hexdigest()) == (len(data), sha(data))
    assert sha(client.read_file(path)) == sha(data)
    assert os.listdir(tmp_path / "big") == ["file.bin"]  # no temp file left behind


def test_streamed_write_from_a_file_object(client: AgentClient, tmp_path: Path) -> None:
    data = random.Random(4).randbytes(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    dst = tmp_path / "dst.bin"
    with open(src, "rb") as f:
        assert client.write_file(str(dst), f, mode=0o640, mtime_ns=1_700_000_000 * 10**9) \
            == len(data)
    assert dst.read_bytes() == data
    st_ = dst.stat()
    assert (st_.st_mode & 0o777, st_.st_mtime_ns) == (0o640, 1_700_000_000 * 10**9)
    client.write_file(str(dst), iter([b"x", b"yz"]), append=True)
    assert dst.read_bytes() == data + b"xyz"


def test_list_stat_mkdir_remove_rename(client: AgentClient, tmp_path: Path) -> None:
    root = tmp_path / "r"
    client.mkdir(str(root / "a" / "b" / "c"))
    client.mkdir(str(root / "a" / "b" / "c"))  # exists: fine with parents
    assert (root / "a" / "b" / "c").is_dir()
    with pytest.raises(SandboxFileNotFound):
        client.mkdir(str(root / "x" / "y"), parents=False)

    assert client.write_file(str(root / "a" / "f.txt"), "hi", mode=0o640) == 2
    st_ = client.stat(str(root / "a" / "f.txt"))
    assert (st_["type"], st_["size"], st_["mode"], st_["name"]) == ("file", 2, 0o640, "f.txt")
    assert client.stat(str(root / "a"))["type"] == "dir"
    os.symlink("f.txt", root / "a" / "ln")
    assert client.stat(str(root / "a" / "ln"))["type"] == "symlink"
    entries = client.list_dir(str(root / "a"))
    assert [(e["name"], e["type"]) for e in entries] == [
        ("b", "dir"), ("f.txt", "file"), ("ln", "symlink")]

    client.rename(str(root / "a" / "f.txt"), str(root / "a" / "g.txt"))
    assert not (root / "a" / "f.txt").exists()
    assert (root / "a" / "g.txt").read_text() == "hi"

    client.remove(str(root / "a" / "g.txt"))
    assert not (root / "a" / "g.txt").exists()
    with pytest.raises(RemoteError) as exc:
        client.remove(str(root / "a"))  # not empty, not recursive
    assert exc.value.kind == "OSError"
    assert (root / "a" / "b" / "c").is_dir()

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    os.symlink(outside, root / "a" / "b" / "dirlink")
    client.remove(str(root / "a"), recursive=True)
    assert not (root / "a").exists()
    assert (outside / "keep").read_text() == "k"  # a symlink is removed, not followed


@pytest.mark.parametrize("call", [
    pytest.param(lambda c, m: c.stat(m), id="stat"),
    pytest.param(lambda c, m: c.read_file(m), id="read"),
    pytest.param(lambda c, m: c.list_dir(m), id="list"),
    pytest.param(lambda c, m: c.remove(m), id="remove"),
    pytest.param(lambda c, m: c.remove(m, recursive=True), id="remove-recursive"),
    pytest.param(lambda c, m: c.rename(m, m + ".new"), id="rename"),
    pytest.param(lambda c, m: c.walk(m), id="walk"),
    pytest.param(lambda c, m: c.write_file(m + "/f", "x", mkdirs=False), id="write"),
    pytest.param(lambda c, m: c.exec(["pwd"], cwd=m), id="exec-cwd"),
    pytest.param(lambda c, m: c.exec([m]), id="exec-argv"),
])
def test_missing_path_is_sandbox_file_not_found(client: AgentClient, tmp_path: Path,
                                                call: Callable[[AgentClient, str], Any]) -> None:
    missing = str(tmp_path / "missing-thing")
    with pytest.raises(SandboxFileNotFound) as exc:
        call(client, missing)
    assert isinstance(exc.value, FileNotFoundError)
    assert exc.value.kind in ("FileNotFoundError", "NotADirectoryError")
    assert "missing-thing" in str(exc.value)
    assert client.ping()  # and the agent carries on


def test_read_a_directory_is_an_error(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(RemoteError) as exc:
        client.read_file(str(tmp_path))
    assert exc.value.kind == "IsADirectoryError"


def test_walk_and_hash(client: AgentClient, tmp_path: Path) -> None:
    root = tmp_path / "w"
    files = {"a.txt": b"abc", "sub/b.bin": bytes(range(256)) * 4, "sub/deeper/c": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty").mkdir()
    os.symlink("sub", root / "dirlink")
    os.symlink("a.txt", root / "filelink")
    got, dirs = client.walk(str(root))
    expected = {}
    for rel in files:
        st_ = os.lstat(root / rel)
        expected[rel] = [st_.st_size, st_.st_mtime_ns, st_.st_mode & 0o7777]
    assert got == expected  # regular files only: symlinks are not followed or listed
    assert sorted(dirs) == ["empty", "sub", "sub/deeper"]

    hashes = client.hash_files(str(root), [*files, "missing"])
    assert hashes == {**{rel: sha(data) for rel, data in files.items()}, "missing": None}

    (root / "plain").write_text("x")
    with pytest.raises(SandboxFileNotFound):  # NotADirectoryError maps there too
        client.walk(str(root / "plain"))


@needs_root
def test_permission_error(tmp_path: Path) -> None:
    """A second agent, dropped to nobody, reads a root-only file and writes a root dir."""
    py = _python_for_nobody()
    if py is None:
        pytest.skip("no python3 that the nobody user can run")
    d = Path(tempfile.mkdtemp(prefix="aiva-perm-"))
    try:
        d.chmod(0o755)
        agent_dir = d / "agent"
        shutil.copytree(AGENT_DIR, agent_dir, ignore=shutil.ignore_patterns("__pycache__"))
        secret = d / "secret"
        secret.write_text("root only")
        secret.chmod(0o600)
        with stdio_agent(tmp_path / "nobody.log", python=py, agent_dir=agent_dir,
                         preexec_fn=drop_to_nobody, cwd=str(d)) as a:
            assert a.client.ping()["uid"] == nobody().pw_uid
            assert a.client.stat(str(secret))["size"] == 9  # stat needs no read permission
            with pytest.raises(SandboxPermissionError) as exc:
                a.client.read_file(str(secret))
            assert isinstance(exc.value, PermissionError)
            assert exc.value.kind == "PermissionError"
            with pytest.raises(SandboxPermissionError):
                a.client.write_file(str(d / "new.txt"), "x")
            assert not (d / "new.txt").exists()
            assert a.client.ping()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _python_for_nobody() -> str | None:
    candidates = [sys.executable, getattr(sys, "_base_executable", None),
                  shutil.which("python3"), "/usr/bin/python3"]
    for py in dict.fromkeys(c for c in candidates if c):
        try:
            r = subprocess.run([py, "-c", "import sys; assert sys.version_info >= (3, 8)"],
                               preexec_fn=drop_to_nobody, cwd="/", capture_output=True,
                               timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return py
    return None


# --------------------------------------------------------------------------- system


def test_unknown_op_is_a_remote_error(client: AgentClient) -> None:
    with pytest.raises(RemoteError) as exc:
        client.call("no.such.op")
    assert type(exc.value) is RemoteError
    assert exc.value.kind == "UnknownOperation"
    assert client.ping()


def test_metrics(client: AgentClient) -> None:
    m = client.metrics()
    assert "error" not in m
    mem = m["memory"]
    assert mem["total"] > 0
    assert 0 < mem["available"] <= mem["total"]
    assert mem["used"] == mem["total"] - mem["available"]
    assert len(m["cpu_jiffies"]) >= 4 and sum(m["cpu_jiffies"]) > 0
    assert m["uptime"] > 0
    assert len(m["loadavg"]) == 3


def test_agent_exits_on_eof_and_takes_its_foreground_process(tmp_path: Path) -> None:
    with stdio_agent(tmp_path / "agent.log") as a:
        ch = raw_open(a.client, "exec", argv=["sleep", "30"], stdin=False)
        pid = started_pid(a.client, ch)
        assert alive(pid)
        a.client.close()
        assert a.proc.wait(timeout=10) == 0
        wait_for(lambda: not alive(pid), what="the foreground process to go")
        assert_clean_log(a.log())


@pytest.mark.slow  # ProcessTransport.close gives the agent 5 s to exit before killing it
def test_closing_the_client_of_a_hung_agent_does_not_hang() -> None:
    """A stand-in agent that never answers and ignores EOF: close() must give up on it
    and kill it, not block closing its stdout while the reader thread sits in read1()."""
    proc = subprocess.Popen(["sh", "-c", "exec sleep 60 0<&-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    client = AgentClient(ProcessTransport(proc), label="hung")
    closer = threading.Thread(target=client.close, daemon=True)
    try:
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "close() hung on an agent that does not exit"
        assert proc.returncode == -signal.SIGKILL
        assert client.closed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        closer.join(10)


# --------------------------------------------------------------------------- robustness


def bad_crc_header(kind: int, chan: int, length: int) -> bytes:
    """A header right in every field but its checksum."""
    head = p.HEADER.pack(p.MAGIC, kind, 0, chan, length)
    return head + p.CRC.pack(zlib.crc32(head) ^ 1)


def flip_header_bit(frame: bytes, bit: int) -> bytes:
    raw = bytearray(frame)
    raw[bit // 8 % p.HEADER_SIZE] ^= 1 << (bit % 8)
    return bytes(raw)


def test_garbage_between_requests(agent: StdioAgent) -> None:
    client = agent.client
    watch = listen(client, 2)
    rng = random.Random(5)
    for i in range(30):
        junk = rng.randbytes(rng.randrange(0, 3000))
        if i % 3 == 0:
            junk += p.MAGIC + rng.randbytes(rng.randrange(0, 14))  # a header cut short
        if i % 4 == 1:  # trusting this header would swallow the next 4 MiB, our ping too
            junk += bad_crc_header(K.DATA, 2, p.MAX_PAYLOAD)
        if i % 4 == 3:  # a request with one flipped header bit must not be run
            junk += flip_header_bit(p.encode_json(K.OPEN, 2, {"op": "ping"}),
                                    rng.randrange(16, p.HEADER_SIZE * 8))
        if i % 5 == 0:
            junk += p.MAGIC[:1]
        client.transport.send(junk)
        assert client.ping()["pid"] == agent.proc.pid
        assert run(client, ["echo", str(i)]).stdout == f"{i}\n"
    assert drain(watch) == []
    assert_clean_log(agent.log())


def test_valid_frames_the_agent_must_ignore(agent: StdioAgent) -> None:
    client = agent.client
    watch = {c: listen(client, c) for c in (2, 4, 6, 8, 10, 12)}
    client.transport.send(b"".join([
        p.encode(K.DATA, 2, b"data for nobody"),
        p.encode_json(K.RESULT, 4, {"exit_code": 0}),
        p.encode(K.STDIN, 6, b"x"),
        p.encode(K.EOF, 8, bytes([K.STDIN])),
        p.encode(K.SIGNAL, 10, b"not json"),  # no such channel: not even parsed
        p.encode_json(K.ERROR, 12, {"kind": "X"}),
    ]))
    assert client.ping()
    # one connection is served in order: any reply would have come before the ping's
    assert {c: drain(ch) for c, ch in watch.items()} == {c: [] for c in watch}

    # frames only the agent may send, on a live exec channel, change nothing
    ch = raw_open(client, "exec", argv=["cat"], stdin=True)
    started_pid(client, ch)
    for kind in (K.RESULT, K.ERROR, K.EVENT, K.STDOUT, K.STDERR):
        client._send(p.encode_json(kind, ch.id, {"exit_code": 99}))
    client._send(p.encode(K.STDIN, ch.id, b"abc"))
    client._send(p.encode(K.EOF, ch.id, bytes([K.STDIN])))
    out = []
    res = client._finish(ch, time.monotonic() + 10,
                         lambda kind, payload: out.append((kind, payload)))
    assert res["exit_code"] == 0
    assert b"".join(pl for kind, pl in out if kind == K.STDOUT) == b"abc"
    assert {kind for kind, _ in out} <= {K.STDOUT}
    assert_clean_log(agent.log())


@pytest.mark.parametrize(("payload", "kind"), [
    (b"[1, 2]", "ValueError"),
    (b'"ping"', "ValueError"),
    (b"null", "ValueError"),
    (b"{not json", "JSONDecodeError"),
    (b"\xff\xfe", "UnicodeDecodeError"),
    (b"{}", "UnknownOperation"),
    (b'{"op": 5}', "UnknownOperation"),
    (b'{"op": "fs.stat"}', "KeyError"),
    (b'{"op": "fs.rename", "src": "/"}', "KeyError"),
    (b'{"op": "exec"}', "ValueError"),
    (b'{"op": "exec", "argv": "ls"}', "ValueError"),
    (b'{"op": "exec", "argv": ["true"], "env": [1]}', "AttributeError"),
    (b'{"op": "proc.wait", "pid": "x"}', "ValueError"),
])
def test_malformed_open_gets_an_error_and_the_agent_carries_on(
        agent: StdioAgent, payload: bytes, kind: str) -> None:
    client = agent.client
    ch = listen(client, 2)
    client.transport.send(p.encode(K.OPEN, 2, payload))
    got_kind, got = next_frame(client, ch)
    assert got_kind == K.ERROR
    err = json.loads(got)
    assert err["kind"] == kind
    assert err["message"]
    assert client.ping()
    assert run(client, ["echo", "ok"]).stdout == "ok\n"
    assert_clean_log(agent.log())


def test_duplicate_open_is_refused(client: AgentClient) -> None:
    ch = listen(client, 2)
    client.transport.send(p.encode_json(K.OPEN, 2, {"op": "exec", "argv": ["cat"],
                                                     "stdin": True}))
    kind, payload = next_frame(client, ch)
    assert kind == K.EVENT
    pid = int(json.loads(payload)["started"])
    client.transport.send(p.encode_json(K.OPEN, 2, {"op": "ping"}))
    kind, payload = next_frame(client, ch)
    assert kind == K.ERROR
    assert json.loads(payload)["kind"] == "ProtocolError"
    # the channel is over once the agent says ERROR: its process must not linger
    wait_for(lambda: not alive(pid), what="the process of the refused channel to go")
    assert client.ping()


# --------------------------------------------------------------------------- unix socket


def test_two_clients_at_once(unix_agent: UnixAgent) -> None:
    a, b = unix_agent.connect(), unix_agent.connect()
    release = threading.Event()

    def stdin() -> Iterator[bytes]:
        release.wait(20)
        yield b"hello\n"

    out: dict[str, ExecResult] = {}
    t = threading.Thread(target=lambda: out.update(
        a=run(a, ["sh", "-c", "read x; echo got $x"], stdin=stdin(), timeout=30)))
    t.start()
    try:
        # a's command is running and blocked on its stdin; b is served meanwhile
        wait_for(lambda: any(pr["argv"][:2] == ["sh", "-c"]
                             for pr in b.call("proc.list")["procs"]),
                 what="a's command to start")
        assert b.ping()
        assert run(b, ["echo", "b"]).stdout == "b\n"
        assert b.write_file(os.path.join(unix_agent.dir, "b.txt"), "b") == 1
        assert t.is_alive() and "a" not in out
    finally:
        release.set()
        t.join(30)
    assert out["a"].stdout == "got hello\n"
    assert a.ping()["pid"] == b.ping()["pid"] == unix_agent.proc.pid


def test_disconnect_mid_command_kills_the_foreground_group(unix_agent: UnixAgent) -> None:
    a, b = unix_agent.connect(), unix_agent.connect()
    ch = raw_open(a, "exec", argv=["sh", "-c", "sleep 30 & echo $!; wait"], stdin=False)
    sh_pid = started_pid(a, ch)
    kind, payload = next_frame(a, ch)
    assert kind == K.STDOUT
    sleep_pid = int(payload)
    assert alive(sh_pid) and alive(sleep_pid)
    a.close()
    wait_for(lambda: not alive(sh_pid) and not alive(sleep_pid),
             what="the foreground group to die with its connection")
    assert b.ping()  # the agent stays up for its other clients
    assert unix_agent.proc.poll() is None
    c = unix_agent.connect()
    assert run(c, ["echo", "still here"]).stdout == "still here\n"
    assert_clean_log(unix_agent.log())


@pytest.mark.parametrize("breaker", ["bad-signal", "signal-not-a-number", "duplicate-open"])
def test_broken_channel_process_does_not_outlive_its_connection(unix_agent: UnixAgent,
                                                                breaker: str) -> None:
    """A frame that makes the agent answer ERROR on a live exec channel ends that channel;
    its process must not escape the kill that a disconnect brings."""
    a, b = unix_agent.connect(), unix_agent.connect()
    assert b.ping()  # b is accepted: the agent holds the listener, a and b
    ch = listen(a, 2)
    a.transport.send(p.encode_json(K.OPEN, 2, {"op": "exec", "argv": ["sleep", "30"]}))
    kind, payload = next_frame(a, ch)
    assert kind == K.EVENT
    pid = int(json.loads(payload)["started"])
    a.transport.send({
        "bad-signal": p.encode(K.SIGNAL, 2, b"not json"),
        "signal-not-a-number": p.encode_json(K.SIGNAL, 2, {"signal": "TERM"}),
        "duplicate-open": p.encode_json(K.OPEN, 2, {"op": "ping"}),
    }[breaker])
    kind, payload = next_frame(a, ch)
    assert kind == K.ERROR, (kind, payload)
    a.close()
    wait_for(lambda: socket_fds(unix_agent.proc.pid) == 2, what="the agent to drop a")
    wait_for(lambda: not alive(pid), what="the process of the broken channel to go")
    assert b.ping()


def test_background_survives_disconnect_and_another_client_waits(
        unix_agent: UnixAgent) -> None:
    a, b = unix_agent.connect(), unix_agent.connect()
    flag = unix_agent.dir / "go"
    h = a.exec(["sh", "-c", f'while [ ! -e "{flag}" ]; do sleep 0.01; done; '
                            "echo out; echo err >&2; exit 3"], background=True)
    assert isinstance(h, ProcessHandle)
    assert b.ping()  # b is accepted too
    assert socket_fds(unix_agent.proc.pid) == 3  # the listener, a and b
    a.close()
    wait_for(lambda: socket_fds(unix_agent.proc.pid) == 2, what="the agent to drop a")
    ch = raw_open(b, "proc.wait", pid=h.pid)
    assert b.ping()  # b is served in order: its proc.wait is registered by now
    assert alive(h.pid)  # a's disconnect did not kill a background process
    flag.touch()
    res = finish(b, ch)
    assert (res["exit_code"], res["stdout"], res["stderr"]) == (3, "out\n", "err\n")
    assert res["pid"] == h.pid and not res["timed_out"]
    # finished and still known: a second wait answers at once
    assert b.call("proc.wait", pid=h.pid)["exit_code"] == 3


def test_unix_agent_shuts_down_cleanly(unix_agent: UnixAgent) -> None:
    c = unix_agent.connect()
    h = c.exec(["sleep", "30"], background=True)
    assert isinstance(h, ProcessHandle)
    unix_agent.proc.terminate()
    assert unix_agent.proc.wait(timeout=10) == 0
    wait_for(lambda: not alive(h.pid), what="the agent's processes to go with it")
    assert not os.path.exists(unix_agent.path)
    with pytest.raises(OSError):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(unix_agent.path)
        finally:
            s.close()
    assert_clean_log(unix_agent.log())


# --------------------------------------------------------------------------- fuzzing

EVEN_CHANNELS = st.integers(1, 6).map(lambda n: 2 * n) | st.just(0) | st.just(2**32 - 2)
OPENS: list[Any] = [
    {"op": "ping"},
    {"op": "proc.list"},
    {"op": "fs.stat", "path": "/"},
    {"op": "fs.list", "path": "{tmp}"},
    {"op": "exec", "argv": ["true"]},
    {"op": "exec", "argv": ["cat"], "stdin": True},
    {"op": "exec", "argv": ["sh", "-c", "echo hi; echo there >&2"]},
    {"op": "exec", "argv": ["true"], "timeout": "soon"},
    {"op": "fs.write", "path": "{tmp}/w"},
    {"op": "fs.read", "path": str(AGENT_DIR / "protocol.py")},
    {"op": "fs.read", "path": "{tmp}/missing"},
    {"op": "proc.wait", "pid": 1},
    {"op": "nope"},
    {"op": "exec"},
    {},
    [],
    "ping",
    None,
]


def _substitute(obj: Any, tmp: str) -> Any:
    if isinstance(obj, dict):
        return {k: _substitute(v, tmp) for k, v in obj.items()}
    if isinstance(obj, str):
        return obj.replace("{tmp}", tmp)
    return obj


garbage_bytes = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(bad_crc_header, st.sampled_from(sorted(K.ALL)), EVEN_CHANNELS,
              st.integers(0, p.MAX_PAYLOAD)),
    st.builds(flip_header_bit, st.builds(p.encode, st.sampled_from(sorted(K.ALL)),
                                         EVEN_CHANNELS, st.binary(max_size=40)),
              st.integers(16, p.HEADER_SIZE * 8 - 1)),
    st.binary(max_size=14).map(lambda b: p.MAGIC + b),  # a header cut short
    st.just(p.MAGIC[:1]),
)
actions = st.one_of(
    st.tuples(st.just("open"), EVEN_CHANNELS, st.sampled_from(OPENS)),
    st.tuples(st.just("frame"), st.sampled_from(sorted(K.ALL)), EVEN_CHANNELS,
              st.binary(max_size=300)),
    st.tuples(st.just("signal"), EVEN_CHANNELS,
              st.sampled_from([0, 1, 9, 15, 10_000, -1, "TERM", None])),
    st.tuples(st.just("eof"), EVEN_CHANNELS),
    st.tuples(st.just("garbage"), garbage_bytes),
)


def _encode_action(action: tuple[Any, ...], tmp: str) -> bytes:
    what = action[0]
    if what == "open":
        return p.encode_json(K.OPEN, action[1], _substitute(action[2], tmp))
    if what == "frame":
        return p.encode(action[1], action[2], action[3])
    if what == "signal":
        return p.encode_json(K.SIGNAL, action[1], {"signal": action[2]})
    if what == "eof":
        return p.encode(K.EOF, action[1], bytes([K.STDIN]))
    return bytes(action[1])


@settings(max_examples=50, deadline=None)
@given(st.lists(actions, max_size=25), st.integers(1, 4096))
def test_random_frames_and_garbage_never_break_the_agent(shared_unix_agent: UnixAgent,
                                                         seq: list[tuple[Any, ...]],
                                                         chunk: int) -> None:
    """One agent for every example, a fresh connection each: the example's own
    connection must still answer after its junk, and so must everyone else's."""
    ua = shared_unix_agent
    control = ua.clients[0] if ua.clients else ua.connect()
    tmp = tempfile.mkdtemp(dir=ua.dir)
    data = b"".join(_encode_action(a, tmp) for a in seq)
    c = ua.connect()
    try:
        for i in range(0, len(data), chunk):
            c.transport.send(data[i:i + chunk])
        assert c.ping()["pid"] == ua.proc.pid
        assert run(c, ["echo", "ok"]).stdout == "ok\n"
    finally:
        c.close()
        ua.clients.remove(c)
    assert control.ping()["pid"] == ua.proc.pid
    assert ua.proc.poll() is None
    assert_clean_log(ua.log())


# --------------------------------------------------------------------------- hostile files
#
# The sandbox owns every file the agent reads: a FIFO, a device or an endless file there
# must cost one clear error, never the agent's loop or its memory.


class RawConn:
    """A bare Unix-socket client that reads only when told to: the slow or absent reader
    AgentClient (whose reader thread drains the socket at once) cannot be."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        wait_for(lambda: os.path.exists(path), what="the agent's socket")  # made at start
        self.sock.connect(path)
        self.sock.settimeout(30)
        self.decoder = p.Decoder()
        self.frames: list[tuple[int, int, bytes]] = []

    def open(self, chan: int, op: str, **req: Any) -> None:
        self.sock.sendall(p.encode_json(K.OPEN, chan, {"op": op, **req}))

    def next(self, chan: int, timeout: float = 30.0) -> tuple[int, bytes]:
        """The next frame on ``chan`` (frames of other channels are kept for later)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (kind, c, payload) in enumerate(self.frames):
                if c == chan:
                    del self.frames[i]
                    return kind, payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame on channel {chan} within {timeout}s")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise AssertionError("the agent closed the connection")
            self.frames.extend(self.decoder.feed(data))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(unix_agent: UnixAgent) -> Iterator[RawConn]:
    c = RawConn(unix_agent.path)
    try:
        yield c
    finally:
        c.close()


def proc_status(pid: int, field_name: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for {pid}")


def proc_io(pid: int, field_name: str) -> int:
    """A counter of /proc/PID/io (rchar, wchar)."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field_name} for {pid}")


def refused(client: AgentClient, path: str) -> RemoteError:
    with pytest.raises(RemoteError) as exc:
        client.read_file(path, timeout=10)
    return exc.value


def test_a_fifo_is_refused_at_once_and_the_loop_goes_on(client: AgentClient,
                                                         tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    err = refused(client, str(fifo))
    assert err.kind == "UnsupportedFileType"
    assert "FIFO" in str(err) and str(fifo) in str(err)
    assert client.ping()  # nobody ever wrote the FIFO: the loop was not blocked
    os.symlink(fifo, tmp_path / "to-fifo")  # a link is followed, then what it is checked
    assert refused(client, str(tmp_path / "to-fifo")).kind == "UnsupportedFileType"
    assert client.ping()


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_a_link_to_a_device_is_refused(client: AgentClient, tmp_path: Path,
                                       device: str) -> None:
    link = tmp_path / "f"
    os.symlink(device, link)
    err = refused(client, str(link))
    assert err.kind == "UnsupportedFileType" and "character device" in str(err)
    assert client.hash_files(str(tmp_path), ["f"]) == {"f": None}
    assert client.ping()


def test_a_block_device_is_refused(client: AgentClient) -> None:
    blocks = [e.path for e in os.scandir("/dev")
              if stat.S_ISBLK(e.stat(follow_symlinks=False).st_mode)]
    if not blocks:
        pytest.skip("no block device in /dev")
    err = refused(client, blocks[0])
    assert err.kind == "UnsupportedFileType" and "block device" in str(err)


def test_a_socket_is_refused(client: AgentClient) -> None:
    d = Path(tempfile.mkdtemp(prefix="aiva-sock-"))  # short: sun_path is ~108 bytes
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(d / "s"))
        s.listen(1)
        err = refused(client, str(d / "s"))
        assert err.kind == "UnsupportedFileType" and "socket" in str(err)
    finally:
        s.close()
        shutil.rmtree(d, ignore_errors=True)


def test_a_pseudo_file_that_says_it_is_empty_is_read(client: AgentClient) -> None:
    meta, chunks = client.read_stream("/proc/self/status")
    data = b"".join(chunks)
    assert b"Name:" in data and meta["size"] == len(data)


def test_append_to_a_fifo_is_refused_at_once(client: AgentClient, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(RemoteError) as exc:
        client.write_file(str(fifo), b"x", append=True, timeout=10)
    assert exc.value.kind == "UnsupportedFileType"
    assert client.ping()


def test_a_fifo_planted_at_the_temp_name_of_a_write_is_replaced(
        unix_agent: UnixAgent, raw: RawConn, tmp_path: Path) -> None:
    target = tmp_path / "t"
    os.mkfifo(tmp_path / f".t.aiva-{unix_agent.proc.pid}-2")  # the name channel 2 uses
    raw.open(2, "fs.write", path=str(target))
    raw.sock.sendall(p.encode(K.DATA, 2, b"data") + p.encode(K.EOF, 2, bytes([K.DATA])))
    kind, payload = raw.next(2, timeout=10)
    assert kind == K.RESULT and json.loads(payload)["bytes"] == 4, (kind, payload)
    assert target.read_bytes() == b"data"
    assert stat.S_ISREG(os.lstat(target).st_mode)


def _data_until_result(raw: RawConn, chan: int) -> tuple[int, dict[str, Any]]:
    total = 0
    while True:
        kind, payload = raw.next(chan)
        if kind == K.DATA:
            total += len(payload)
        elif kind == K.RESULT:
            return total, json.loads(payload)
        else:
            raise AssertionError((kind, payload))


def test_a_file_that_grows_while_read_is_cut_at_the_declared_size(raw: RawConn,
                                                                  tmp_path: Path) -> None:
    f = tmp_path / "grows"
    size = 64 << 20
    with open(f, "wb") as out:
        out.truncate(size)
    raw.open(2, "fs.read", path=str(f))
    kind, payload = raw.next(2)
    assert kind == K.EVENT and json.loads(payload)["size"] == size
    # we read nothing more yet: the agent is held at its high-water mark, far before the
    # end; the file grows meanwhile
    with open(f, "ab") as out:
        out.write(b"x" * (8 << 20))
    total, result = _data_until_result(raw, 2)
    assert total == size == result["bytes"]
    assert result.get("truncated") is True


def test_a_file_that_shrinks_while_read_ends_early(raw: RawConn, tmp_path: Path) -> None:
    f = tmp_path / "shrinks"
    size = 64 << 20
    with open(f, "wb") as out:
        out.truncate(size)
    raw.open(2, "fs.read", path=str(f))
    kind, payload = raw.next(2)
    assert kind == K.EVENT and json.loads(payload)["size"] == size
    os.truncate(f, 32 << 20)
    total, result = _data_until_result(raw, 2)
    assert total == result["bytes"] < size


def test_hash_of_a_fifo_is_null_and_does_not_block(client: AgentClient,
                                                   tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "a").write_bytes(b"abc")
    big = os.urandom(1 << 20) * 9 + b"tail"  # more than two hash slices
    (tmp_path / "big").write_bytes(big)
    got = client.hash_files(str(tmp_path), ["fifo", "a", "big", "missing", "bad\x00name"])
    assert got == {"fifo": None, "a": sha(b"abc"), "big": sha(big), "missing": None,
                   "bad\x00name": None}
    assert client.ping()


def test_ping_answers_while_a_huge_file_is_hashed(unix_agent: UnixAgent,
                                                  tmp_path: Path) -> None:
    f = tmp_path / "huge"
    with open(f, "wb") as out:
        out.truncate(1 << 30)  # sparse: costs no disk, only hashing
    a, b = unix_agent.connect(), unix_agent.connect()
    assert b.ping()
    pid = unix_agent.proc.pid
    before = proc_io(pid, "rchar")
    ch = raw_open(a, "fs.hash", root=str(tmp_path), paths=["huge"])
    wait_for(lambda: proc_io(pid, "rchar") - before > 100 << 20, timeout=30,
             what="the agent to be well into the hash")
    assert b.ping()  # answered between two slices ...
    assert proc_io(pid, "rchar") - before < 1 << 30  # ... long before the file was read
    hashes = finish(a, ch, timeout=120)["hashes"]
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(1 << 10):
        h.update(zeros)
    assert hashes == {"huge": h.hexdigest()}


@pytest.mark.parametrize("letter", ["n", "\u00e9"], ids=["ascii", "accented"])
def test_walk_reports_regular_files_and_dirs_only_in_bounded_frames(
        raw: RawConn, tmp_path: Path, letter: str) -> None:
    """Long names (an accented letter is 2 bytes of a name, 6 of JSON): one frame of
    5000 of them would be far over MAX_PAYLOAD."""
    root = tmp_path / "w"
    width = 240 // len(letter.encode())
    deep = root / ("d" * 5 + letter * width) / ("e" * 5 + letter * width) / (letter * width)
    deep.mkdir(parents=True)
    names = [f"{i:05d}" + letter * width for i in range(5000)]
    for n in names:
        (deep / n).touch()
    os.mkfifo(root / "fifo")
    os.symlink("/dev/zero", root / "zero")
    os.symlink(str(deep), root / "dirlink")
    raw.open(2, "fs.walk", path=str(root))
    files: dict[str, Any] = {}
    dirs: list[str] = []
    while True:
        kind, payload = raw.next(2)
        assert len(payload) <= p.MAX_PAYLOAD
        if kind == K.RESULT:
            assert json.loads(payload)["count"] == len(names)
            break
        assert kind == K.EVENT, (kind, payload)
        batch = json.loads(payload)
        files.update(batch["files"])
        dirs.extend(batch["dirs"])
    rel = deep.relative_to(root).as_posix()
    assert set(files) == {f"{rel}/{n}" for n in names}
    top = "d" * 5 + letter * width
    assert sorted(dirs) == sorted([top, f"{top}/{'e' * 5 + letter * width}", rel])


def test_command_output_is_held_back_while_the_client_does_not_read(
        unix_agent: UnixAgent, raw: RawConn) -> None:
    size = 200 << 20
    agent_pid = unix_agent.proc.pid
    raw.open(2, "exec", argv=["head", "-c", str(size), "/dev/zero"])
    kind, payload = raw.next(2)
    assert kind == K.EVENT
    head = int(json.loads(payload)["started"])
    last: list[int] = [-1]
    stable: list[int] = [0]

    def writer_stopped() -> bool:  # head blocked in its write: wchar stops moving
        n = proc_io(head, "wchar")
        stable[0] = stable[0] + 1 if n == last[0] else 0
        last[0] = n
        return n >= size or stable[0] >= 20
    wait_for(writer_stopped, timeout=30, what="the command to block or finish")
    assert last[0] < 32 << 20, "the agent read on while its client did not"
    assert proc_status(agent_pid, "VmRSS") < 80 << 20
    got = 0
    while True:
        kind, payload = raw.next(2)
        if kind == K.STDOUT:
            assert payload.count(0) == len(payload)
            got += len(payload)
        elif kind == K.RESULT:
            res = json.loads(payload)
            break
        else:
            raise AssertionError((kind, payload[:200]))
    assert got == size and res["exit_code"] == 0
    assert proc_status(agent_pid, "VmHWM") < 80 << 20  # the peak, over the whole run
    c = unix_agent.connect()
    assert c.ping()
    assert_clean_log(unix_agent.log())


def test_a_held_back_command_that_times_out_still_finishes(unix_agent: UnixAgent,
                                                           raw: RawConn) -> None:
    raw.open(2, "exec", argv=["sh", "-c", "(sleep 60 &); head -c 100M /dev/zero"],
             timeout=1)
    kind, payload = raw.next(2)
    assert kind == K.EVENT
    sh = int(json.loads(payload)["started"])
    wait_for(lambda: not alive(sh), timeout=30, what="the timeout to kill the command")
    got = 0
    while True:
        kind, payload = raw.next(2)
        if kind == K.STDOUT:
            got += len(payload)
        elif kind == K.RESULT:
            res = json.loads(payload)
            break
    assert res["timed_out"] and res["exit_code"] == -signal.SIGKILL
    assert 0 < got < 100 << 20


def test_a_background_command_without_a_listener_keeps_a_bounded_tail(
        unix_agent: UnixAgent) -> None:
    a = unix_agent.connect()
    h = a.exec(["sh", "-c", "head -c 20M /dev/zero | tr '\\0' a; echo end"],
               background=True)
    assert isinstance(h, ProcessHandle)
    a.close()
    b = unix_agent.connect()
    res = b.call("proc.wait", pid=h.pid, timeout=60)
    assert res["exit_code"] == 0
    assert len(res["stdout"]) <= 1 << 20 and res["stdout"].endswith("aend\n")


def test_stdin_a_command_does_not_take_is_held_back_in_the_socket(
        unix_agent: UnixAgent, raw: RawConn) -> None:
    """A command that never reads its stdin, and a client that pushes 200 MiB of it:
    the agent stops reading that client instead of keeping it all."""
    agent_pid = unix_agent.proc.pid
    raw.open(2, "exec", argv=["sleep", "30"], stdin=True, timeout=3)
    kind, payload = raw.next(2)
    assert kind == K.EVENT
    sleeper = int(json.loads(payload)["started"])
    frame = p.encode(K.STDIN, 2, bytes(1 << 20))
    sent = [0]

    def push() -> None:
        try:
            for _ in range(200):
                raw.sock.sendall(frame)
                sent[0] += 1
        except OSError:
            pass
    raw.sock.settimeout(60)
    t = threading.Thread(target=push, daemon=True)
    t.start()
    last: list[int] = [-1]
    stable: list[int] = [0]

    def sender_stopped() -> bool:
        stable[0] = stable[0] + 1 if sent[0] == last[0] else 0
        last[0] = sent[0]
        return sent[0] >= 200 or stable[0] >= 20
    wait_for(sender_stopped, timeout=30, what="the sender to block or finish")
    assert alive(sleeper) and sent[0] < 64, "the agent took stdin nobody reads"
    assert proc_status(agent_pid, "VmRSS") < 80 << 20
    kind, payload = raw.next(2)  # the timeout ends it; the agent reads the client again
    while kind != K.RESULT:
        kind, payload = raw.next(2)
    assert json.loads(payload)["timed_out"]
    t.join(30)
    assert sent[0] == 200  # the rest was read (and dropped: the command is gone)
    raw.open(4, "ping")
    kind, _ = raw.next(4)
    assert kind == K.RESULT
    assert proc_status(agent_pid, "VmHWM") < 80 << 20


def open_fds_to(pid: int, path: Path) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
        except FileNotFoundError:
            pass
    return n


@pytest.mark.parametrize("op", ["fs.read", "fs.hash"])
def test_a_cancelled_read_or_hash_lets_go_of_its_file(unix_agent: UnixAgent, raw: RawConn,
                                                      tmp_path: Path, op: str) -> None:
    f = tmp_path / "big"
    with open(f, "wb") as out:
        out.truncate(4 << 30)
    agent_pid = unix_agent.proc.pid
    if op == "fs.read":
        raw.open(2, op, path=str(f))
        assert raw.next(2)[0] == K.EVENT
    else:
        raw.open(2, op, root=str(tmp_path), paths=["big"])
    wait_for(lambda: open_fds_to(agent_pid, f) == 1, what="the agent to be at it")
    raw.sock.sendall(p.encode_json(K.SIGNAL, 2, {"cancel": True}))
    wait_for(lambda: open_fds_to(agent_pid, f) == 0, what="the file to be closed")
    raw.open(4, "ping")
    assert raw.next(4)[0] == K.RESULT
    assert_clean_log(unix_agent.log())


def test_wait_for_a_background_command_with_binary_output_answers(
        client: AgentClient) -> None:
    """Each NUL byte is six bytes of JSON: the answer keeps the tail that fits a frame."""
    h = client.exec(["sh", "-c", "head -c 3000000 /dev/zero; echo end"], background=True)
    assert isinstance(h, ProcessHandle)
    res = client.call("proc.wait", pid=h.pid, timeout=30)
    assert res["exit_code"] == 0 and res["truncated"] is True
    assert res["stdout"].endswith("\0end\n") and len(res["stdout"]) < 1 << 20
    assert client.call("proc.wait", pid=h.pid)["stdout"] == res["stdout"]  # and again


def test_walk_of_a_deep_tree_keeps_few_directories_open(raw: RawConn, unix_agent: UnixAgent,
                                                         tmp_path: Path) -> None:
    root = tmp_path / "deep"
    d = root
    expected = {}
    for i in range(300):  # deeper than the agent keeps directories open
        d = d / "d"
        d.mkdir(parents=True)
        (d / f"f{i}").write_bytes(b"x" * i)
        expected[(d / f"f{i}").relative_to(root).as_posix()] = i
    (d / "sub").mkdir()
    os.symlink(str(root), d / "loop")  # a link back up is not followed
    agent_pid = unix_agent.proc.pid
    fds_before = len(os.listdir(f"/proc/{agent_pid}/fd"))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.prlimit(agent_pid, resource.RLIMIT_NOFILE, (128, hard))  # < one fd per level
    raw.open(2, "fs.walk", path=str(root))
    files: dict[str, Any] = {}
    dirs: list[str] = []
    while True:
        kind, payload = raw.next(2)
        if kind == K.RESULT:
            break
        assert kind == K.EVENT, (kind, payload)
        batch = json.loads(payload)
        files.update(batch["files"])
        dirs.extend(batch["dirs"])
    assert {k: v[0] for k, v in files.items()} == expected
    assert len(dirs) == 301
    assert len(os.listdir(f"/proc/{agent_pid}/fd")) == fds_before
