"""aiva-daemon end to end: a real daemon process, a real Docker sandbox, RemoteEngine.

The daemon runs with the session's AIVA_HOME (Unix socket + a TCP port); the fixture
always stops it by pid, and every sandbox made here is removed in ``finally``.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiva import errors
from aiva.agent_client import ExecResult, ProcessHandle
from aiva.daemon import control, wire
from aiva.daemon.client import RemoteEngine, connect, daemon_running
from aiva.models import State
from aiva.observe.metrics import SandboxMetrics

pytestmark = pytest.mark.docker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """The daemon under test; remembers every pid it started, to stop them all."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pids: list[int] = []

    def start(self) -> int:
        info = control.start(self.port, timeout=60)
        assert info["running"] and info["port"] == self.port
        self.pids.append(int(info["pid"]))
        return self.pids[-1]

    @property
    def pid(self) -> int:
        return self.pids[-1]

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while control.is_daemon(self.pid) and time.monotonic() < deadline:
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.02)
        assert not control.is_daemon(self.pid)

    def stop_all(self) -> None:
        control.stop()
        for pid in self.pids:
            if control.is_daemon(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def daemon(python_image: str) -> Iterator[Daemon]:
    d = Daemon(_free_port())
    try:
        d.start()
        yield d
    finally:
        d.stop_all()
    log = wire.log_path().read_text(errors="replace")
    assert "Traceback" not in log, log  # no request failed unexpectedly inside the daemon


@pytest.fixture
def remote(daemon: Daemon) -> Iterator[RemoteEngine]:
    with connect() as eng:
        yield eng


@pytest.fixture
def boxes() -> Iterator[list[str]]:
    """Names made by a test; removed afterwards by an in-process engine, which works
    whether or not the daemon still runs."""
    made: list[str] = []
    yield made
    from aiva.engine import Engine

    eng = Engine()
    try:
        for name in made:
            if eng.exists(name):
                eng.delete(name, volumes=True)
    finally:
        eng.close()


def _new(remote: RemoteEngine, boxes: list[str]) -> str:
    name = f"dmn-{uuid.uuid4().hex[:6]}"
    boxes.append(name)
    sb = remote.create(name, remote.build_spec(cpus=1, memory="512MB"))
    assert sb.state == State.RUNNING
    return name


def run(remote: RemoteEngine, name: str, command: str | list[str], **kw: Any) -> ExecResult:
    res = remote.exec(name, command, **kw)
    assert isinstance(res, ExecResult)
    return res


def test_token_socket_modes_and_openapi(daemon: Daemon) -> None:
    for path in (wire.token_path(), wire.socket_path()):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    token = wire.token_path().read_text().strip()
    assert len(token) >= 40
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as tcp:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
            r = tcp.get("/v1/sandboxes", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["hint"]
        assert tcp.get("/openapi.json").status_code == 401
        ok = tcp.get("/v1/sandboxes", headers={"authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and isinstance(ok.json(), list)
    transport = httpx.HTTPTransport(uds=str(wire.socket_path()))
    with httpx.Client(transport=transport, base_url="http://aiva") as unix:
        assert unix.get("/v1/sandboxes").status_code == 200
        paths = unix.get("/openapi.json").json()["paths"]
    for route in ("/v1/sandboxes", "/v1/sandboxes/{name}", "/v1/sandboxes/{name}/exec",
                  "/v1/sandboxes/{name}/files/content", "/v1/sandboxes/{name}/snapshots",
                           "/v1/sandboxes/{name}/logs/follow", "/v1/events"):
        assert route in paths, route


def test_dashboard_open_without_a_browser_prints_the_url(daemon: Daemon) -> None:
    """`aiva daemon start --port N && aiva dashboard --open` (the README's line) must not
    fail where no browser can be opened: the URL is printed either way."""
    r = subprocess.run([sys.executable, "-m", "aiva.cli.main", "dashboard", "--open"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "BROWSER": "false"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"http://127.0.0.1:{daemon.port}/ui/#token=")
    assert "no web browser" in r.stderr and "Traceback" not in r.stderr


def test_errors_come_back_as_the_same_classes(daemon: Daemon, remote: RemoteEngine) -> None:
    with pytest.raises(errors.SandboxNotFound) as exc:
        remote.status("no-such-box")
    assert exc.value.hint == errors.SandboxNotFound("no-such-box").hint
    assert not remote.exists("no-such-box")
    with RemoteEngine(port=daemon.port) as tcp, \
            pytest.raises(errors.SandboxNotFound, match="no-such-box"):
        tcp.exec("no-such-box", "true")  # over TCP, the token read from AIVA_HOME
    with RemoteEngine(port=daemon.port, token="wrong") as bad, \
            pytest.raises(errors.AivaError, match="bearer token"):
        bad.list_all()
    with pytest.raises(errors.InvalidValue, match="not a size"):
        remote.build_spec(memory="lots")


def test_end_to_end(remote: RemoteEngine, boxes: list[str], tmp_path: Path) -> None:
    name = _new(remote, boxes)
    sb = remote.status(name)
    # output streams while the command runs
    t0 = time.monotonic()
    arrivals: list[tuple[float, str]] = []
    res = run(remote, name, "echo first; sleep 1; echo second; echo err >&2",
                      on_stdout=lambda t: arrivals.append((time.monotonic() - t0, t)))
    ended = time.monotonic() - t0
    assert (res.exit_code, res.stdout, res.stderr) == (0, "first\nsecond\n", "err\n")
    assert arrivals[0][1].startswith("first")
    assert arrivals[0][0] < ended - 0.7, (arrivals, ended)
    # exec options, timeouts, background processes
    assert run(remote, name, ["cat"], stdin="via stdin").stdout == "via stdin"
    r = run(remote, name, "echo $A; pwd", env={"A": "1"}, cwd="/tmp")
    assert r.stdout == "1\n/tmp\n"
    assert run(remote, name, "sleep 5", timeout=0.5).timed_out
    bg = remote.exec(name, "sleep 0.3; echo bg", background=True)
    assert isinstance(bg, ProcessHandle)
    assert bg.wait(10).stdout == "bg\n" and bg.done
    slow = remote.exec(name, "sleep 30", background=True)
    assert isinstance(slow, ProcessHandle) and not slow.done
    t = time.monotonic()
    remote.stat(name, "/workspace")  # a long-running command blocks nobody
    assert time.monotonic() - t < 1.0
    slow.kill()
    assert slow.wait(10).exit_code != 0
    # files: a few MB both ways, streamed
    data = os.urandom(3 << 20) + b"end"
    assert remote.write_file(name, "/workspace/big.bin", data) == len(data)
    assert remote.read_file(name, "/workspace/big.bin") == data
    meta, chunks = remote.read_stream(name, "/workspace/big.bin")
    assert meta["size"] == len(data) and sum(len(c) for c in chunks) == len(data)
    assert remote.write_file(name, "/workspace/d/io.bin", io.BytesIO(data), mode=0o600) \
        == len(data)
    assert remote.stat(name, "/workspace/d/io.bin")["mode"] & 0o777 == 0o600
    remote.mkdir(name, "/workspace/e")
    remote.rename(name, "/workspace/d/io.bin", "/workspace/e/moved.bin")
    assert [e["name"] for e in remote.list_dir(name, "/workspace/e")] == ["moved.bin"]
    remote.remove(name, "/workspace/e", recursive=True)
    with pytest.raises(errors.SandboxFileNotFound):
        remote.read_file(name, "/workspace/e/moved.bin")
    # sync and cp run by the daemon on this host's paths
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.txt").write_text("B")
    seen: list[str] = []
    report = remote.sync(name, src, "/workspace/synced", direction="push",
                         progress=lambda p, done, total: seen.append(p))
    assert sorted(report.pushed) == ["a.txt", "sub/b.txt"]
    assert remote.copy_out(name, "/workspace/synced/sub/b.txt", tmp_path / "b.txt") == 1
    assert (tmp_path / "b.txt").read_text() == "B"
    # the SDK works unchanged over the remote engine
    from aiva.sdk import Sandbox

    box = Sandbox.connect(name, engine=remote)  # type: ignore[arg-type]
    assert box.commands.run("echo sdk").stdout == "sdk\n"
    box.files.write("notes.txt", "hi")
    assert box.files.read("/workspace/notes.txt") == "hi"
    # snapshot / restore
    remote.write_file(name, "/workspace/snap.txt", "v1")
    assert remote.snapshot(name, "s1")["tag"] == "s1"
    remote.write_file(name, "/workspace/snap.txt", "v2")
    remote.restore(name, "s1")
    assert remote.read_file(name, "/workspace/snap.txt") == b"v1"
    assert [s["tag"] for s in remote.snapshots(name)] == ["s1"]
    fork_name = f"{name}-fork"
    boxes.append(fork_name)
    assert remote.fork(fork_name, name, "s1").state == State.RUNNING
    assert remote.read_file(fork_name, "/workspace/snap.txt") == b"v1"
    remote.delete(fork_name, volumes=True)
    # settings, logs (and a live follow), metrics, events
    remote.set_setting(name, "env.GREETING", "hello")
    assert remote.get_setting(name, "env.GREETING") == "hello"
    lines: list[str] = []

    def follow() -> None:
        for line in remote.follow_logs(name):
            lines.append(line.text)
            if "marker-42" in line.text:
                return

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    time.sleep(0.5)
    assert run(remote, name, "echo marker-$((40+2))").stdout == "marker-42\n"
    follower.join(10)
    assert any("marker-42" in x for x in lines), lines
    assert any("first" in line.text for line in remote.logs(name))
    assert isinstance(remote.metrics(name), SandboxMetrics)
    events = remote.events(sandbox_id=sb.id)
    kinds = [e.kind for e in events]
    for kind in ("created", "started", "command", "snapshot", "restored", "config_changed"):
        assert kind in kinds, kinds
    assert any(e.kind == "command" and "echo first" in " ".join(e.data["cmd"])
               for e in events)
    # lifecycle refusals keep their hints
    remote.pause(name)
    with pytest.raises(errors.InvalidTransition) as exc:
        run(remote, name, "true")
    assert "resume" in (exc.value.hint or "")
    remote.resume(name)
    assert remote.stop(name).state == State.STOPPED
    assert remote.start(name).state == State.RUNNING
    remote.delete(name, volumes=True)
    assert not remote.exists(name)


def test_sandboxes_survive_a_killed_daemon(daemon: Daemon, remote: RemoteEngine,
                                           boxes: list[str]) -> None:
    name = _new(remote, boxes)
    sb = remote.status(name)
    remote.write_file(name, "/workspace/keep.txt", "still here")
    assert run(remote, name, "echo before").exit_code == 0
    before = remote.events(sandbox_id=sb.id)

    daemon.kill()
    assert not daemon_running()
    with pytest.raises(errors.BackendUnavailable, match="daemon"):
        remote.status(name)
    daemon.start()

    info = remote.status(name)  # the same client reconnects
    assert info.state == State.RUNNING and info.id == sb.id
    assert remote.read_file(name, "/workspace/keep.txt") == b"still here"
    assert run(remote, name, "echo after").stdout == "after\n"
    after = remote.events(sandbox_id=sb.id)
    assert [e.id for e in after[:len(before)]] == [e.id for e in before]
    starts = [e for e in remote.events() if e.kind == "daemon_started"]
    assert starts[-1].data["pid"] == daemon.pid
    assert starts[-1].data["sandboxes"][name] == "running"
    status = control.status()
    assert status["running"] and status["pid"] == daemon.pid and status["sandboxes"] >= 1
    remote.delete(name, volumes=True)


def test_prometheus_and_the_sampler(daemon: Daemon, remote: RemoteEngine,
                                    boxes: list[str]) -> None:
    """/metrics speaks Prometheus; the daemon's sampler stores metrics history."""
    from prometheus_client.parser import text_string_to_metric_families

    from aiva.observe.collector import Collector

    name = _new(remote, boxes)
    sb = remote.get(name)
    collector = Collector()
    deadline = time.monotonic() + 30  # the sampler runs every collector.interval (5 s)
    rows: list[dict[str, Any]] = []
    while not rows and time.monotonic() < deadline:
        rows = collector.history(sb.id)
        time.sleep(0.2)
    collector.close()
    assert rows and rows[-1]["mem_total"] > 0
    transport = httpx.HTTPTransport(uds=str(wire.socket_path()))
    with httpx.Client(transport=transport, base_url="http://aiva") as unix:
        text = unix.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    states = {(s.labels["state"], s.labels["backend"]): s.value
              for s in families["aiva_sandboxes"].samples}
    assert states.get(("running", "docker"), 0) >= 1


def test_files_out_through_the_daemon_lose_their_powers(remote: RemoteEngine,
                                                        boxes: list[str],
                                                        tmp_path: Path) -> None:
    """The daemon's copy-out and sync routes write through the same safe path as the
    in-process engine: no setuid bits, no link followed (the refusal keeps its class)."""
    name = _new(remote, boxes)
    run(remote, name, "mkdir -p /workspace/o && cp /bin/true /workspace/o/t && "
                      "chmod 6755 /workspace/o/t")
    assert remote.copy_out(name, "/workspace/o/t", tmp_path / "t") > 0
    assert stat.S_IMODE((tmp_path / "t").stat().st_mode) & 0o7000 == 0
    remote.sync(name, tmp_path / "pulled", "/workspace/o", direction="pull")
    assert stat.S_IMODE((tmp_path / "pulled" / "t").stat().st_mode) & 0o7000 == 0
    (tmp_path / "victim").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "victim")
    with pytest.raises(errors.HostFileError, match="symbolic link"):
        remote.copy_out(name, "/workspace/o/t", tmp_path / "link")
    assert (tmp_path / "victim").read_text() == "keep me"
    remote.delete(name, volumes=True)


def test_a_gvisor_sandbox_through_the_daemon(remote: RemoteEngine, boxes: list[str],
                                             gvisor_ok: None) -> None:
    """``runtime`` crosses the API (SpecFields), and a refusal comes back as the same
    InvalidValue."""
    name = f"dmn-gv-{uuid.uuid4().hex[:6]}"
    boxes.append(name)
    sb = remote.create(name, remote.build_spec(cpus=1, memory="256MB", runtime="gvisor"))
    assert sb.state == State.RUNNING and sb.spec.runtime == "gvisor"
    assert run(remote, name, ["uname", "-r"]).stdout.strip() == "4.4.0"
    assert remote.status(name).spec.runtime == "gvisor"
    with pytest.raises(errors.InvalidValue, match="for the Docker backend, not qemu"):
        remote.build_spec(backend="qemu", runtime="gvisor")
