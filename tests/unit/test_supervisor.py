"""The VM supervisor with a stand-in for QEMU: a process that offers the same two
chardev server sockets (agent, console) with the real agent behind the agent one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import aiva.agent
from aiva.agent_client import AgentClient, ProcessHandle, connect_unix

FAKE_QEMU = textwrap.dedent("""
    import os, socket, sys
    run, agent_dir = sys.argv[1], sys.argv[2]
    def serve(name):
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(run, name))
        s.listen(1)
        return s
    con, ag = serve("console.sock"), serve("agent-up.sock")
    c, _ = con.accept()
    c.sendall(b"booting\\r\\nAIVA-AGENT-START\\r\\n")
    a, _ = ag.accept()
    os.dup2(a.fileno(), 0)
    os.dup2(a.fileno(), 1)
    os.execv(sys.executable, [sys.executable, "-B", agent_dir, "--stdio"])
""")


def _gone(pid: int) -> bool:
    """Exited (or a zombie nobody reaped yet); it may vanish between two reads."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def wait_for(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.fixture
def vm() -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    d = Path(tempfile.mkdtemp(prefix="aiva-sv"))
    script = d / "fake_qemu.py"
    script.write_text(FAKE_QEMU)
    agent_dir = str(Path(aiva.agent.__file__).parent)
    (d / "launch.json").write_text(json.dumps({
        "argv": [sys.executable, str(script), str(d), agent_dir],
        "console": str(d / "console.sock"),
        "agent_upstream": str(d / "agent-up.sock"),
        "agent_listen": str(d / "agent.sock"),
    }))
    sup = subprocess.Popen([sys.executable, "-m", "aiva.vm.supervisor", str(d)])
    try:
        yield d, sup
    finally:
        if sup.poll() is None:
            sup.kill()
        sup.wait(10)
        for child in d.iterdir():
            child.unlink()
        d.rmdir()


def test_many_clients_share_one_agent_stream(vm: tuple[Path, subprocess.Popen[bytes]]) -> None:
    d, _ = vm
    clients = [AgentClient(connect_unix(str(d / "agent.sock"), timeout=20)) for _ in range(3)]
    try:
        assert oct(os.stat(d / "agent.sock").st_mode & 0o777) == "0o600"
        results: dict[int, str] = {}

        def work(i: int) -> None:
            r = clients[i].exec(["sh", "-c", f"sleep 0.2; echo client-{i}"])
            assert not isinstance(r, ProcessHandle)
            results[i] = r.stdout

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == {i: f"client-{i}\n" for i in range(3)}
        data = os.urandom(3 << 20)
        clients[0].write_file(str(d / "blob"), data)
        assert clients[1].read_file(str(d / "blob")) == data
    finally:
        for c in clients:
            c.close()


def test_a_client_that_leaves_has_its_command_cancelled(
        vm: tuple[Path, subprocess.Popen[bytes]]) -> None:
    d, _ = vm
    first = AgentClient(connect_unix(str(d / "agent.sock"), timeout=20))
    # start a foreground command without waiting for it, then drop the connection
    ch = first._open("exec", {"argv": ["sleep", "60"]})
    kind, payload = first._next(ch, time.monotonic() + 20)
    pid = json.loads(payload)["started"]
    assert kind == 10 and os.path.exists(f"/proc/{pid}")
    first.close()
    wait_for(lambda: _gone(pid))
    second = AgentClient(connect_unix(str(d / "agent.sock"), timeout=20))
    try:
        assert second.ping()["version"]
    finally:
        second.close()


def test_console_is_timestamped_and_exit_is_recorded(
        vm: tuple[Path, subprocess.Popen[bytes]]) -> None:
    d, sup = vm
    client = AgentClient(connect_unix(str(d / "agent.sock"), timeout=20))
    before = time.time()
    client.call("sys.shutdown")  # the agent exits, so does the stand-in QEMU
    client.close()
    assert sup.wait(20) == 0
    exit_info = json.loads((d / "exit.json").read_text())
    assert exit_info["code"] == 0 and exit_info["at"] >= before
    lines = [json.loads(x) for x in (d / "console.jsonl").read_text().splitlines()]
    assert [x["d"] for x in lines] == ["booting", "AIVA-AGENT-START"]
    assert all(x["t"] <= exit_info["at"] for x in lines)
    assert not (d / "agent.sock").exists()
