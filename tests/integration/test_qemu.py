"""MicroVMs on real QEMU (TCG here): few boots, each doing as much as it can."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.models import State
from aiva.observe.collector import query_logs
from aiva.paths import aiva_home

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def qemu_ready(docker_ok: Any) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs QEMU: scripts/setup.sh installs qemu-system-x86")
        pytest.skip("qemu-system-x86_64 is not installed")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmd:
            found.append(int(pid))
    return found


SLEEPERS = ["python3", "-c", (
    "import glob, json\n"
    "args = []\n"
    "for p in glob.glob('/proc/[0-9]*/cmdline'):\n"
    "    try: cmd = open(p, 'rb').read().split(b'\\0')\n"
    "    except OSError: continue\n"
    "    if cmd[0] == b'sleep': args.append(cmd[1].decode())\n"
    "print(json.dumps(sorted(args)))\n")]


def sleepers(sb: Any) -> list[str]:
    """The argument of every `sleep` running in the guest (pids get reused on restore)."""
    return list(json.loads(sb.commands.run(SLEEPERS).stdout))


def test_vm_lifecycle_keeps_data_and_leaves_nothing(qemu_ready: None, engine: Any,
                                                    make_sandbox: Any) -> None:
    sb = make_sandbox(backend="qemu", template="minimal", memory="512MB", disk="1GB",
                      network="none")
    info = sb.status()
    assert info.state == State.RUNNING
    assert info.runtime["accel"] in ("tcg", "kvm")
    print(f"boot to agent: {info.runtime['boot_seconds']} s ({info.runtime['accel']})")

    r = sb.commands.run("echo $((6*7)); uname -r; echo err >&2")
    assert r.exit_code == 0 and r.stdout.startswith("42\n") and r.stderr == "err\n"
    assert sb.commands.run(["python3", "-c", "print('in a vm')"]).stdout == "in a vm\n"
    # the guest's syslog: the agent is /dev/log, a virtio-serial port carries it out
    word = f"hello-{uuid.uuid4().hex}"
    assert sb.commands.run(["logger", "-t", "aivatest", word]).exit_code == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not query_logs(engine, sb.name, source="syslog"):
        time.sleep(0.05)
    assert [e.text for e in query_logs(engine, sb.name, source="syslog")] == [
        f"aivatest: {word}"]
    assert any(x.source == "syslog" and x.text == f"aivatest: {word}" for x in sb.logs())
    m = sb.metrics()
    assert m.source["memory"] == "guest" and 300 << 20 < m.memory["total"] <= 512 << 20
    assert m.source["cpu"] == "proc" and m.uptime > 0 and m.disk["read_bytes"] > 0
    sb.files.write("/workspace/keep.txt", "survives a reboot")
    assert sb.files.read("/workspace/keep.txt") == "survives a reboot"
    with pytest.raises(errors.SandboxFileNotFound):
        sb.files.read("/workspace/none")

    sb.pause()
    assert sb.status().state == State.PAUSED
    sb.resume()
    assert sb.commands.run("true").exit_code == 0

    sb.stop()
    assert sb.status().state == State.STOPPED
    vm_dir = aiva_home() / "vms" / sb.id
    assert (vm_dir / "exit.json").exists()
    assert not _processes_mentioning(str(vm_dir))

    sb.start()
    assert sb.files.read("/workspace/keep.txt") == "survives a reboot"
    assert any(line.source == "engine" for line in sb.logs())
    assert any(line.text == f"aivatest: {word}" for line in sb.logs())  # kept on the host

    # snapshot with a process running; then change a file, kill it, start another
    sleeper = sb.commands.run("sleep 1000", background=True)
    snap = sb.snapshot("s1")
    assert snap["memory"] is True
    sb.files.write("/workspace/keep.txt", "changed after the snapshot")
    sb.commands.kill(sleeper.pid)
    sb.commands.run("sleep 2000", background=True)
    assert sleepers(sb) == ["2000"]

    sb.restore("s1")
    assert sb.files.read("/workspace/keep.txt") == "survives a reboot"
    assert sleepers(sb) == ["1000"], "the process from before the snapshot is not back"
    assert [x["tag"] for x in sb.snapshots()] == ["s1"]

    from aiva.sdk import Sandbox

    fork = Sandbox.from_snapshot(sb.name, "s1", engine=engine)
    try:
        assert fork.files.read("/workspace/keep.txt") == "survives a reboot"
        assert sleepers(fork) == ["1000"]
        fork.files.write("/workspace/keep.txt", "only in the fork")
        assert sb.files.read("/workspace/keep.txt") == "survives a reboot"
    finally:
        engine.delete(fork.name, volumes=True)

    sb_id = sb.id
    engine.delete(sb.name, volumes=True)
    assert not (aiva_home() / "vms" / sb_id).exists()
    assert not (aiva_home() / "run" / sb_id[:12]).exists()
    assert not _processes_mentioning(sb_id[:12])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_vm_nat_network_and_port_forward(qemu_ready: None, engine: Any,
                                         make_sandbox: Any) -> None:
    """The host reaches the VM at its own address and through -p on 127.0.0.1 only."""
    import urllib.request

    port = _free_port()
    sb = make_sandbox(backend="qemu", template="minimal", memory="512MB", disk="1GB",
                      ports=[f"{port}:8000"])
    net = sb.info.runtime["network"]
    guest, tap = net["address"], net["tap"]
    assert sb.info.runtime["ports"] == [f"127.0.0.1:{port}->8000/tcp"]
    assert Path(f"/sys/class/net/{tap}").exists()
    ip = sb.commands.run("cat /proc/net/fib_trie | grep -c " + guest).stdout.strip()
    assert int(ip) >= 1, "the guest does not have its address"
    sb.files.write("/workspace/index.html", "hello from the vm")
    server = sb.commands.run(["python3", "-m", "http.server", "8000", "--directory",
                              "/workspace"], background=True)

    def fetch(url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(resp.read().decode())
        except OSError:
            return None

    deadline = time.monotonic() + 60
    direct = forwarded = None
    while time.monotonic() < deadline and not (direct and forwarded):
        direct = direct or fetch(f"http://{guest}:8000/index.html")
        forwarded = forwarded or fetch(f"http://127.0.0.1:{port}/index.html")
        time.sleep(0.2)
    assert direct == "hello from the vm"
    assert forwarded == "hello from the vm"
    server.kill()
    engine.delete(sb.name, volumes=True)
    assert not Path(f"/sys/class/net/{tap}").exists()
