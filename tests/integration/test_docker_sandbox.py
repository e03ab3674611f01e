"""Sandboxes on a real Docker engine, through the SDK and the engine."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aiva import errors
from aiva.models import State

pytestmark = pytest.mark.docker


def wait_for(cond: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_lifecycle_and_data_volume_survive_stop_start(make_sandbox: Any, docker_ok: Any) -> None:
    sb = make_sandbox()
    assert sb.state == State.RUNNING
    r = sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
    sb.files.write("/workspace/keep.txt", "kept across restarts")
    sb.commands.run("echo gone > /tmp/scratch")

    sb.pause()
    assert sb.state == State.PAUSED
    with pytest.raises(errors.InvalidTransition, match="paused") as exc:
        sb.commands.run("true")
    assert "resume" in (exc.value.hint or "")
    sb.resume()
    assert sb.commands.run("true").exit_code == 0

    sb.stop()
    assert sb.state == State.STOPPED
    container = docker_ok.containers.get(sb.info.runtime["container_id"])
    assert container.status == "exited"
    sb.start()
    assert sb.files.read("/workspace/keep.txt") == "kept across restarts"

    events = [e.kind for e in sb._engine.store.events(sandbox_id=sb.id)]
    for kind in ("created", "started", "paused", "resumed", "stopped", "command"):
        assert kind in events


def test_illegal_transitions_are_clear_errors(make_sandbox: Any) -> None:
    sb = make_sandbox()
    with pytest.raises(errors.InvalidTransition, match="cannot resume"):
        sb.resume()
    with pytest.raises(errors.InvalidTransition, match="cannot start"):
        sb.start()
    sb.stop()
    with pytest.raises(errors.InvalidTransition, match="cannot pause"):
        sb.pause()
    with pytest.raises(errors.InvalidTransition, match="cannot stop"):
        sb.stop()


def test_force_stop_kills_at_once(make_sandbox: Any, docker_ok: Any) -> None:
    sb = make_sandbox()
    sb.stop(force=True)
    attrs = docker_ok.containers.get(sb.info.runtime["container_id"]).attrs
    assert attrs["State"]["Status"] == "exited"
    assert attrs["State"]["ExitCode"] == 137


def test_rm_keeps_the_disk_unless_asked(engine: Any, make_sandbox: Any, docker_ok: Any) -> None:
    from aiva.backends import docker_disk

    sb = make_sandbox()
    assert "volume" not in sb.info.runtime and sb.info.runtime["disk"] == sb.info.spec.disk
    image = docker_disk.image_path(sb.id)
    cid = sb.info.runtime["container_id"]
    engine.delete(sb.name)
    assert not engine.exists(sb.name)
    assert not docker_ok.containers.list(all=True, filters={"id": cid})
    assert image.is_file() and not docker_disk.is_mounted(sb.id)  # kept, detached
    docker_disk.remove(sb.id)

    sb2 = make_sandbox()
    engine.delete(sb2.name, volumes=True)
    assert not docker_disk.disk_dir(sb2.id).exists()


def test_reconcile_shows_outside_kill_and_removal(make_sandbox: Any, docker_ok: Any) -> None:
    killed = make_sandbox()
    docker_ok.containers.get(killed.info.runtime["container_id"]).kill()
    info = killed.status()
    assert info.state == State.ERROR
    assert "137" in (info.error or "")

    removed = make_sandbox()
    docker_ok.containers.get(removed.info.runtime["container_id"]).remove(force=True)
    info = removed.status()
    assert info.state == State.ERROR
    assert "removed outside aiva" in (info.error or "")


def test_limits_labels_env(make_sandbox: Any, docker_ok: Any, engine: Any) -> None:
    sb = make_sandbox(cpus=0.5, memory="256MB", env={"GREETING": "hi"},
                      labels={"agent_id": "a-1"})
    c = docker_ok.containers.get(sb.info.runtime["container_id"])
    host = c.attrs["HostConfig"]
    assert (host["CpuQuota"], host["CpuPeriod"]) == (50_000, 100_000)
    assert host["Memory"] == 256 << 20
    assert host["PidsLimit"] == 4096
    assert c.labels["aiva.managed"] == "true"
    assert c.labels["aiva.sandbox_id"] == sb.id
    assert c.labels["aiva.label.agent_id"] == "a-1"
    assert sb.commands.run("echo $GREETING").stdout == "hi\n"
    mem = sb.commands.run("cat /sys/fs/cgroup/memory.max 2>/dev/null "
                          "|| cat /sys/fs/cgroup/memory/memory.limit_in_bytes").stdout
    assert int(mem) == 256 << 20

    engine.set_setting(sb.name, "memory", "384MB")
    engine.set_setting(sb.name, "env.GREETING", "hello")
    c.reload()
    assert c.attrs["HostConfig"]["Memory"] == 384 << 20
    assert sb.commands.run("echo $GREETING").stdout == "hello\n"
    with pytest.raises(errors.InvalidValue, match="cannot change"):
        engine.set_setting(sb.name, "image", "other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_forward_binds_loopback(make_sandbox: Any) -> None:
    port = _free_port()
    sb = make_sandbox(ports=[f"{port}:8000"])
    assert sb.info.runtime["ports"] == [f"127.0.0.1:{port}->8000/tcp"]
    sb.files.write("/workspace/index.html", "served from the sandbox")
    server = sb.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
    try:
        def fetch() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html",
                                            timeout=2) as resp:
                    return str(resp.read().decode())
            except OSError:
                return None

        assert wait_for(fetch, what="the http server") == "served from the sandbox"
    finally:
        server.kill()
    assert server.wait(10).exit_code == -9


def test_exec_features_in_container(make_sandbox: Any) -> None:
    sb = make_sandbox()
    out: list[str] = []
    r = sb.commands.run(["python3", "-c", "import sys; print(sys.stdin.read().upper())"],
                        stdin="shout", on_stdout=out.append)
    assert r.stdout == "SHOUT\n" and "".join(out) == "SHOUT\n"
    assert sb.commands.run("pwd").stdout == "/workspace\n"
    assert sb.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.commands.run("id -un", user="nobody").stdout == "nobody\n"
    with pytest.raises(errors.CommandTimeout):
        sb.commands.run("sleep 30", timeout=0.5)
    with pytest.raises(errors.CommandFailed) as failed:
        sb.commands.run("echo boom >&2; exit 4", check=True)
    assert failed.value.exit_code == 4 and "boom" in failed.value.stderr
    # the timed-out process group is gone
    ps = sb.commands.run("ps -eo comm 2>/dev/null || ls /proc").stdout
    assert "sleep" not in ps


def test_large_file_roundtrip_and_errors(make_sandbox: Any, tmp_path: Path) -> None:
    sb = make_sandbox()
    data = os.urandom(30 << 20)
    assert sb.files.write("/workspace/big.bin", data) == len(data)
    digest = sb.commands.run("sha256sum /workspace/big.bin").stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    assert sb.files.read("/workspace/big.bin", format="bytes") == data
    with pytest.raises(errors.SandboxFileNotFound, match="/nope"):
        sb.files.read("/nope")
    sb.commands.run("touch /workspace/secret && chmod 600 /workspace/secret")
    sb.files.mkdir("/workspace/a/b/c")
    assert sb.files.stat("/workspace/a/b/c")["type"] == "dir"
    sb.files.rename("/workspace/a", "/workspace/z")
    assert [e["name"] for e in sb.files.list("/workspace/z")] == ["b"]
    sb.files.remove("/workspace/z", recursive=True)
    assert not sb.files.exists("/workspace/z")
    local = tmp_path / "out.bin"
    sb.files.download("/workspace/big.bin", local)
    assert local.read_bytes() == data


def test_image_without_python_is_refused_clearly(engine: Any, docker_ok: Any) -> None:
    from aiva.images import build as images
    from aiva.sdk import Sandbox

    tag = images.build_test_image_without_python(docker_ok)
    with pytest.raises(errors.ImageUnsupported) as exc:
        Sandbox.create("nopy-box", image=tag, engine=engine)
    assert "python3" in str(exc.value) and "aiva image build python" in (exc.value.hint or "")
    assert not engine.exists("nopy-box")


def test_missing_image_names_the_fix(engine: Any) -> None:
    from aiva.sdk import Sandbox

    with pytest.raises(errors.ImageNotFound) as exc:
        Sandbox.create("noimg-box", image="does-not-exist:1", engine=engine)
    assert exc.value.hint
    assert not engine.exists("noimg-box")


def test_name_taken(make_sandbox: Any) -> None:
    sb = make_sandbox()
    with pytest.raises(errors.SandboxExists):
        make_sandbox(sb.name)


def test_seed_scenario_create_run_fetch_delete(engine: Any, tmp_path: Path) -> None:
    """Seed 003 §1.4: create a VM, run a task, fetch its result, delete it."""
    import aiva

    vm = aiva.create_vm("agent-7", {"cpus": 1, "memory": "512MB"})
    try:
        assert aiva.get_vm_status(vm)["state"] == "running"
        assert aiva.get_vm_status(vm)["agent_id"] == "agent-7"
        task = aiva.execute_in_vm(
            vm, "python3 -c \"open('/workspace/result.txt','w').write(str(sum(range(101))))\"")
        assert task["exit_code"] == 0
        out = tmp_path / "out"
        aiva.sync_files(vm, out, "/workspace", direction="pull")
        assert (out / "result.txt").read_text() == "5050"
        assert any(line["source"] == "cmd" for line in aiva.get_logs(vm))
        assert vm in [v["vm_id"] for v in aiva.list_vms()]
    finally:
        aiva.delete_vm(vm)
    assert vm not in [v["vm_id"] for v in aiva.list_vms()]


def test_three_sandboxes_run_different_tasks_at_once(make_sandbox: Any) -> None:
    """Seed 003 §1.4: three VMs at once, each running a different task concurrently."""
    tasks = {
        "sq": ("python3 -c 'print(sum(i*i for i in range(10**5)))'",
               str(sum(i * i for i in range(10**5)))),
        "git": ("git init -q /workspace/r && git -C /workspace/r status --short | wc -l", "0"),
        "sh": ("seq 1 500 | awk '{s+=$1} END {print s}'", "125250"),
    }
    boxes = {key: make_sandbox() for key in tasks}
    results: dict[str, str] = {}
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}

    def work(key: str) -> None:
        starts[key] = time.monotonic()
        cmd = f"sleep 1; {tasks[key][0]}"
        results[key] = boxes[key].commands.run(cmd).stdout.strip()
        ends[key] = time.monotonic()

    threads = [threading.Thread(target=work, args=(k,)) for k in tasks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {k: v[1] for k, v in tasks.items()}
    # they overlapped: every task started before any finished
    assert max(starts.values()) < min(ends.values())


def test_snapshot_restore_fork_filesystem_only(make_sandbox: Any, engine: Any,
                                               docker_ok: Any) -> None:
    from aiva.sdk import Sandbox

    sb = make_sandbox()
    sb.files.write("/workspace/data.txt", "v1")
    sb.commands.run("echo root-v1 > /usr/local/aiva-marker")  # the root is read-only
    snap = sb.snapshot("s1")
    assert snap["memory"] is False  # Docker keeps no process state, and says so
    sb.files.write("/workspace/data.txt", "v2")
    sb.commands.run("echo root-v2 > /usr/local/aiva-marker; touch /workspace/new.txt")

    sb.restore("s1")
    assert sb.state == State.RUNNING
    assert sb.files.read("/workspace/data.txt") == "v1"
    assert sb.commands.run("cat /usr/local/aiva-marker").stdout == "root-v1\n"
    assert not sb.files.exists("/workspace/new.txt")

    fork = Sandbox.from_snapshot(sb.name, "s1", engine=engine)
    try:
        assert fork.files.read("/workspace/data.txt") == "v1"
        fork.files.write("/workspace/data.txt", "fork")
        assert sb.files.read("/workspace/data.txt") == "v1"
    finally:
        engine.delete(fork.name, volumes=True)

    with pytest.raises(errors.InvalidValue, match="no snapshot 'nope'"):
        sb.restore("nope")
    image, volume = snap["image"], snap["volume"]
    engine.delete(sb.name, volumes=True)
    assert not docker_ok.volumes.list(filters={"name": volume})
    assert not [i for i in docker_ok.images.list() if i.id == image]


def test_network_none_has_only_loopback(make_sandbox: Any, docker_ok: Any) -> None:
    sb = make_sandbox(network="none")
    c = docker_ok.containers.get(sb.info.runtime["container_id"])
    assert c.attrs["HostConfig"]["NetworkMode"] == "none"
    links = sb.commands.run("ls /sys/class/net").stdout.split()
    assert links == ["lo"]
